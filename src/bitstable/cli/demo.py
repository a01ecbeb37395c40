"""``bitstable demo``: deterministic LLM inference end to end, next to stock PyTorch.

A Llama-style transformers model with weights initialised from a fixed seed (or a
local checkpoint via ``model_path``) generates through :mod:`bitstable.integrations.generate`:

1. unique completions: one prompt completed ``n`` times at temperature 0, each copy
   inside batches of random size mixed with random other prompts (seeded sampling);
2. training = sampling: every generated sequence's token log-probabilities, recomputed
   by one full-sequence forward, must equal those seen at sampling time, bitwise;
3. throughput of the same workload, stock vs bitstable.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from .. import _backend
from ..integrations.generate import Engine, Request, recompute_logprobs

#: Model sizes: "tiny" for the CPU interpreter, "1b" (about 1.1B parameters) for the GPU.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=97),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, head_dim=64, vocab_size=32000),
}


def build_model(size: str = "tiny", model_path: Optional[str] = None, dtype=None, device=None, seed: int = 0,
                config: Optional[Dict] = None):
    """A Llama causal LM with ``attn_implementation="bitstable"``: random weights from ``seed``
    at ``size`` (``config`` overrides fields of that size's LlamaConfig), or the checkpoint
    at ``model_path``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ..integrations.transformers import register_bitstable_attention

    register_bitstable_attention()
    device = device or _backend.kernel_device_type()
    dtype = dtype or (torch.float32 if _backend.interpreting() else torch.bfloat16)
    if model_path:
        model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="bitstable",
                                                     dtype=dtype)
    else:
        cfg = LlamaConfig(max_position_embeddings=4096, attn_implementation="bitstable",
                          **dict(SIZES[size], **(config or {})))
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.to(device).eval()


