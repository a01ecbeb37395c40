"""Append new keys/values to a KV cache in place: one program per (batch row, new token).

A pure copy (each cache slot written once, no arithmetic), so it changes no bits; it
replaces the advanced-indexing assignment (several small device ops and their host
dispatch per call) with one launch.  Contiguous caches take row ``BATCH_IDX[b]`` (or
``b``) at slot ``SEQLENS[b] + t``; paged caches take page
``BLOCK_TABLE[b, pos // page_size]`` at slot ``pos % page_size``.  Nothing is read on
the host, so the launch captures in CUDA graphs.  ``CHECK``: the row's values were not
checked on the host; a row failing :func:`cache_row_ok` writes nothing.
"""

import triton
import triton.language as tl

from .cache_checks import cache_row_ok


@triton.jit
def kv_append_kernel(K_NEW, V_NEW, K_CACHE, V_CACHE, SEQLENS, BATCH_IDX, BLOCK_TABLE,
                     stride_knb, stride_knt, stride_knh, stride_knd,
                     stride_vnb, stride_vnt, stride_vnh, stride_vnd,
                     stride_kcb, stride_kct, stride_kch, stride_kcd,
                     stride_vcb, stride_vct, stride_vch, stride_vcd,
                     stride_bt, page_size, H, D, DV,
                     n_new, max_before, num_rows, batch, LEFTPAD, max_pages,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, CHECK: tl.constexpr = False,
                     HAS_LEFTPAD: tl.constexpr = False, BLOCK_B: tl.constexpr = 1,
                     BLOCK_P: tl.constexpr = 1):
    """Grid (batch, new tokens).  k new [B, n_new, H, D], v new [B, n_new, H, DV]; caches
    [rows or pages (``num_rows`` of them), slots, H, D or DV]; BLOCK_D >= max(D, DV).
    ``CHECK``: see the module docstring (``max_before``, ``batch``, ``LEFTPAD``,
    ``max_pages``, ``BLOCK_B``, ``BLOCK_P``: kernels/cache_checks.py's arguments)."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    pos = tl.load(SEQLENS + b).to(tl.int64) + t
    ok = True
    if CHECK:
        ok = cache_row_ok(SEQLENS, b, n_new, max_before, BATCH_IDX, num_rows, batch, LEFTPAD,
                          BLOCK_TABLE, stride_bt, page_size, max_pages,
                          HAS_BATCH_IDX, HAS_LEFTPAD, PAGED, BLOCK_B, BLOCK_P)
    if PAGED:
        row = tl.load(BLOCK_TABLE + b * stride_bt + pos // page_size).to(tl.int64)
        slot = pos % page_size
    else:
        if HAS_BATCH_IDX:
            row = tl.load(BATCH_IDX + b).to(tl.int64)
        else:
            row = b
        slot = pos
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < H) & (offs_d < D) & ok
    mask_v = (offs_h < H) & (offs_d < DV) & ok
    kv = tl.load(K_NEW + b * stride_knb + t * stride_knt + offs_h * stride_knh + offs_d * stride_knd,
                 mask=mask)
    tl.store(K_CACHE + row * stride_kcb + slot * stride_kct + offs_h * stride_kch + offs_d * stride_kcd,
             kv, mask=mask)
    vv = tl.load(V_NEW + b * stride_vnb + t * stride_vnt + offs_h * stride_vnh + offs_d * stride_vnd,
                 mask=mask_v)
    tl.store(V_CACHE + row * stride_vcb + slot * stride_vct + offs_h * stride_vch + offs_d * stride_vcd,
             vv, mask=mask_v)
