"""Validation of ``flash_attn_with_kvcache``'s arguments: every check, before the cache is
touched (a call that raises leaves the cache bit for bit as it was).  Errors name the
argument as the caller wrote it (``k_cache``, ``cache_seqlens``, ...)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..._backend import cdiv
from ..validation import check_options, check_qkv, normalize_window


class CacheCapacityError(ValueError, RuntimeError):
    """A call needs more cache slots than the cache (or its block table) gives.  A
    ValueError, as bitstable's other bad values, and a RuntimeError, what flash-attn raises
    for it: code written against either catches it."""


def _check_int32_vector(name: str, t, length: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected q's device {device}")
    return t


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def host_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read on the host without a device sync: a CPU tensor.
    Lengths, batch indices, page tables and left pads on a GPU are checked on the device
    instead (kernels/cache_checks.py), so a decode step never waits for the GPU."""
    return t.device.type == "cpu"


def check_cache_args(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table,
                     read_device_values: bool = False):
    """Check everything before the cache is touched; returns (seqlens_before [B] int32 tensor
    on q's device, their host list or None, the new-token count, page size or 0, whether
    some value checks are left to the device).

    Value checks (lengths against the cache, page ids, cache_batch_idx) run on the host
    where the values are there for free: ``cache_seqlens`` an int or a CPU tensor (and CPU
    ``cache_batch_idx`` / ``block_table``).  Values that live on the GPU are never read
    back (no sync per decode step): the kernels check them instead (kernels/cache_checks.py):
    a row that fails writes nothing into the cache and gets NaN outputs and lse.  One
    exception, flash-attn's own: a paged cache with GPU lengths reads their maximum back
    (one sync) and raises if it overflows the block table (pass the lengths as an int or a
    CPU tensor to avoid that sync).  Shapes,
    dtypes and devices are always checked on the host, before anything is written.
    ``read_device_values``: read GPU values too (the stock path, which syncs anyway).
    """
    readable = (lambda t: True) if read_device_values else host_readable
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError("q must be a 4-d tensor (batch, seqlen_q, heads, headdim)")
    B = q.shape[0]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor (batch_or_pages, seqlen_or_page_size, "
                             f"heads_k, headdim)")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must have the same shape but for the head dim (v_cache's "
                         f"may be smaller), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    # dtype / device / head checks through the dense validator, under the caller's names
    # (the cache's first dim is its rows or pages, not q's batch).
    check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"), check_batch=False, any_head_dim=True)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    n_new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if (k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[0] != B
                or k.shape[2:] != k_cache.shape[2:] or v.shape[2:] != v_cache.shape[2:]):
            raise ValueError(f"k/v must have shape (batch={B}, seqlen_new, heads_k={k_cache.shape[2]}, "
                             f"headdim={k_cache.shape[3]} / {v_cache.shape[3]}), got k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise TypeError(f"k/v dtype must match the cache's {k_cache.dtype}, got {k.dtype}/{v.dtype}")
        if k.device != q.device or v.device != q.device:
            raise ValueError(f"k/v must be on q's device {q.device}")
        n_new = k.shape[1]
    if cache_seqlens is None:
        cache_seqlens = 0
    host = None
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        host = [cache_seqlens] * B
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.device.type == "cpu" \
            and q.device.type != "cpu":
        _check_int32_vector("cache_seqlens", cache_seqlens, B, cache_seqlens.device)
        host = cache_seqlens.tolist()
        cache_seqlens = cache_seqlens.to(q.device, non_blocking=True)
    _check_int32_vector("cache_seqlens", cache_seqlens, B, q.device)
    capturing = _capturing(q.device)
    if host is None and not capturing and readable(cache_seqlens):
        host = cache_seqlens.tolist()
    before = host
    on_device = before is None      # some value checks are the kernels' (kernels/cache_checks.py)
    if before is not None and min(before, default=0) < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {before}")
    totals = [s + n_new for s in before] if before is not None else None

    page_size = 0
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (paged cache)")
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
            raise TypeError("block_table must be an int32 tensor (batch, max_pages_per_sequence)")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must have shape ({B}, max_pages), got {tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table is on {block_table.device}, expected {q.device}")
        page_size = k_cache.shape[1]
        if page_size % 16 != 0:
            raise ValueError(f"page size (k_cache.shape[1]) must be a multiple of 16, got {page_size}")
        capacity = block_table.shape[1] * page_size
        for b, total in enumerate(totals or ()):
            if total > capacity:
                raise CacheCapacityError(f"cache too small: sequence {b} needs {total} slots after the "
                                         f"append, block_table gives {capacity}")
        if totals is None and not capturing and B > 0:
            # flash-attn's own guard for paged caches, and its one sync: the longest length
            # against the table's width (the page ids stay the kernels' to check).
            longest = int(cache_seqlens.max()) + n_new
            if longest > capacity:
                raise CacheCapacityError(f"cache too small: the longest sequence needs {longest} slots after "
                                         f"the append, block_table gives {capacity}")
        if totals is None or capturing or not readable(block_table):
            return cache_seqlens, before, n_new, page_size, True
        table = block_table.tolist()
        for b, total in enumerate(totals):
            used = table[b][: cdiv(total, page_size)]
            if any(p < 0 or p >= k_cache.shape[0] for p in used):
                raise ValueError(f"block_table row {b} names pages outside [0, {k_cache.shape[0]}): {used}")
    else:
        if cache_batch_idx is not None:
            _check_int32_vector("cache_batch_idx", cache_batch_idx, B, q.device)
            if capturing or not readable(cache_batch_idx):
                on_device = True
            else:
                idx = cache_batch_idx.tolist()
                if any(i < 0 or i >= k_cache.shape[0] for i in idx):
                    raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]}), got {idx}")
                if n_new > 0 and len(set(idx)) != len(idx):
                    rows = sorted({i for i in idx if idx.count(i) > 1})
                    raise ValueError(f"cache_batch_idx names cache rows {rows} for more than one batch row "
                                     f"while k/v append new tokens (they would overwrite each other), got {idx}")
        elif k_cache.shape[0] < B:
            raise ValueError(f"k_cache has {k_cache.shape[0]} rows for a batch of {B}")
        for b, total in enumerate(totals or ()):
            if total > k_cache.shape[1]:
                raise CacheCapacityError(f"cache too small: sequence {b} needs {total} slots after the "
                                         f"append, the cache holds {k_cache.shape[1]}")
    return cache_seqlens, before, n_new, page_size, on_device


