"""Append new keys/values to a KV cache in place (contiguous, batch-indexed or paged)."""

from __future__ import annotations


from ..._backend import next_power_of_2
from ...kernels.kv_append import kv_append_kernel
from ..._launch import launch


def append(k_cache, v_cache, k, v, seqlens_before, cache_batch_idx, block_table, page_size, *,
           device_checks: bool = False, max_before: int = 0, cache_leftpad=None):
    """Write the new tokens into the cache in place (each slot written once: no reduction),
    one kernel launch (kernels/kv_append.py).  ``seqlens_before`` [B] int32 on the cache's
    device; nothing is read on the host.  ``device_checks``: the values were not checked
    on the host; a row failing kernels/cache_checks.py's rule (``max_before``: the largest
    valid ``seqlens_before``; ``cache_leftpad``: the rows' left pads or None) writes nothing."""
    B, n_new, Hk, D = k.shape
    Dv = v.shape[3]
    bt = block_table if block_table is not None else seqlens_before
    bidx = cache_batch_idx if cache_batch_idx is not None else seqlens_before
    checks = {}
    if device_checks:
        checks = dict(CHECK=True, HAS_LEFTPAD=cache_leftpad is not None, BLOCK_B=next_power_of_2(B),
                      BLOCK_P=next_power_of_2(bt.shape[1]) if block_table is not None else 1)
    launch(kv_append_kernel, (B, n_new),
        k, v, k_cache, v_cache, seqlens_before, bidx, bt, *k.stride(), *v.stride(),
        *k_cache.stride(), *v_cache.stride(), bt.stride(0) if block_table is not None else 0,
        max(page_size, 1), Hk, D, Dv, n_new, max_before, k_cache.shape[0], B,
        cache_leftpad if cache_leftpad is not None else seqlens_before,
        bt.shape[1] if block_table is not None else 0,
        BLOCK_H=next_power_of_2(Hk), BLOCK_D=next_power_of_2(max(D, Dv)),
        PAGED=block_table is not None, HAS_BATCH_IDX=cache_batch_idx is not None, **checks)
