"""Host side of the dense attention forward: config lookup and kernel launch.

Everything numeric comes from :mod:`bitstable.configs` (block sizes) and
:mod:`bitstable.mode` (split size); the grid is the only thing derived from the
input's shape, and it does not change what any output element sums.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host-side tensor descriptors
    TensorDescriptor = None

from .._backend import cdiv, compute_dtype, interpreting  # noqa: F401  (compute_dtype: re-exported)
from ..configs import AttentionConfig, arch_key, attention_config, padded_head_dim
from ..kernels.attention_core import LOG2E
from ..kernels.attention_fwd import attention_fwd_kernel
from ..mode import check_split_size, get_deterministic_mode
from .. import _poison as poison
from .. import launch_options as _launch_options
from ..launch_options import LaunchOptions
from .dropout import Dropout
from .validation import last_dim_contiguous, normalize_window
from .._launch import launch
from .._descriptors import descriptor

_LOOP_CODES = {"branch": 0, "nested": 1}


def tma_eligible(*tensors: torch.Tensor) -> bool:
    """The copy engine needs 16-byte aligned bases, 16-byte multiple strides
    (besides the unit head-dim stride) and a non-empty tensor."""
    for t in tensors:
        if t.numel() == 0:
            return False
        if t.data_ptr() % 16:
            return False
        es = t.element_size()
        for st in t.stride()[:-1]:
            if (st * es) % 16:
                return False
    return True


def tma_usable(k: torch.Tensor, v: torch.Tensor, wanted: bool) -> bool:
    """Whether :func:`kv_descriptors` makes descriptors for k/v: ``wanted`` and the copy
    engine can take these tensors (a GPU, triton's host descriptors, 16-byte aligned
    strides)."""
    return bool(wanted and TensorDescriptor is not None and not interpreting() and tma_eligible(k, v))


def kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, head_dim_tile: int, wanted: bool):
    """``(k_arg, v_arg, used)``: host-made 4-d TMA descriptors over k/v (boxes of
    ``[1, block_n, 1, head_dim_tile]``) when :func:`tma_usable` (``wanted`` and the copy
    engine can take these tensors), else the tensors themselves for pointer loads.
    Launch-only: the kernels load the same values."""
    if not tma_usable(k, v, wanted):
        return k, v, False
    box = (1, block_n, 1, head_dim_tile)
    return (descriptor(TensorDescriptor, k, k.shape, k.stride(), box),
            descriptor(TensorDescriptor, v, v.shape, v.stride(), box), True)


def score_scales(softmax_scale: float, softcap: float) -> Tuple[float, float]:
    """(qk_scale, softcap_scaled) for attention_core.score_transform.

    Without softcap the base-2 logit is ``raw * softmax_scale * log2(e)``; with
    softcap ``c`` it is ``c * log2(e) * tanh(raw * softmax_scale / c)``.
    """
    log2e = LOG2E.value
    if softcap > 0:
        return softcap * log2e, softmax_scale / softcap
    return softmax_scale * log2e, 1.0


def alibi_args(alibi_slopes: Optional[torch.Tensor], placeholder: torch.Tensor):
    """(slopes with unit last stride, batch stride) for the kernels; ``placeholder``
    stands in (never read) when there are no slopes."""
    if alibi_slopes is None:
        return placeholder, 0
    alibi = alibi_slopes if alibi_slopes.stride(-1) == 1 else alibi_slopes.contiguous()
    return alibi, (alibi.stride(0) if alibi.dim() == 2 else 0)


#: The dropout arguments of a launch without dropout (never read by the kernels).
_NO_DROPOUT_ARGS = (1 << 40, 1 << 40, 1 << 40, 1.0)


def dropout_launch_args(dropout: Optional[Dropout], placeholder: torch.Tensor):
    """(SEQ_KEYS, (drop_lo, drop_hi, drop_threshold, drop_scale), constexpr kwargs) for the
    forward and backward kernels; ``placeholder`` stands in for absent per-sequence keys."""
    if dropout is None:
        return placeholder, _NO_DROPOUT_ARGS, {}
    lo, hi, thr = dropout.kernel_args()
    seeds = dropout.seeds
    return (placeholder if seeds is None else seeds, (lo, hi, thr, dropout.scale),
            dict(DROPOUT=True, HAS_SEQ_KEYS=seeds is not None))


def resolve_split_size(block_n: int, split_size: Optional[int]) -> int:
    """The split size in force (``split_size``, or the mode's when None), checked: an
    int, positive, a multiple of the config's key block (mode.check_split_size)."""
    size = get_deterministic_mode().split_size if split_size is None else split_size
    return check_split_size(size, block_n)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                      window_left: int, window_right: int, softcap: float,
                      alibi_slopes: Optional[torch.Tensor], split_size: Optional[int] = None,
                      config: Optional[AttentionConfig] = None,
                      cu_seqlens_q: Optional[torch.Tensor] = None,
                      cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: int = 0,
                      options: Optional[LaunchOptions] = None,
                      dropout: Optional[Dropout] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel on validated inputs.

    Dense: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] with unit stride on D; returns
    out [B, Lq, Hq, D] (q's dtype, contiguous) and lse [B, Hq, Lq] float32
    (natural log).  Varlen (``cu_seqlens_q/k`` int32 [num_seqs + 1]): q
    [total_q, Hq, D], k/v [total_k, Hkv, D]; returns out [total_q, Hq, D] and
    lse [Hq, total_q].  Deterministic and batch-invariant: a row's bits depend
    only on its own query, the keys/values it sees and the config, so a packed
    sequence's rows equal the same sequence's rows in a dense call.

    ``config`` overrides the table's entry; it exists for the GPU probes and
    the config exploration script only (a different block_n is a different
    reduction order).  ``options``: forced launch choices (default: the options in
    force, :func:`bitstable.launch_options.current`); launch-only.  ``dropout``: the call's
    dropout (attention/dropout.py), None for none.
    """
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    varlen = cu_seqlens_q is not None
    if varlen:
        total_q, Hq, D = q.shape
        out = torch.empty((total_q, Hq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device)
        result = (out, lse)
        # One "batch" row of packed tokens; the kernel finds each sequence by cu_seqlens.
        q, k, v, out = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), out.unsqueeze(0)
        B, Lq, Lk = cu_seqlens_q.numel() - 1, max_seqlen_q, 0
        Hk = k.shape[2]
    else:
        B, Lq, Hq, D = q.shape
        Lk, Hk = k.shape[1], k.shape[2]
        total_q = 0
        out = torch.empty((B, Lq, Hq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
        result = (out, lse)
    split = get_deterministic_mode().split_size if split_size is None else split_size
    plan = _forward_plan(q.device, q.dtype, D, split, varlen, window_left >= 0, window_right >= 0,
                         softcap > 0, alibi_slopes is not None, config,
                         _launch_options.current() if options is None else options)
    poison.fill(out, lse)
    if B == 0 or Lq == 0 or Hq == 0:
        return result

    qk_scale, softcap_scaled = score_scales(softmax_scale, softcap)
    alibi, stride_alibi_b = alibi_args(alibi_slopes, lse)
    k_arg, v_arg, use_tma = kv_descriptors(k, v, plan.block_n, plan.head_dim_tile, plan.want_tma)
    grid = (cdiv(Lq, plan.block_m), B * Hq)
    sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
    seq_keys, drop_args, drop_kw = dropout_launch_args(dropout, lse)
    launch(attention_fwd_kernel, grid,
        q, k_arg, v_arg, out, lse, alibi,
        cu_seqlens_q if varlen else lse, cu_seqlens_k if varlen else lse,
        sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], so[0], so[1], so[2],
        stride_alibi_b,
        Hq, Hq // Hk, Lq, Lk, D, total_q,
        qk_scale, softcap_scaled, max(window_left, 0), max(window_right, 0),
        seq_keys, *drop_args,
        USE_TMA=use_tma, **plan.kwargs, **drop_kw,
    )
    return result


class ForwardPlan(NamedTuple):
    """What a forward launch takes besides shapes, strides, scales and tensors: the key
    block ``block_n`` (numeric), and launch-only choices: the query tile ``block_m``, the
    block-loop structure ``loop`` ("branch" or "nested"), ``want_tma`` (whole K/V
    blocks through the copy engine, where the tensors allow it: :func:`kv_descriptors`),
    and the kernel's constexprs and launch options ``kwargs``."""

    block_m: int
    block_n: int
    head_dim_tile: int
    loop: str
    want_tma: bool
    kwargs: dict


_ForwardPlan = ForwardPlan   # the name this module used before


#: (device, dtype, head_dim, split, varlen, left, right, softcap, alibi, launch options)
#: -> ForwardPlan, built once: per-call config lookups, split checks and constexpr
#: assembly cost host time on every layer of an eager model.
_FORWARD_PLANS: dict = {}


def forward_plan(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
                 window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                 alibi_slopes: Optional[torch.Tensor] = None, split_size: Optional[int] = None,
                 varlen: bool = False, options: Optional[LaunchOptions] = None) -> ForwardPlan:
    """The plan ``flash_attn_func(q, k, v, causal=..., window_size=..., softcap=...,
    alibi_slopes=...)`` launches with (``varlen``: the varlen function's, with k packed
    [total_k, Hkv, D]), under the launch options in force (or ``options``): the loop
    structure, copy-engine loads or not, the tiles.  For tests and explorations; the
    arguments are those calls'."""
    left, right = normalize_window(causal, window_size[0], window_size[1], k.shape[-3])
    split = get_deterministic_mode().split_size if split_size is None else split_size
    return _forward_plan(q.device, q.dtype, q.shape[-1], split, varlen, left >= 0, right >= 0,
                         softcap > 0, alibi_slopes is not None, None,
                         _launch_options.current() if options is None else options)


def _forward_plan(device, dtype, D, split_size, varlen, has_left, has_right, has_softcap, has_alibi,
                  config, options: LaunchOptions) -> ForwardPlan:
    key = (device.type, device.index, dtype, D, split_size, varlen, has_left, has_right, has_softcap,
           has_alibi, options)
    plan = _FORWARD_PLANS.get(key) if config is None else None
    if plan is not None:
        return plan
    cfg = config or attention_config(arch_key(device), dtype, D)
    split = resolve_split_size(cfg.block_n, split_size)
    causal_like = has_right
    loop = options.fwd_loop or (cfg.loop_causal if causal_like else cfg.loop)
    use_tma = cfg.tma if options.fwd_tma is None else options.fwd_tma
    HD = padded_head_dim(D)
    kwargs = dict(
        HEAD_DIM=HD, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SPLIT_BLOCKS=split // cfg.block_n, COMPUTE_DTYPE=compute_dtype(dtype),
        ROWWISE=interpreting(), HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi,
        HAS_LEFT=has_left, HAS_RIGHT=has_right, EVEN_D=HD == D, WRITE_LSE=True,
        REVERSE_M=causal_like, LOOP=_LOOP_CODES[loop], VARLEN=varlen,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    plan = ForwardPlan(cfg.block_m, cfg.block_n, HD, loop, use_tma and not varlen, kwargs)
    if config is None and (device.index is not None or interpreting()):
        _FORWARD_PLANS[key] = plan
    return plan