def check_num_splits(num_splits) -> None:
    """``num_splits`` (flash-attn's split count; ignored by bitstable) must be an int >= 0."""
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0: flash-attn's heuristic), got {num_splits}")


def check_cache_leftpad(cache_leftpad, before, B: int, device, paged: bool) -> Optional[torch.Tensor]:
    """``cache_leftpad`` checked: None, or int32 (batch,) on q's device with ``0 <= leftpad[b]
    <= cache_seqlens[b]`` (values checked on the host when both are there for free, else by
    the kernels); contiguous caches only (flash-attn has no paged left padding either)."""
    if cache_leftpad is None:
        return None
    _check_int32_vector("cache_leftpad", cache_leftpad, B, device)
    if paged:
        raise NotImplementedError("cache_leftpad cannot be combined with block_table (paged cache), as in "
                                  "flash-attn; nothing was written")
    if before is not None:
        pads = cache_leftpad.tolist()
        bad = [b for b, (p, s) in enumerate(zip(pads, before)) if not 0 <= p <= s]
        if bad:
            raise ValueError(f"cache_leftpad must be in [0, cache_seqlens] per row (the keys of row b are "
                             f"cache positions leftpad[b] .. cache_seqlens[b] + seqlen_new - 1), got "
                             f"cache_leftpad {pads} for cache_seqlens {before}")
    return cache_leftpad.contiguous()


class CheckedCall(NamedTuple):
    """A validated call: ``cache_seqlens`` [B] int32 on q's device (contiguous), ``before``
    (their host list, or None inside CUDA-graph capture), ``n_new`` (tokens appended),
    ``page_size`` (0: contiguous cache), ``capacity`` (keys a row can hold), the resolved
    ``softmax_scale`` and the normalised window ``left``/``right`` (-1: unbounded;
    causal is right = 0), and the contiguous ``cache_batch_idx``/``block_table``/``cache_leftpad``
    (row b's keys are cache positions ``cache_leftpad[b]`` on; None: 0).  ``device_checks``:
    some value checks were not made on the host (values on the GPU, or a CUDA graph being
    captured): the kernels make them (kernels/cache_checks.py)."""

    cache_seqlens: torch.Tensor
    before: Optional[list]
    n_new: int
    page_size: int
    capacity: int
    softmax_scale: float
    left: int
    right: int
    cache_batch_idx: Optional[torch.Tensor]
    block_table: Optional[torch.Tensor]
    cache_leftpad: Optional[torch.Tensor] = None
    device_checks: bool = False


def validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale,
             causal, window_size, softcap, alibi_slopes, cache_leftpad=None,
             read_device_values: bool = False) -> CheckedCall:
    """Every argument check of ``flash_attn_with_kvcache`` (the split size is checked with
    the plan, also before the append); ``read_device_values``: as :func:`check_cache_args`."""
    cache_seqlens, before, n_new, page_size, on_device = check_cache_args(
        q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, read_device_values)
    if cache_leftpad is not None and not (read_device_values or host_readable(cache_leftpad)):
        on_device = True
        cache_leftpad = check_cache_leftpad(cache_leftpad, None, q.shape[0], q.device, block_table is not None)
    else:
        cache_leftpad = check_cache_leftpad(cache_leftpad, before, q.shape[0], q.device, block_table is not None)
    softmax_scale, left, right = check_options(q, 0.0, softmax_scale, window_size, softcap, alibi_slopes)
    capacity = block_table.shape[1] * page_size if block_table is not None else k_cache.shape[1]
    left, right = normalize_window(causal, left, right, max(capacity, 1))
    return CheckedCall(cache_seqlens.contiguous(), before, n_new, page_size, capacity, softmax_scale, left,
                       right, None if cache_batch_idx is None else cache_batch_idx.contiguous(),
                       None if block_table is None else block_table.contiguous(), cache_leftpad, on_device)
