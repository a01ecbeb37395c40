"""Hugging Face transformers: ``attn_implementation="bitstable"``.

After :func:`register_bitstable_attention`, a transformers model loaded or built with
``attn_implementation="bitstable"`` runs its attention through bitstable:

* no mask (causal LM without padding): ``flash_attn_func`` with causal aligned
  bottom-right, so a forward over a whole sequence and an incremental decode over a
  ``DynamicCache`` give every token the same bits;
* inside :func:`kv_cache_context` (bitstable's own generation loop, ``bitstable.integrations.generate``):
  the layer's new keys/values are appended to bitstable's KV cache and the queries
  attend through ``flash_attn_with_kvcache`` (decode = prefill = training, bitwise,
  batch-invariant);
* a padding mask (left or right padding, with causal or full attention, as transformers
  builds it): the valid tokens of each row are packed and run through
  ``flash_attn_varlen_func``, so each sequence gets the bits it gets alone, unpadded
  (padded query rows return 0);
* any other mask: SDPA's math path on the batch-invariant ops (a row's bits do not
  depend on its batch while ``set_batch_invariant_mode`` is on).

Query layout from transformers: [B, Hq, L, D]; the returned output is [B, L, Hq, D].
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from ..attention.sdpa import batch_invariant_sdpa

_local = threading.local()


@dataclass
class KVCacheContext:
    """Where one model call's layers keep their keys/values.

    ``k_caches[layer]``, ``v_caches[layer]``: [slots, capacity, Hkv, D] caches;
    ``slots`` int32 [B] (the cache row of each batch row, on the model's device);
    ``seqlens`` int32 [B] tokens already cached per row (a CPU tensor: no device sync).
    """

    k_caches: List[torch.Tensor]
    v_caches: List[torch.Tensor]
    slots: torch.Tensor
    seqlens: torch.Tensor


@contextlib.contextmanager
def kv_cache_context(ctx: Optional[KVCacheContext]):
    """Within the block, bitstable attention layers append to and read ``ctx``'s caches."""
    prev = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = prev


@dataclass
class _PackPlan:
    """How one padded batch packs into varlen form (built once per mask, shared by layers)."""

    q_index: torch.Tensor      # [total_q] long: rows of the flattened [B * Lq] queries kept
    k_index: torch.Tensor      # [total_k] long: rows of the flattened [B * Lk] keys kept
    cu_q: torch.Tensor         # [B + 1] int32
    cu_k: torch.Tensor         # [B + 1] int32
    max_q: int
    max_k: int


def _pack_plan(mask: torch.Tensor, Lq: int, Lk: int, causal: bool) -> Optional[_PackPlan]:
    """If the 4-d bool ``mask`` [B, 1, Lq, Lk] is a padding mask (each row's valid keys one
    contiguous span, queries aligned to the last Lq key positions, each valid query seeing
    the span causally or fully), the varlen packing of its valid tokens; else None.
    Reads the mask on the host once (one device sync); transformers passes the same mask
    object to every layer of a forward, so the plan is computed once per forward."""
    cached = getattr(_local, "plan", None)
    if cached is not None and cached[0] is mask and cached[1] == (Lq, Lk, causal):
        return cached[2]
    plan, original = None, mask
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-1] >= Lk:
        mask = mask[..., :Lk]
        B = mask.shape[0]
        valid = mask[:, 0].any(dim=1)                                 # [B, Lk] keys anyone sees
        pos = torch.arange(Lk, device=mask.device)
        start = torch.where(valid, pos, Lk).amin(dim=1)
        end = torch.where(valid, pos + 1, 0).amax(dim=1)
        span = (pos[None] >= start[:, None]) & (pos[None] < end[:, None])
        qpos = pos[Lk - Lq:]                                          # key position of each query
        q_ok = (qpos[None] >= start[:, None]) & (qpos[None] < end[:, None])
        see = span[:, None, :] & q_ok[:, :, None]
        if causal:
            see = see & (pos[None, None, :] <= qpos[None, :, None])
        # Rows of padding queries are not checked (transformers lets them see the valid keys
        # before them); their outputs are never used and come back as 0.
        rows = q_ok[:, :, None].expand_as(see)
        if torch.equal(valid, span) and torch.equal(mask[:, 0][rows], see[rows]):
            nq, nk = q_ok.sum(1), span.sum(1)
            zero = torch.zeros(1, dtype=torch.int32, device=mask.device)
            plan = _PackPlan(q_ok.reshape(-1).nonzero()[:, 0], span.reshape(-1).nonzero()[:, 0],
                             torch.cat([zero, nq.cumsum(0).to(torch.int32)]),
                             torch.cat([zero, nk.cumsum(0).to(torch.int32)]),
                             max(int(nq.max()), 1), max(int(nk.max()), 1))
    _local.plan = (original, (Lq, Lk, causal), plan)
    return plan


def _varlen_padded(query, key, value, plan: _PackPlan, scaling, causal):
    """Pack each row's valid tokens, run flash_attn_varlen_func, unpack (pads get 0)."""
    B, Hq, Lq, D = query.shape
    Lk = key.shape[2]
    qp = query.transpose(1, 2).reshape(B * Lq, Hq, D).index_select(0, plan.q_index)
    kp = key.transpose(1, 2).reshape(B * Lk, key.shape[1], D).index_select(0, plan.k_index)
    vp = value.transpose(1, 2).reshape(B * Lk, value.shape[1], D).index_select(0, plan.k_index)
    packed = flash_attn_varlen_func(qp, kp, vp, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k,
                                    softmax_scale=scaling, causal=causal)
    out = torch.zeros(B * Lq, Hq, D, dtype=query.dtype, device=query.device)
    out.index_copy_(0, plan.q_index, packed)
    return out.reshape(B, Lq, Hq, D)


def bitstable_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                                dropout: float = 0.0, scaling: Optional[float] = None,
                                is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function contract: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]
    -> (out [B, Lq, Hq, D], None)."""
    if dropout:
        raise NotImplementedError("bitstable attention has no dropout (put the model in eval mode)")
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    ctx = getattr(_local, "ctx", None)
    if ctx is not None:
        layer = module.layer_idx
        out = flash_attn_with_kvcache(query.transpose(1, 2), ctx.k_caches[layer], ctx.v_caches[layer],
                                      k=key.transpose(1, 2), v=value.transpose(1, 2),
                                      cache_seqlens=ctx.seqlens, cache_batch_idx=ctx.slots,
                                      softmax_scale=scaling, causal=causal)
        return out, None
    if attention_mask is None:
        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              softmax_scale=scaling, causal=causal)
        return out, None
    plan = _pack_plan(attention_mask, query.shape[2], key.shape[2], causal)
    if plan is not None:
        return _varlen_padded(query, key, value, plan, scaling, causal), None
    if attention_mask.dim() == 4 and attention_mask.shape[-1] > key.shape[-2]:
        attention_mask = attention_mask[..., : key.shape[-2]]
    out = batch_invariant_sdpa(query, key, value, attn_mask=attention_mask, scale=scaling,
                               enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None


def register_bitstable_attention(name: str = "bitstable") -> str:
    """Register ``attn_implementation=name`` with transformers (attention and its mask
    function, SDPA's: None when a causal mask can be skipped).  Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, bitstable_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
