"""Host side of the attention backward: config lookup and the three launches.

dq, dk, dv are computed without atomics: dk/dv by programs that own a key block
(and sum their GQA group's query heads in order), dq by programs that own a
query block.  Deterministic and batch-invariant for the same reason as the
forward: each program's sums depend only on its own sequence.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .. import _poison as poison
from .. import launch_options as _launch_options
from .._backend import cdiv, interpreting
from ..configs import BackwardConfig, arch_key, backward_config, padded_head_dim
from ..kernels.attention_bwd import (attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,
                                     attention_bwd_preprocess_kernel)
from ..launch_options import LaunchOptions
from .dropout import Dropout
from .launch import alibi_args, compute_dtype, dropout_launch_args, score_scales
from .validation import last_dim_contiguous
from .._launch import launch


class BackwardPlan(NamedTuple):
    """The backward's config (tiles: ``block_n`` and the dq tiles are numeric) and whether
    fully visible tiles skip the mask work (``skip_full_masks``, launch-only)."""

    config: BackwardConfig
    skip_full_masks: bool


#: (device, dtype, head dim, launch options) -> BackwardPlan (a config lookup per call
#: costs host time in every layer's backward).
_BACKWARD_PLANS: dict = {}


def backward_plan(q: torch.Tensor, options: Optional[LaunchOptions] = None) -> BackwardPlan:
    """The plan the backward of attention on ``q`` (dense [B, L, H, D] or packed [T, H, D])
    launches with, under the launch options in force (or ``options``)."""
    return _backward_plan(q.device, q.dtype, q.shape[-1], _launch_options.current() if options is None else options)


def _backward_plan(device, dtype, D, options: LaunchOptions) -> BackwardPlan:
    key = (device.type, device.index, dtype, D, options)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        cfg = options.bwd_config or backward_config(arch_key(device), dtype, D)
        skip = cfg.skip_full_masks if options.bwd_skip_full_masks is None else options.bwd_skip_full_masks
        plan = BackwardPlan(cfg, skip)
        if device.index is not None or interpreting():
            _BACKWARD_PLANS[key] = plan
    return plan


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, softmax_scale: float,
                       window_left: int, window_right: int, softcap: float,
                       alibi_slopes: Optional[torch.Tensor], dlse: Optional[torch.Tensor] = None,
                       cu_seqlens_q: Optional[torch.Tensor] = None,
                       cu_seqlens_k: Optional[torch.Tensor] = None,
                       max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                       options: Optional[LaunchOptions] = None,
                       dropout: Optional[Dropout] = None,
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``flash_attn_func`` w.r.t. q, k, v (and through its lse if ``dlse``).

    Dense: dout/out/q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], lse/dlse [B, Hq, Lq]
    float32.  Varlen (``cu_seqlens_q/k``): packed [total, H, D] tensors and
    lse/dlse [Hq, total_q].  Returns dq, dk, dv in the inputs' dtype and shapes.
    ``options``: forced launch choices (default: :func:`bitstable.launch_options.current`):
    ``bwd_skip_full_masks`` (launch-only) and ``bwd_config`` (explorations only: another
    block size is another reduction order).  ``dropout``: the forward's dropout (the same
    stream key and per-sequence keys give the same mask).
    """
    opts = _launch_options.current() if options is None else options
    dout, q, k, v, out = (last_dim_contiguous(t) for t in (dout, q, k, v, out))
    varlen = cu_seqlens_q is not None
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    result = (dq, dk, dv)
    if varlen:
        # Packed tokens as one "batch" row; kernels find each sequence by cu_seqlens.
        dout, q, k, v, out, dq, dk, dv = (t.unsqueeze(0) for t in (dout, q, k, v, out, dq, dk, dv))
        lse, dlse = lse.unsqueeze(0), (None if dlse is None else dlse.unsqueeze(0))
    Hq, D, Hk = q.shape[2], q.shape[3], k.shape[2]
    if varlen:
        B, Lq, Lk, total_q = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, q.shape[1]
    else:
        B, Lq, Lk, total_q = q.shape[0], q.shape[1], k.shape[1], 0
    plan = _backward_plan(q.device, q.dtype, D, opts)
    cfg = plan.config
    HD = padded_head_dim(D)
    delta = torch.empty((1, Hq, total_q) if varlen else (B, Hq, Lq), dtype=torch.float32,
                        device=q.device)
    poison.fill(dq, dk, dv, delta)
    if B == 0 or Hq == 0 or Lq == 0 or Lk == 0 or q.shape[1] == 0:
        for t in result:
            t.zero_()
        return result
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous().float()

    qk_scale, softcap_scaled = score_scales(softmax_scale, softcap)
    alibi, stride_alibi_b = alibi_args(alibi_slopes, lse)
    common = dict(COMPUTE_DTYPE=compute_dtype(q.dtype), ROWWISE=interpreting(),
                  HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
                  HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                  SKIP_FULL_MASKS=plan.skip_full_masks)
    seq_keys, drop_args, drop_kw = dropout_launch_args(dropout, lse)
    common.update(drop_kw)
    scalars = (qk_scale, softcap_scaled, softmax_scale, max(window_left, 0), max(window_right, 0),
               seq_keys, *drop_args)

    pre_b, pre_l = (1, total_q) if varlen else (B, Lq)   # every packed row at once
    launch(attention_bwd_preprocess_kernel, (cdiv(pre_l, 64), pre_b * Hq),
        out, dout, dlse if dlse is not None else lse, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        Hq, pre_l, D, HEAD_DIM=HD, BLOCK_M=64, HAS_DLSE=dlse is not None)
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    launch(attention_bwd_dkdv_kernel, (cdiv(Lk, cfg.block_n), B * Hk),
        q, k, v, dout, lse, delta, dk, dv, alibi, cu_q, cu_k,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        stride_alibi_b, Hq, Hk, Hq // Hk, Lq, Lk, D, total_q, *scalars,
        HEAD_DIM=HD, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, VARLEN=varlen,
        PER_HEAD_SUMS=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    dq_m, dq_n, dq_w, dq_s = cfg.dq_tiles()
    launch(attention_bwd_dq_kernel, (cdiv(Lq, dq_m), B * Hq),
        q, k, v, dout, lse, delta, dq, alibi, cu_q, cu_k,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        stride_alibi_b, Hq, Hq // Hk, Lq, Lk, D, total_q, *scalars,
        HEAD_DIM=HD, BLOCK_M=dq_m, BLOCK_N=dq_n, VARLEN=varlen, num_warps=dq_w, num_stages=dq_s, **common)
    return result
