"""A small continuous-batching generation loop for transformers causal LMs, on bitstable.

Each request is prefilled alone, then decoded one token per step inside whatever
batch the scheduler forms (requests join and leave between steps).  With
``deterministic=True`` the model runs under ``set_batch_invariant_mode`` and its
attention (``attn_implementation="bitstable"``) reads bitstable's KV cache through
``flash_attn_with_kvcache``: a request's tokens and log-probabilities then depend only
on the request (prompt, seed), never on its batch, its slot or the other requests,
and they equal what one full-sequence forward (the training path) computes, bit for
bit (:func:`recompute_logprobs`).  With ``deterministic=False`` the same loop runs on
stock PyTorch kernels (cuBLAS/ATen, SDPA), for comparison.

Sampling: greedy at temperature 0; otherwise Gumbel-max with noise drawn from a
generator seeded by (request seed, position), so it is keyed by request and
position, not by batch slot.
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..ops.batch_invariant import set_batch_invariant_mode
from .transformers import KVCacheContext, kv_cache_context
from ..mode import set_deterministic


@dataclass
class Request:
    """One generation request: prompt token ids, how many tokens to generate, sampling."""

    id: int
    prompt: List[int]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0


@dataclass
class Completion:
    """Generated token ids and, per token, its log-probability (float32) at sampling time."""

    id: int
    prompt: List[int]
    tokens: List[int] = field(default_factory=list)
    logprobs: List[torch.Tensor] = field(default_factory=list)

    def logprob_tensor(self) -> torch.Tensor:
        return torch.stack(self.logprobs) if self.logprobs else torch.empty(0)


def _kernels(deterministic: bool):
    stack = contextlib.ExitStack()
    stack.enter_context(set_deterministic(deterministic))
    if deterministic:
        stack.enter_context(set_batch_invariant_mode())
    return stack


def sample(logprobs: torch.Tensor, req: Request, position: int) -> int:
    """Token for one row of log-probabilities [V] (float32): argmax at temperature 0, else
    Gumbel-max with noise keyed by (request seed, position)."""
    if req.temperature == 0.0:
        return int(torch.argmax(logprobs))
    g = torch.Generator(device=logprobs.device).manual_seed(req.seed * 1_000_003 + position)
    u = torch.rand(logprobs.shape, generator=g, device=logprobs.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    return int(torch.argmax(logprobs / req.temperature + gumbel))


def _model_dims(model):
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", heads), head_dim


class Engine:
    """Continuous batching over ``max_batch`` KV-cache slots of ``capacity`` tokens each.

    ``model``: a transformers causal LM built with ``attn_implementation="bitstable"``
    (see ``bitstable.register_bitstable_attention``), in eval mode.
    """

    def __init__(self, model, max_batch: int, capacity: int, deterministic: bool = True):
        self.model = model
        self.max_batch = max_batch
        self.capacity = capacity
        self.deterministic = deterministic
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        layers, hkv, d = _model_dims(model)
        shape = (max_batch, capacity, hkv, d)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]

    def _forward(self, ids: List[List[int]], slots: List[int], cached: List[int]) -> torch.Tensor:
        """Logits [B, V] (float32 log-softmax) of each row's last new token."""
        L = len(ids[0])
        input_ids = torch.tensor(ids, device=self.device)
        position_ids = torch.tensor([[c + i for i in range(L)] for c in cached], device=self.device)
        ctx = KVCacheContext(self.k, self.v, torch.tensor(slots, dtype=torch.int32, device=self.device),
                             torch.tensor(cached, dtype=torch.int32))
        with kv_cache_context(ctx):
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def run(self, requests: Sequence[Request], batch_size: Callable[[], int],
            order: Optional[random.Random] = None,
            on_token: Optional[Callable[[int], None]] = None) -> Dict[int, Completion]:
        """Generate every request.  ``batch_size()`` caps the running batch at each step
        (a scheduler's choice); ``order`` shuffles the rows of each decode batch."""
        for r in requests:
            if len(r.prompt) + r.max_new_tokens > self.capacity:
                raise ValueError(f"request {r.id}: prompt {len(r.prompt)} + {r.max_new_tokens} new tokens "
                                 f"exceed the cache capacity {self.capacity}")
            if not r.prompt or r.max_new_tokens < 1:
                raise ValueError(f"request {r.id}: needs a non-empty prompt and max_new_tokens >= 1")
        queue = deque(requests)
        free = list(range(self.max_batch))
        active: Dict[int, Completion] = {}       # slot -> completion
        reqs: Dict[int, Request] = {}
        done: Dict[int, Completion] = {}
        with torch.inference_mode(), _kernels(self.deterministic):
            while queue or active:
                cap = max(1, min(self.max_batch, batch_size()))
                while queue and free and len(active) < cap:
                    r = queue.popleft()
                    slot = free.pop(0)
                    c = Completion(r.id, list(r.prompt))
                    lp = self._forward([r.prompt], [slot], [0])[0]
                    self._take(c, r, lp, len(r.prompt))
                    if on_token:
                        on_token(1)
                    active[slot], reqs[slot] = c, r
                    self._retire(slot, active, reqs, free, done)
                if not active:
                    continue
                slots = list(active)
                if order is not None:
                    order.shuffle(slots)
                cached = [len(active[s].prompt) + len(active[s].tokens) - 1 for s in slots]
                lps = self._forward([[active[s].tokens[-1]] for s in slots], slots, cached)
                self._take_rows([active[s] for s in slots], [reqs[s] for s in slots], lps,
                                [c + 1 for c in cached])
                if on_token:
                    on_token(len(slots))
                for s in slots:
                    self._retire(s, active, reqs, free, done)
        return done

    @staticmethod
    def _take(c: Completion, r: Request, lp: torch.Tensor, position: int) -> None:
        tok = sample(lp, r, position)
        c.tokens.append(tok)
        c.logprobs.append(lp[tok].clone())

    @staticmethod
    def _take_rows(cs: List[Completion], rs: List[Request], lps: torch.Tensor, positions: List[int]) -> None:
        """:meth:`_take` for a decode batch: the greedy rows' tokens come from one argmax
        over the batch and one host read (each row's argmax is its own: a reduction over V)."""
        greedy = [i for i, r in enumerate(rs) if r.temperature == 0.0]
        toks = dict(zip(greedy, torch.argmax(lps[greedy], dim=-1).tolist())) if greedy else {}
        for i, (c, r) in enumerate(zip(cs, rs)):
            tok = toks[i] if i in toks else sample(lps[i], r, positions[i])
            c.tokens.append(tok)
            c.logprobs.append(lps[i, tok].clone())

    @staticmethod
    def _retire(slot, active, reqs, free, done) -> None:
        if slot in active and len(active[slot].tokens) >= reqs[slot].max_new_tokens:
            c = active.pop(slot)
            reqs.pop(slot)
            done[c.id] = c
            free.append(slot)
            free.sort()


def recompute_logprobs(model, completion: Completion, deterministic: bool = True) -> torch.Tensor:
    """The training path: one full-sequence forward over prompt + generated tokens (no cache),
    returning the generated tokens' log-probabilities (float32 [n])."""
    seq = completion.prompt + completion.tokens[:-1]
    device = next(model.parameters()).device
    with torch.inference_mode(), _kernels(deterministic), kv_cache_context(None):
        logits = model(input_ids=torch.tensor([seq], device=device), use_cache=False).logits[0]
        lp = torch.log_softmax(logits[len(completion.prompt) - 1:].float(), dim=-1)
    return lp.gather(1, torch.tensor(completion.tokens, device=device)[:, None])[:, 0]
