"""Append new keys/values to a KV cache in place (contiguous, batch-indexed or paged)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..._backend import next_power_of_2
from ...kernels.kv_append import kv_append_kernel, kv_append_rotary_kernel
from ..._launch import launch
from ..rotary import rotary_tables


class AppendRotary(NamedTuple):
    """The rotary an append applies on the way (kernels/kv_append.py's rotary kernel): the
    tables [seqlen_ro, rotary_dim / 2], the pair layout, and the query to rotate in the same
    launch (q [B, n_new, Hq, D], or None), at ``cache_seqlens + t`` when ``q_along`` (causal
    or windowed) else at ``cache_seqlens``."""
    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool
    q: Optional[torch.Tensor]
    q_along: bool


def append(k_cache, v_cache, k, v, seqlens_before, cache_batch_idx, block_table, page_size, *,
           device_checks: bool = False, max_before: int = 0, cache_leftpad=None,
           rotary: Optional[AppendRotary] = None) -> Optional[torch.Tensor]:
    """Write the new tokens into the cache in place (each slot written once: no reduction),
    one kernel launch (kernels/kv_append.py).  ``seqlens_before`` [B] int32 on the cache's
    device; nothing is read on the host.  ``device_checks``: the values were not checked
    on the host; a row failing kernels/cache_checks.py's rule (``max_before``: the largest
    valid ``seqlens_before``; ``cache_leftpad``: the rows' left pads or None) writes nothing.
    ``rotary``: the new keys are rotated as they are written, bit for bit what
    attention/rotary.py's ``rotate`` gives, and ``rotary.q`` too; returns the rotated q (a
    new contiguous tensor) or None.  One launch either way."""
    B, n_new, Hk, D = k.shape
    Dv = v.shape[3]
    bt = block_table if block_table is not None else seqlens_before
    bidx = cache_batch_idx if cache_batch_idx is not None else seqlens_before
    checks = {}
    if device_checks:
        checks = dict(CHECK=True, HAS_LEFTPAD=cache_leftpad is not None, BLOCK_B=next_power_of_2(B),
                      BLOCK_P=next_power_of_2(bt.shape[1]) if block_table is not None else 1)
    common = (bt.stride(0) if block_table is not None else 0, max(page_size, 1))
    tail = (n_new, max_before, k_cache.shape[0], B, cache_leftpad if cache_leftpad is not None else seqlens_before,
            bt.shape[1] if block_table is not None else 0)
    flags = dict(PAGED=block_table is not None, HAS_BATCH_IDX=cache_batch_idx is not None, **checks)
    if rotary is None:
        launch(kv_append_kernel, (B, n_new),
            k, v, k_cache, v_cache, seqlens_before, bidx, bt, *k.stride(), *v.stride(),
            *k_cache.stride(), *v_cache.stride(), *common, Hk, D, Dv, *tail,
            BLOCK_H=next_power_of_2(Hk), BLOCK_D=next_power_of_2(max(D, Dv)), **flags)
        return None
    cos, sin = rotary_tables(rotary.cos, rotary.sin)
    half = cos.shape[1]
    q = rotary.q
    if q is not None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        q_strides, o_strides, Hq = q.stride(), q_out.stride()[:3], q.shape[2]
    else:
        q, q_out, q_strides, o_strides, Hq = k, k, (0, 0, 0, 0), (0, 0, 0), 1
    launch(kv_append_rotary_kernel, (B, n_new),
        k, v, k_cache, v_cache, seqlens_before, bidx, bt, q, q_out, cos, sin,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *q_strides, *o_strides,
        cos.stride(0), *common, Hk, Hq, D, Dv, half, cos.shape[0], *tail,
        BLOCK_H=next_power_of_2(Hk), BLOCK_HQ=next_power_of_2(Hq), BLOCK_D=next_power_of_2(max(D, Dv)),
        BLOCK_HALF=next_power_of_2(half), INTERLEAVED=bool(rotary.interleaved), PASS_THROUGH=2 * half < D,
        ROTATE_Q=rotary.q is not None, Q_ALONG=bool(rotary.q_along), enable_fp_fusion=False, **flags)
    return q_out if rotary.q is not None else None
