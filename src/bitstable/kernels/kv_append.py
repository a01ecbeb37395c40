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
from .rotary import load_token, rotary_table_rows, store_token


@triton.jit
def _destination(SEQLENS, BATCH_IDX, BLOCK_TABLE, b, t, stride_bt, page_size,
                 n_new, max_before, num_rows, batch, LEFTPAD, max_pages,
                 PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, CHECK: tl.constexpr,
                 HAS_LEFTPAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """(pos, row, slot, ok) of new token ``t`` of batch row ``b``: its absolute position
    ``SEQLENS[b] + t``, the cache row (or page) and slot it goes to, and whether the row
    passed :func:`cache_row_ok` (True unless ``CHECK``)."""
    pos = tl.load(SEQLENS + b).to(tl.int64) + t
    ok = b >= 0
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
    return pos, row, slot, ok


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
    pos, row, slot, ok = _destination(SEQLENS, BATCH_IDX, BLOCK_TABLE, b, t, stride_bt, page_size,
                                      n_new, max_before, num_rows, batch, LEFTPAD, max_pages,
                                      PAGED, HAS_BATCH_IDX, CHECK, HAS_LEFTPAD, BLOCK_B, BLOCK_P)
    # every load before the first store (stores may alias later loads for the compiler, so
    # loads issued after a store wait for it)
    kv = _load_new_row(K_NEW, b, t, stride_knb, stride_knt, stride_knh, stride_knd, H, D, BLOCK_H, BLOCK_D)
    vv = _load_new_row(V_NEW, b, t, stride_vnb, stride_vnt, stride_vnh, stride_vnd, H, DV, BLOCK_H, BLOCK_D)
    _store_cache_row(K_CACHE, row, slot, stride_kcb, stride_kct, stride_kch, stride_kcd, kv, H, D, ok, BLOCK_H, BLOCK_D)
    _store_cache_row(V_CACHE, row, slot, stride_vcb, stride_vct, stride_vch, stride_vcd, vv, H, DV, ok, BLOCK_H, BLOCK_D)


@triton.jit
def _load_new_row(NEW, b, t, stride_b, stride_t, stride_h, stride_d, H, DIM,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """New key or value token (b, t) of NEW [B, n_new, H, DIM], as [BLOCK_H, BLOCK_D]
    (zeros past H and DIM)."""
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    return tl.load(NEW + b * stride_b + t * stride_t + offs_h * stride_h + offs_d * stride_d,
                   mask=(offs_h < H) & (offs_d < DIM))


@triton.jit
def _store_cache_row(CACHE, row, slot, stride_b, stride_t, stride_h, stride_d, x, H, DIM, ok,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """``x`` [BLOCK_H, BLOCK_D] into cache row ``row``, slot ``slot``: its first H heads and
    DIM columns, nothing unless ``ok``."""
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    tl.store(CACHE + row * stride_b + slot * stride_t + offs_h * stride_h + offs_d * stride_d,
             x, mask=(offs_h < H) & (offs_d < DIM) & ok)


@triton.jit
def kv_append_rotary_kernel(K_NEW, V_NEW, K_CACHE, V_CACHE, SEQLENS, BATCH_IDX, BLOCK_TABLE,
                            Q, Q_OUT, COS, SIN,
                            stride_knb, stride_knt, stride_knh, stride_knd,
                            stride_vnb, stride_vnt, stride_vnh, stride_vnd,
                            stride_kcb, stride_kct, stride_kch, stride_kcd,
                            stride_vcb, stride_vct, stride_vch, stride_vcd,
                            stride_qb, stride_qt, stride_qh, stride_qd,
                            stride_ob, stride_ot, stride_oh, stride_cs,
                            stride_bt, page_size, H, HQ, D, DV, HALF, seqlen_ro,
                            n_new, max_before, num_rows, batch, LEFTPAD, max_pages,
                            BLOCK_H: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_HALF: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
                            INTERLEAVED: tl.constexpr, PASS_THROUGH: tl.constexpr,
                            ROTATE_Q: tl.constexpr, Q_ALONG: tl.constexpr,
                            CHECK: tl.constexpr = False, HAS_LEFTPAD: tl.constexpr = False,
                            BLOCK_B: tl.constexpr = 1, BLOCK_P: tl.constexpr = 1):
    """:func:`kv_append_kernel` with ``flash_attn_with_kvcache``'s rotary in the same launch:
    new key token (b, t) is rotated at its position ``SEQLENS[b] + t`` as it is written
    (kernels/rotary.py's functions: rotary_kernel's bits), and, with ``ROTATE_Q``, query
    token (b, t) of Q [B, n_new, HQ, D] is rotated into Q_OUT at ``SEQLENS[b] + t``
    (``Q_ALONG``) or ``SEQLENS[b]``.  The query is rotated whether or not the row passed
    its checks (as the separate rotary launch does: a failing row's outputs are NaN
    anyway).  Launch with FMA contraction off."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    pos, row, slot, ok = _destination(SEQLENS, BATCH_IDX, BLOCK_TABLE, b, t, stride_bt, page_size,
                                      n_new, max_before, num_rows, batch, LEFTPAD, max_pages,
                                      PAGED, HAS_BATCH_IDX, CHECK, HAS_LEFTPAD, BLOCK_B, BLOCK_P)
    # every load before the first store (see kv_append_kernel)
    k1, k2, k_rest = load_token(K_NEW + b * stride_knb + t * stride_knt, stride_knh, stride_knd, H, D, HALF,
                                BLOCK_H, BLOCK_HALF, BLOCK_D, INTERLEAVED, PASS_THROUGH)
    vv = _load_new_row(V_NEW, b, t, stride_vnb, stride_vnt, stride_vnh, stride_vnd, H, DV, BLOCK_H, BLOCK_D)
    if ROTATE_Q:
        q1, q2, q_rest = load_token(Q + b * stride_qb + t * stride_qt, stride_qh, stride_qd, HQ, D, HALF,
                                    BLOCK_HQ, BLOCK_HALF, BLOCK_D, INTERLEAVED, PASS_THROUGH)
    c, s = rotary_table_rows(COS, SIN, pos, stride_cs, HALF, seqlen_ro, BLOCK_HALF)
    if ROTATE_Q:
        if Q_ALONG:
            qc, qs = c, s
        else:
            qc, qs = rotary_table_rows(COS, SIN, pos - t, stride_cs, HALF, seqlen_ro, BLOCK_HALF)
    store_token(K_CACHE + row * stride_kcb + slot * stride_kct, stride_kch, stride_kcd, k1, k2, k_rest,
                c, s, H, D, HALF, ok, BLOCK_H, BLOCK_HALF, BLOCK_D, INTERLEAVED, PASS_THROUGH)
    _store_cache_row(V_CACHE, row, slot, stride_vcb, stride_vct, stride_vch, stride_vcd, vv, H, DV, ok, BLOCK_H, BLOCK_D)
    if ROTATE_Q:
        store_token(Q_OUT + b * stride_ob + t * stride_ot, stride_oh, 1, q1, q2, q_rest,
                    qc, qs, HQ, D, HALF, True, BLOCK_HQ, BLOCK_HALF, BLOCK_D, INTERLEAVED, PASS_THROUGH)
