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
* a padding / custom mask: SDPA's math path on the batch-invariant ops (a row's bits do not
  depend on its batch while ``set_batch_invariant_mode`` is on).

Query layout from transformers: [B, Hq, L, D]; the returned output is [B, L, Hq, D].
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..attention import flash_attn_func, flash_attn_with_kvcache
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