def _workload(n: int, new_tokens: int, prompt_len: int, vocab: int, seed: int) -> List[Request]:
    rng = random.Random(seed)
    target = [rng.randrange(vocab) for _ in range(prompt_len)]
    reqs = [Request(i, list(target), new_tokens, temperature=0.0) for i in range(n)]
    for j in range(max(n // 2, 1)):   # other traffic: random prompts, lengths and seeded sampling
        reqs.append(Request(n + j, [rng.randrange(vocab) for _ in range(rng.randint(1, 2 * prompt_len))],
                            rng.randint(1, new_tokens), temperature=1.0, seed=rng.randrange(2**31)))
    rng.shuffle(reqs)
    return reqs


class _Progress:
    def __init__(self, total: int, label: str, stream, unit: str = "tokens"):
        self.total, self.label, self.stream, self.n, self.t0, self.last = total, label, stream, 0, time.time(), 0.0
        self.unit = unit

    def __call__(self, k: int) -> None:
        self.n += k
        now = time.time()
        if now - self.last > 1.0 or self.n >= self.total:
            self.last = now
            frac = min(self.n / max(self.total, 1), 1.0)
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            print(f"\r  {self.label} [{bar}] {self.n}/{self.total} {self.unit} ({now - self.t0:.0f}s)",
                  end="" if self.n < self.total else "\n", file=self.stream, flush=True)


def run_demo(n: int = 8, new_tokens: int = 6, prompt_len: int = 5, max_batch: int = 8, size: str = "tiny",
             model_path: Optional[str] = None, implementations=("stock", "bitstable"), seed: int = 0,
             stream=None, on_result: Optional[Callable[[Dict[str, Dict]], None]] = None) -> Dict[str, Dict]:
    """Run the three experiments; print a result table; return the numbers per implementation."""
    stream = stream or sys.stdout
    model = build_model(size, model_path, seed=seed)
    vocab = model.config.vocab_size
    reqs = _workload(n, new_tokens, prompt_len, vocab, seed)
    capacity = 2 * prompt_len + new_tokens + 1
    total = sum(r.max_new_tokens for r in reqs)
    params = sum(p.numel() for p in model.parameters())
    print(f"bitstable demo on {_backend.describe()}: {params / 1e6:.1f}M-parameter Llama "
          f"({'checkpoint ' + model_path if model_path else 'random weights, seed ' + str(seed)}), "
          f"{n} copies of one prompt + {max(n // 2, 1)} other requests, {new_tokens} new tokens, batches of 1..{max_batch}",
          file=stream, flush=True)
    results = {}
    for impl in implementations:
        det = impl == "bitstable"
        engine = Engine(model, max_batch=max_batch, capacity=capacity, deterministic=det)
        sched = random.Random(seed + 1)
        warm = [Request(-1, reqs[0].prompt, 2)]
        engine.run(warm, lambda: 1)          # compile / warm up outside the timing
        if not _backend.interpreting():
            torch.cuda.synchronize()
        t0 = time.time()
        done = engine.run(reqs, lambda: sched.randint(1, max_batch), order=random.Random(seed + 2),
                          on_token=_Progress(total, f"{impl:9s} generate", stream))
        if not _backend.interpreting():
            torch.cuda.synchronize()
        secs = time.time() - t0
        targets = [tuple(done[r.id].tokens) for r in reqs if r.temperature == 0.0]
        prog = _Progress(len(done), f"{impl:9s} recompute", stream, unit="sequences")
        equal = 0
        for c in done.values():
            again = recompute_logprobs(model, c, deterministic=det)
            equal += int(torch.equal(again, c.logprob_tensor().to(again.device)))
            prog(1)
        results[impl] = dict(unique=len(set(targets)), completions=len(targets), seconds=secs,
                             tokens=total, tokens_per_s=total / secs, logprobs_equal=equal,
                             sequences=len(done))
        print(f"  {impl}: {results[impl]}", file=stream, flush=True)
        if on_result:
            on_result(results)
    _print(results, stream)
    return results


def _print(results: Dict[str, Dict], stream) -> None:
    print("\n| implementation | unique completions | training = sampling (bitwise) | tokens/s | time s |",
          file=stream)
    print("|---|---|---|---|---|", file=stream)
    for impl, r in results.items():
        print(f"| {impl} | {r['unique']} of {r['completions']} | {r['logprobs_equal']} of {r['sequences']} "
              f"| {r['tokens_per_s']:.1f} | {r['seconds']:.1f} |", file=stream)
    if "stock" in results and "bitstable" in results:
        ratio = results["bitstable"]["tokens_per_s"] / results["stock"]["tokens_per_s"]
        print(f"\nbitstable throughput: {ratio:.2f}x stock on the same workload", file=stream)


def attention_experiment(implementation: str = "both", seq_len: int = 1024, num_heads: int = 16,
                         head_dim: int = 64, num_iterations: int = 10, batch_sizes=(1, 2, 4, 8),
                         dtype=None, stream=None) -> Dict[str, Dict[int, int]]:
    """One sequence's causal attention output, inside batches of random other sequences:
    unique outputs (of that sequence) per batch size, over ``num_iterations`` batches."""
    stream = stream or sys.stdout
    from ..attention import flash_attn_func
    from ..mode import set_deterministic

    device = _backend.kernel_device_type()
    dtype = dtype or (torch.float16 if _backend.interpreting() else torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, num_heads, head_dim, generator=g).to(dtype).to(device) for _ in range(3))
    impls = ["standard", "bitstable"] if implementation == "both" else [implementation]
    out: Dict[str, Dict[int, int]] = {}
    for impl in impls:
        out[impl] = {}
        seen_all = set()
        for bs in batch_sizes:
            seen = set()
            for _ in range(num_iterations):
                others = [torch.randn(bs - 1, seq_len, num_heads, head_dim, generator=g).to(dtype).to(device)
                          for _ in range(3)]
                pos = int(torch.randint(0, bs, (1,), generator=g))
                qb, kb, vb = (torch.cat([o[:pos], t, o[pos:]]) for o, t in zip(others, (q, k, v)))
                with set_deterministic(impl == "bitstable"):
                    o = flash_attn_func(qb, kb, vb, causal=True)[pos]
                key = o.float().cpu().numpy().tobytes()
                seen.add(key)
                seen_all.add(key)
            out[impl][bs] = len(seen)
            print(f"{impl:9s} batch {bs:4d}: {len(seen)} unique output(s) in {num_iterations} runs",
                  file=stream, flush=True)
        out[impl]["all"] = len(seen_all)
        print(f"{impl:9s} all batch sizes: {len(seen_all)} unique output(s)", file=stream, flush=True)
    return out
