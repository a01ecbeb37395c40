"""``flash_attn_with_kvcache``: decode and chunked prefill against a KV cache.

New keys/values are appended in place at ``cache_seqlens``; the queries then
attend to the cache through the split-KV kernels (attention_decode), whose
output is bitwise the output the full-sequence ``flash_attn_func`` gives the
same query at the same absolute position.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton

from .. import _poison as poison
from .._backend import interpreting
from ..configs import DECODE_COMBINE_TILE, arch_key, attention_config, padded_head_dim
from ..kernels.kv_append import kv_append_kernel
from ..kernels.attention_decode import attention_split_combine_kernel, attention_split_partial_kernel
from ..mode import get_deterministic_mode
from .decode_wgmma import launch_partial_wgmma, table_stages, wgmma_decode_eligible
from .launch import alibi_args, compute_dtype, kv_descriptors, resolve_split_size, score_scales
from .validation import check_options, check_qkv, last_dim_contiguous, normalize_window


#: Offline exploration only (benchmarks/explore_decode.py): launch options of the
#: partial kernel forced over the table's: ``stages``, ``tile`` (block_m, num_warps),
#: ``even_d`` (False: masked-d scalar loads), and the combine kernel's
#: ``combine`` (block_m, num_warps), ``tma`` (False: whole blocks through per-thread
#: copies too), ``pdl`` (False: the combine kernel launches after the partial kernel
#: ends instead of as its programmatic dependent), ``wgmma`` (False: never the Gluon
#: one-token kernel; True: wherever it can run, also for grids of more waves than the table
#: gives it and head dims the table leaves to the Triton kernel, with 4 stages unless
#: ``stages``).
#: All launch-only (same bits).
_DECODE_LAUNCH_OVERRIDE: dict = {}


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


def _validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table):
    """Check everything before the cache is touched; returns (seqlens_before [B] int32 tensor
    on q's device, their host list or None, the new-token count, page size or 0).

    Value checks (lengths against the cache, page ids, cache_batch_idx) read the
    values on the host: free when ``cache_seqlens`` is an int or a CPU tensor, one
    device sync for a device tensor, and skipped while a CUDA graph is being
    captured (nothing can be read then; shapes and dtypes are still checked).
    """
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
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    # dtype / device / head checks through the dense validator, under the caller's names
    # (the cache's first dim is its rows or pages, not q's batch).
    check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"), check_batch=False)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    n_new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if k.dim() != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k/v must have shape (batch={B}, seqlen_new, heads_k={k_cache.shape[2]}, "
                             f"headdim={k_cache.shape[3]}), got k {tuple(k.shape)}, v {tuple(v.shape)}")
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
    check_values = not _capturing(q.device)
    if host is None and check_values:
        host = cache_seqlens.tolist()
    before = host
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
                raise ValueError(f"cache too small: sequence {b} needs {total} slots after the append, "
                                 f"block_table gives {capacity}")
        # Check the pages in use on the device (the table can be large; copy only a verdict).
        if totals is None:
            return cache_seqlens, before, n_new, page_size
        pages_used = torch.tensor([triton.cdiv(t, page_size) for t in totals], device=q.device)
        in_use = torch.arange(block_table.shape[1], device=q.device)[None, :] < pages_used[:, None]
        bad = in_use & ((block_table < 0) | (block_table >= k_cache.shape[0]))
        if bool(bad.any()):
            b = int(bad.any(dim=1).nonzero()[0])
            used = block_table[b, : int(pages_used[b])].tolist()
            raise ValueError(f"block_table row {b} names pages outside [0, {k_cache.shape[0]}): {used}")
    else:
        if cache_batch_idx is not None:
            _check_int32_vector("cache_batch_idx", cache_batch_idx, B, q.device)
            idx = cache_batch_idx.tolist() if check_values else []
            if any(i < 0 or i >= k_cache.shape[0] for i in idx):
                raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]}), got {idx}")
            if n_new > 0 and len(set(idx)) != len(idx):
                rows = sorted({i for i in idx if idx.count(i) > 1})
                raise ValueError(f"cache_batch_idx names cache rows {rows} for more than one batch row while "
                                 f"k/v append new tokens (they would overwrite each other), got {idx}")
        elif k_cache.shape[0] < B:
            raise ValueError(f"k_cache has {k_cache.shape[0]} rows for a batch of {B}")
        for b, total in enumerate(totals or ()):
            if total > k_cache.shape[1]:
                raise ValueError(f"cache too small: sequence {b} needs {total} slots after the append, "
                                 f"the cache holds {k_cache.shape[1]}")
    return cache_seqlens, before, n_new, page_size


def _append(k_cache, v_cache, k, v, seqlens_before, cache_batch_idx, block_table, page_size):
    """Write the new tokens into the cache in place (each slot written once: no reduction),
    one kernel launch (kernels/kv_append.py).  ``seqlens_before`` [B] int32 on the cache's
    device; nothing is read on the host."""
    B, n_new, Hk, D = k.shape
    bt = block_table if block_table is not None else seqlens_before
    bidx = cache_batch_idx if cache_batch_idx is not None else seqlens_before
    kv_append_kernel[(B, n_new)](
        k, v, k_cache, v_cache, seqlens_before, bidx, bt, *k.stride(), *v.stride(),
        *k_cache.stride(), *v_cache.stride(), bt.stride(0) if block_table is not None else 0,
        max(page_size, 1), Hk, D, BLOCK_H=triton.next_power_of_2(Hk), BLOCK_D=triton.next_power_of_2(D),
        PAGED=block_table is not None, HAS_BATCH_IDX=cache_batch_idx is not None)


def _stock_kvcache(q, k_cache, v_cache, totals, cache_batch_idx, block_table, page_size,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, need_lse=True):
    """Stock PyTorch: one SDPA call over the batch's caches padded to the longest, with a
    mask of each row's valid, visible keys (eager math for softcap)."""
    B, Lq, Hq, D = q.shape
    Hk = k_cache.shape[2]
    L = max(max(totals, default=0), 1)
    dev = q.device
    if block_table is not None:
        pages = block_table[:, : triton.cdiv(L, page_size)].long()
        keys = k_cache[pages].reshape(B, -1, Hk, D)[:, :L]
        vals = v_cache[pages].reshape(B, -1, Hk, D)[:, :L]
    else:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(B, device=dev)
        keys, vals = k_cache[rows, :L], v_cache[rows, :L]
    lens = torch.tensor(totals, device=dev)
    pos_q = torch.arange(Lq, device=dev)[None, :, None] + (lens[:, None, None] - Lq)   # B, Lq, 1
    pos_k = torch.arange(L, device=dev)[None, None, :]
    ok = (pos_k < lens[:, None, None]).expand(B, Lq, L)
    left, right = window_size
    if causal:
        right = 0
    if right >= 0:
        ok = ok & (pos_k <= pos_q + right)
    if left >= 0:
        ok = ok & (pos_k >= pos_q - left)
    s = None
    if softcap > 0 or alibi_slopes is not None:
        qh = q.float().transpose(1, 2)
        kh = keys.float().transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
        vh = vals.float().transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
        s = qh @ kh.transpose(-1, -2) * softmax_scale
        if softcap > 0:
            s = torch.tanh(s / softcap) * softcap
        if alibi_slopes is not None:
            sl = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(B, Hq)
            s = s - sl[:, :, None, None] * (pos_q - pos_k).abs()[:, None].float()
        s = s.masked_fill(~ok[:, None], float("-inf"))
        out = (torch.softmax(s, -1) @ vh).transpose(1, 2).to(q.dtype)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=ok[:, None],
            scale=softmax_scale, enable_gqa=Hq != Hk).transpose(1, 2)
    if not need_lse:
        return out, None
    if s is None:
        qh = q.float().transpose(1, 2)
        kh = keys.float().transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
        s = (qh @ kh.transpose(-1, -2) * softmax_scale).masked_fill(~ok[:, None], float("-inf"))
    return out, torch.logsumexp(s, dim=-1)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                            cache_seqlens: Union[int, torch.Tensor, None] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            block_table: Optional[torch.Tensor] = None,
                            softmax_scale: Optional[float] = None, causal: bool = False,
                            window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            alibi_slopes: Optional[torch.Tensor] = None,
                            split_size: Optional[int] = None, return_softmax_lse: bool = False):
    """Attention of new queries against a KV cache, appending new keys/values first.

    Args (flash-attn's names and meanings):
        q: (batch, seqlen_q, nheads, headdim): the new tokens' queries.
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with
            ``block_table`` (num_pages, page_size, nheads_k, headdim), page_size a
            multiple of 16.
        k, v: optional (batch, seqlen_new, nheads_k, headdim), written in place
            into the cache at ``cache_seqlens`` before the attention.
        cache_seqlens: int or int32 (batch,): tokens already in each cache row.
        cache_batch_idx: int32 (batch,): which cache row each batch row uses.
        block_table: int32 (batch, max_pages): the pages of each sequence.
        split_size: keys per split (default: the deterministic mode's); a
            different split size is a different reduction order.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as
            :func:`flash_attn_func` (causal aligned bottom-right: query ``i``
            sits at position ``cache_seqlens + seqlen_new - seqlen_q + i``).
    Returns out (batch, seqlen_q, nheads, headdim), and the lse (batch, nheads,
    seqlen_q) float32 if ``return_softmax_lse``.

    Invariance: a query's output is bitwise what ``flash_attn_func`` gives it in
    the full-sequence forward with the same keys and positions, whatever the
    chunking, the cache layout (contiguous or paged, any page size) or the
    other requests in the batch.  Bad input raises before the cache is touched.
    """
    # Every check (arguments, options, window, split size, config) comes before the
    # append: a call that raises leaves the cache bit for bit as it was.
    cache_seqlens, before, n_new, page_size = _validate(q, k_cache, v_cache, k, v, cache_seqlens,
                                                         cache_batch_idx, block_table)
    softmax_scale, left, right = check_options(q, 0.0, softmax_scale, window_size, softcap,
                                               alibi_slopes)
    B, Lq, Hq, D = q.shape
    Hk = k_cache.shape[2]
    capacity = block_table.shape[1] * page_size if block_table is not None else k_cache.shape[1]
    left, right = normalize_window(causal, left, right, max(capacity, 1))
    deterministic = get_deterministic_mode().enabled
    if not deterministic and before is None:
        raise RuntimeError("the stock (non-deterministic) KV-cache path reads cache_seqlens on the "
                           "host and cannot run inside CUDA graph capture")
    arch = arch_key(q.device)
    cfg = attention_config(arch, q.dtype, D)
    split = resolve_split_size(cfg.block_n, split_size)
    cache_seqlens = cache_seqlens.contiguous()
    if cache_batch_idx is not None:
        cache_batch_idx = cache_batch_idx.contiguous()
    if block_table is not None:
        block_table = block_table.contiguous()
    if k is not None and n_new > 0 and B > 0:
        _append(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, page_size)

    if not deterministic:
        totals = [s + n_new for s in before]
        out, lse = _stock_kvcache(q, k_cache, v_cache, totals, cache_batch_idx, block_table,
                                  page_size, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  need_lse=return_softmax_lse)
        return (out, lse) if return_softmax_lse else out
    q = last_dim_contiguous(q)
    k_cache_c, v_cache_c = last_dim_contiguous(k_cache), last_dim_contiguous(v_cache)
    HD = padded_head_dim(D)
    # Splits launched: for the longest sequence when the lengths were read on the host,
    # else (CUDA-graph capture) for the cache's capacity.  Splits past a row's length do
    # nothing and the combine kernel merges only the splits that hold keys: the grid
    # changes no bits, and the workspace stays sized by the keys actually cached.
    longest = max(before, default=0) + n_new if before is not None else capacity
    num_splits = max(triton.cdiv(max(longest, 1), split), 1)
    force = _DECODE_LAUNCH_OVERRIDE
    dec_m, dec_w = force.get("tile") or (cfg.decode_block_m or cfg.block_m,
                                         cfg.decode_num_warps or cfg.num_warps)
    even_d = force.get("even_d", HD == D) and HD == D
    num_m_tiles = triton.cdiv(max(Lq, 1) * (Hq // Hk), dec_m)   # GQA heads packed as rows
    out = torch.empty((B, Lq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    ws_acc = torch.empty((num_splits, B, Hq, Lq, HD), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((num_splits, B, Hq, Lq, 2), dtype=torch.float32, device=q.device)
    poison.fill(out, lse, ws_acc, ws_ml)
    if B == 0 or Lq == 0 or Hq == 0:
        return (out, lse) if return_softmax_lse else out
    qk_scale, softcap_scaled = score_scales(softmax_scale, softcap)
    alibi, stride_alibi_b = alibi_args(alibi_slopes, lse)
    bt = block_table if block_table is not None else cache_seqlens
    bidx = cache_batch_idx if cache_batch_idx is not None else cache_seqlens
    # The combine kernel launches as the partial kernel's programmatic dependent on Hopper
    # (its launch overlaps the partial kernel's tail); launch-only.
    pdl = force.get("pdl", True) and arch == "sm90"
    want_tma = force.get("tma", cfg.tma)
    # One query token on Hopper, grids of few waves: the Gluon kernel that overlaps the
    # tensor-core products with the softmax (same bits as the Triton kernel below).
    use_wgmma = force.get("wgmma")   # None: the table's choice; forced: 4 stages
    if use_wgmma is None:
        wgmma_stages = table_stages(cfg.decode_wgmma_waves, num_splits * B * Hk, q.device)
    else:
        wgmma_stages = 4 if use_wgmma else 0
    if want_tma and wgmma_stages and wgmma_decode_eligible(
            q, k_cache_c, v_cache_c, arch=arch, head_dim=D, head_dim_tile=HD, group=Hq // Hk,
            block_m=dec_m, block_n=cfg.block_n, num_warps=dec_w, paged=block_table is not None,
            softcap=softcap, has_alibi=alibi_slopes is not None, left=left, right=right):
        launch_partial_wgmma(q, k_cache_c, v_cache_c, ws_acc, ws_ml, cache_seqlens, cache_batch_idx,
                             num_splits=num_splits, split_blocks=split // cfg.block_n, block_m=dec_m,
                             block_n=cfg.block_n, stages=force.get("stages") or wgmma_stages,
                             n_new=n_new, qk_scale=qk_scale, pdl=pdl)
        _launch_combine(ws_acc, ws_ml, out, lse, cache_seqlens, split, n_new, HD, arch, pdl=pdl, force=force)
        return (out, lse) if return_softmax_lse else out
    # Whole key blocks through the copy engine where the layout allows it (16-byte
    # aligned strides, pages holding whole blocks).
    k_desc, v_desc, use_tma = kv_descriptors(
        k_cache_c, v_cache_c, cfg.block_n, HD,
        want_tma and even_d and (block_table is None or page_size % cfg.block_n == 0))
    attention_split_partial_kernel[(num_splits * num_m_tiles, B * Hk)](
        q, k_cache_c, v_cache_c, k_desc, v_desc, ws_acc, ws_ml, cache_seqlens, bidx, bt, alibi,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache_c.stride(0), k_cache_c.stride(1), k_cache_c.stride(2),
        v_cache_c.stride(0), v_cache_c.stride(1), v_cache_c.stride(2),
        bt.stride(0) if block_table is not None else 0, max(page_size, 1), stride_alibi_b,
        Hq, Hq // Hk, B, Lq, D, num_m_tiles, n_new,
        qk_scale, softcap_scaled, max(left, 0), max(right, 0),
        HEAD_DIM=HD, BLOCK_M=dec_m, BLOCK_N=cfg.block_n, SPLIT_BLOCKS=split // cfg.block_n,
        COMPUTE_DTYPE=compute_dtype(q.dtype), ROWWISE=interpreting(),
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
        PAGED=block_table is not None, HAS_BATCH_IDX=cache_batch_idx is not None,
        EVEN_D=even_d, USE_TMA=use_tma, USE_PDL=pdl,
        num_warps=dec_w, num_stages=force.get("stages") or cfg.decode_stages)
    _launch_combine(ws_acc, ws_ml, out, lse, cache_seqlens, split, n_new, HD, arch, pdl=pdl, force=force)
    return (out, lse) if return_softmax_lse else out


def _launch_combine(ws_acc, ws_ml, out, lse, cache_seqlens, split, n_new, head_dim_tile, arch, *, pdl, force):
    """The combine kernel over the workspace's split states (out [B, Lq, Hq, D], lse
    [B, Hq, Lq]); ``pdl``: launched as the partial kernel's programmatic dependent."""
    B, Lq, Hq, D = out.shape
    comb_m, comb_w = force.get("combine") or DECODE_COMBINE_TILE[arch]
    attention_split_combine_kernel[(triton.cdiv(max(Lq, 1), comb_m), B * Hq)](
        ws_acc, ws_ml, out, lse, cache_seqlens, out.stride(0), out.stride(1), out.stride(2),
        Hq, B, Lq, D, split, n_new, HEAD_DIM=head_dim_tile, BLOCK_M=comb_m, USE_PDL=pdl, num_warps=comb_w,
        **({"launch_pdl": True} if pdl else {}))
