"""Hugging Face transformers: ``attn_implementation="bitstable"``.

After :func:`register_bitstable_attention`, a transformers model loaded or built with
``attn_implementation="bitstable"`` runs its attention through bitstable:

* no mask (causal LM without padding): ``flash_attn_func`` with causal aligned
  bottom-right, so a forward over a whole sequence and an incremental decode over a
  ``DynamicCache`` give every token the same bits;
* inside :func:`kv_cache_context` (bitstable's own generation loop, ``bitstable.generate``):
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


def _padding_spans(mask: torch.Tensor, Lq: int, causal: bool):
    """If the 4-d bool ``mask`` [B, 1, Lq, Lk] is a padding mask (each row's valid keys one
    contiguous span [start, end), queries aligned to the last Lq key positions, each valid
    query seeing the span causally or fully), return the spans as host lists; else None.
    Reads the mask on the host (one device sync)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    B, Lk = mask.shape[0], mask.shape[-1]
    valid = mask[:, 0].any(dim=1)                                     # [B, Lk] keys anyone sees
    pos = torch.arange(Lk, device=mask.device)
    start = torch.where(valid, pos, Lk).amin(dim=1)
    end = torch.where(valid, pos + 1, 0).amax(dim=1)
    span = (pos[None] >= start[:, None]) & (pos[None] < end[:, None])
    qpos = pos[Lk - Lq:]                                              # key position of each query
    q_ok = (qpos[None] >= start[:, None]) & (qpos[None] < end[:, None])
    see = span[:, None, :] & q_ok[:, :, None]
    if causal:
        see = see & (pos[None, None, :] <= qpos[None, :, None])
    # Rows of padding queries are not checked (transformers lets them see the valid keys
    # before them); their outputs are never used and come back as 0.
    rows = q_ok[:, :, None].expand_as(see)
    if not (torch.equal(valid, span) and torch.equal(mask[:, 0][rows], see[rows])):
        return None
    return start.tolist(), end.tolist()


def _varlen_padded(query, key, value, spans, scaling, causal):
    """Pack each row's valid tokens, run flash_attn_varlen_func, unpack (pads get 0)."""
    B, Hq, Lq, D = query.shape
    Lk = key.shape[2]
    starts, ends = spans
    q_rows, k_rows, cu_q, cu_k = [], [], [0], [0]
    for b in range(B):
        q_lo = max(starts[b], Lk - Lq) - (Lk - Lq)
        q_hi = max(ends[b] - (Lk - Lq), q_lo)
        q_rows += [b * Lq + i for i in range(q_lo, q_hi)]
        k_rows += [b * Lk + j for j in range(starts[b], ends[b])]
        cu_q.append(len(q_rows))
        cu_k.append(len(k_rows))
    dev = query.device
    qi, ki = torch.tensor(q_rows, device=dev, dtype=torch.long), torch.tensor(k_rows, device=dev, dtype=torch.long)
    qp = query.transpose(1, 2).reshape(B * Lq, Hq, D).index_select(0, qi)
    kp = key.transpose(1, 2).reshape(B * Lk, key.shape[1], D).index_select(0, ki)
    vp = value.transpose(1, 2).reshape(B * Lk, value.shape[1], D).index_select(0, ki)
    cq = torch.tensor(cu_q, dtype=torch.int32, device=dev)
    ck = torch.tensor(cu_k, dtype=torch.int32, device=dev)
    max_q = max((cu_q[i + 1] - cu_q[i] for i in range(B)), default=0)
    max_k = max((cu_k[i + 1] - cu_k[i] for i in range(B)), default=0)
    packed = flash_attn_varlen_func(qp, kp, vp, cq, ck, max(max_q, 1), max(max_k, 1),
                                    softmax_scale=scaling, causal=causal)
    out = torch.zeros(B * Lq, Hq, D, dtype=query.dtype, device=dev)
    out.index_copy_(0, qi, packed)
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
    if attention_mask.dim() == 4 and attention_mask.shape[-1] > key.shape[-2]:
        attention_mask = attention_mask[..., : key.shape[-2]]
    spans = _padding_spans(attention_mask, query.shape[2], causal)
    if spans is not None:
        return _varlen_padded(query, key, value, spans, scaling, causal), None
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
