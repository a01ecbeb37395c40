"""Launch of a planned decode step: the split-KV partial kernel (Triton, or the Hopper Gluon
one-token kernel) into a float32 workspace, then the combine kernel that merges the
splits in ascending order into the output and its log-sum-exp."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._backend import cdiv, next_power_of_2
from ... import _poison as poison
from ...kernels.attention_decode import attention_split_combine_kernel, attention_split_partial_kernel
from ..decode_wgmma import launch_partial_wgmma
from ..launch import alibi_args, kv_descriptors, score_scales
from .plan import DecodePlan
from .validation import CheckedCall
from ..._launch import launch


def launch_decode(plan: DecodePlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  call: CheckedCall, softcap: float, alibi_slopes: Optional[torch.Tensor],
                  max_before: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Lq, Hq, Dv] in q's dtype, lse [B, Hq, Lq] float32) of a validated call whose
    new tokens are already in the cache; q and the caches with unit head-dim stride.
    ``call.device_checks``: the kernels check the row values the host did not read
    (kernels/cache_checks.py, ``max_before`` the largest valid cache_seqlens entry).
    Extra memory: the workspace, ``num_splits x B x Hq x Lq x (head_dim_tile + 2)`` float32."""
    B, Lq, Hq, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    HD, num_splits = plan.head_dim_tile, plan.num_splits
    out = torch.empty((B, Lq, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    ws_acc = torch.empty((num_splits, B, Hq, Lq, HD), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((num_splits, B, Hq, Lq, 2), dtype=torch.float32, device=q.device)
    poison.fill(out, lse, ws_acc, ws_ml)
    if B == 0 or Lq == 0 or Hq == 0:
        return out, lse
    qk_scale, softcap_scaled = score_scales(call.softmax_scale, softcap)
    cache_seqlens, cache_batch_idx, block_table = call.cache_seqlens, call.cache_batch_idx, call.block_table
    checks = device_check_args(call, max_before, k_cache.shape[0], B) if call.device_checks else {}
    if plan.kernel == "gluon":
        launch_partial_wgmma(q, k_cache, v_cache, ws_acc, ws_ml, cache_seqlens, cache_batch_idx,
                             num_splits=num_splits, split_blocks=plan.split // plan.block_n, block_m=plan.block_m,
                             block_n=plan.block_n, stages=plan.stages, n_new=call.n_new, qk_scale=qk_scale,
                             pdl=plan.pdl)
    else:
        alibi, stride_alibi_b = alibi_args(alibi_slopes, lse)
        bt = block_table if block_table is not None else cache_seqlens
        bidx = cache_batch_idx if cache_batch_idx is not None else cache_seqlens
        k_desc, v_desc, use_tma = kv_descriptors(k_cache, v_cache, plan.block_n, HD, plan.tma)
        leftpad = dict(LEFTPAD=call.cache_leftpad, HAS_LEFTPAD=True) if call.cache_leftpad is not None else {}
        launch(attention_split_partial_kernel, (num_splits * plan.num_m_tiles, B * Hk),
            q, k_cache, v_cache, k_desc, v_desc, ws_acc, ws_ml, cache_seqlens, bidx, bt, alibi,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            bt.stride(0) if block_table is not None else 0, max(call.page_size, 1), stride_alibi_b,
            Hq, Hq // Hk, B, Lq, D, plan.num_m_tiles, call.n_new,
            qk_scale, softcap_scaled, max(call.left, 0), max(call.right, 0),
            HAS_BATCH_IDX=cache_batch_idx is not None, USE_TMA=use_tma, **plan.kwargs, **leftpad,
            **({"head_dim_v": Dv, "SMALLER_V": True} if Dv != D else {}), **_partial_checks(checks))
    launch_combine(ws_acc, ws_ml, out, lse, cache_seqlens, plan.split, call.n_new, HD, plan.combine,
                   pdl=plan.pdl, cache_leftpad=call.cache_leftpad, checks=checks)
    return out, lse


def device_check_args(call: CheckedCall, max_before: int, num_rows: int, batch: int) -> dict:
    """kernels/cache_checks.py's arguments for the combine kernel (the partial kernel takes
    a subset, :func:`_partial_checks`): ``num_rows`` the cache's rows or pages."""
    bt = call.block_table
    return dict(CHECK=True, max_before=max_before, num_rows=num_rows,
                max_pages=bt.shape[1] if bt is not None else 0,
                BLOCK_B=next_power_of_2(max(batch, 1)),
                BLOCK_P=next_power_of_2(bt.shape[1]) if bt is not None else 1,
                BATCH_IDX=call.cache_batch_idx, HAS_BATCH_IDX=call.cache_batch_idx is not None,
                BLOCK_TABLE=bt, stride_bt=bt.stride(0) if bt is not None else 0,
                page_size=max(call.page_size, 1), PAGED=bt is not None)


_PARTIAL_CHECK_KEYS = ("CHECK", "max_before", "num_rows", "max_pages", "BLOCK_B", "BLOCK_P")


def _partial_checks(checks: dict) -> dict:
    return {name: checks[name] for name in _PARTIAL_CHECK_KEYS} if checks else {}


def launch_combine(ws_acc, ws_ml, out, lse, cache_seqlens, split, n_new, head_dim_tile, tile, *, pdl,
                   cache_leftpad=None, checks=None):
    """The combine kernel over the workspace's split states (out [B, Lq, Hq, D], lse
    [B, Hq, Lq]); ``tile``: its (block_m, num_warps); ``pdl``: launched as the partial
    kernel's programmatic dependent; ``cache_leftpad``: the rows' left padding or None;
    ``checks``: :func:`device_check_args` when the kernels check the row values."""
    B, Lq, Hq, D = out.shape
    comb_m, comb_w = tile
    launch(attention_split_combine_kernel, (cdiv(max(Lq, 1), comb_m), B * Hq),
        ws_acc, ws_ml, out, lse, cache_seqlens, out.stride(0), out.stride(1), out.stride(2),
        Hq, B, Lq, D, split, n_new, HEAD_DIM=head_dim_tile, BLOCK_M=comb_m, USE_PDL=pdl, num_warps=comb_w,
        **({"launch_pdl": True} if pdl else {}),
        **({"LEFTPAD": cache_leftpad, "HAS_LEFTPAD": True} if cache_leftpad is not None else {}),
        **(checks or {}))
