"""The launch plan of a decode step: which partial kernel (Triton or the Hopper Gluon one),
its tiles, stages and loads, the split count and the combine kernel's tile.

Numeric choices (``block_n``, the split size) come from the config table and the
deterministic mode; everything else in a plan is launch-only (same bits), and may be
forced through :func:`bitstable.launch_options.forced`.  The part that depends only on
(device, dtype, head dims, features, split size, launch options) is built once and
cached; a call adds what its lengths and tensors decide (split count, the Gluon
kernel's grid policy, copy-engine eligibility).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..._backend import cdiv, compute_dtype, interpreting
from ...configs import DECODE_COMBINE_TILE, arch_key, attention_config, padded_head_dim
from ...launch_options import LaunchOptions
from ...mode import get_deterministic_mode
from ..decode_wgmma import table_stages, wgmma_decode_eligible
from ..launch import resolve_split_size, tma_usable
from .validation import CheckedCall


class DecodePlan(NamedTuple):
    """How one ``flash_attn_with_kvcache`` call (deterministic mode) runs.

    ``kernel``: ``"gluon"`` (the Hopper one-token kernel, kernels/attention_decode_wgmma.py)
    or ``"triton"`` (kernels/attention_decode.py's partial kernel); ``num_splits`` splits
    of ``split`` keys (``block_n``-key blocks) in the grid; the partial kernel's
    ``block_m`` query rows (GQA heads and new tokens packed), ``num_warps``, ``stages``,
    ``even_d`` (16-byte head-dim loads; False: masked), ``tma`` (whole key blocks through
    the copy engine), ``pdl`` (the combine kernel launched as the partial kernel's
    programmatic dependent), ``combine`` (the combine kernel's block_m, num_warps),
    ``head_dim_tile`` (the padded head dim), ``num_m_tiles`` (query tiles per KV head) and
    ``kwargs`` (the Triton partial kernel's constexprs and launch options, USE_TMA aside).
    """

    kernel: str
    num_splits: int
    split: int
    block_n: int
    block_m: int
    num_warps: int
    stages: int
    even_d: bool
    tma: bool
    pdl: bool
    combine: Tuple[int, int]
    head_dim_tile: int
    num_m_tiles: int
    kwargs: dict


class _StaticPlan(NamedTuple):
    arch: str
    block_n: int
    split: int
    head_dim_tile: int
    block_m: int
    num_warps: int
    even_d: bool
    pdl: bool
    want_tma: bool
    triton_tma: bool
    wgmma_waves: tuple
    combine: Tuple[int, int]
    kwargs: dict


#: (device, dtype, head dim, paged, page size, softcap, alibi, left, right,
#: split size, launch options) -> _StaticPlan: config lookups, split checks and constexpr
#: assembly cost host time on every decode step of every layer.
_STATIC_PLANS: dict = {}


def _static_plan(device, dtype, D, paged, page_size, has_softcap, has_alibi, has_left, has_right,
                 split_size, options: LaunchOptions, Dv=None) -> _StaticPlan:
    Dv = D if Dv is None else Dv
    key = (device.type, device.index, dtype, D, Dv, paged, page_size, has_softcap, has_alibi, has_left,
           has_right, split_size, options)
    plan = _STATIC_PLANS.get(key) if type(split_size) is int else None   # else: resolve_split_size raises
    if plan is not None:
        return plan
    arch = arch_key(device)
    cfg = attention_config(arch, dtype, D)
    split = resolve_split_size(cfg.block_n, split_size)   # raises on a bad split size
    HD = padded_head_dim(D)
    dec_m, dec_w = options.decode_tile or (cfg.decode_block_m or cfg.block_m,
                                           cfg.decode_num_warps or cfg.num_warps)
    even_d = (True if options.decode_even_d is None else options.decode_even_d) and HD == D == Dv
    # The combine kernel launches as the partial kernel's programmatic dependent on Hopper
    # (its launch overlaps the partial kernel's tail); launch-only.
    pdl = (True if options.decode_pdl is None else options.decode_pdl) and arch == "sm90"
    want_tma = cfg.tma if options.decode_tma is None else options.decode_tma
    kwargs = dict(
        HEAD_DIM=HD, BLOCK_M=dec_m, BLOCK_N=cfg.block_n, SPLIT_BLOCKS=split // cfg.block_n,
        COMPUTE_DTYPE=compute_dtype(dtype), ROWWISE=interpreting(),
        HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi, HAS_LEFT=has_left, HAS_RIGHT=has_right,
        PAGED=paged, EVEN_D=even_d, USE_PDL=pdl,   # HAS_BATCH_IDX and USE_TMA: per call
        num_warps=dec_w, num_stages=options.decode_stages or cfg.decode_stages)
    plan = _StaticPlan(arch, cfg.block_n, split, HD, dec_m, dec_w, even_d, pdl, want_tma,
                       want_tma and even_d and (not paged or page_size % cfg.block_n == 0),
                       cfg.decode_wgmma_waves, options.decode_combine or DECODE_COMBINE_TILE[arch], kwargs)
    if device.index is not None or interpreting():
        _STATIC_PLANS[key] = plan
    return plan


def plan_call(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, call: CheckedCall,
              softcap: float, alibi_slopes: Optional[torch.Tensor], split_size: Optional[int],
              options: LaunchOptions) -> DecodePlan:
    """The plan of a validated call (``call``: validation.validate's result); ``k_cache`` and
    ``v_cache`` with unit head-dim stride.  Raises on a bad split size (before any write)."""
    B, Lq, Hq, D = q.shape
    Hk = k_cache.shape[2]
    left, right = call.left, call.right
    if split_size is None:   # the mode's, resolved before the cache key
        split_size = get_deterministic_mode().split_size
    st = _static_plan(q.device, q.dtype, D, call.block_table is not None, call.page_size, softcap > 0, alibi_slopes is not None,
                      left >= 0, right >= 0, split_size, options, v_cache.shape[3])
    # Splits launched: for the longest sequence when the lengths were read on the host,
    # else (CUDA-graph capture) for the cache's capacity.  Splits past a row's length do
    # nothing and the combine kernel merges only the splits that hold keys: the grid
    # changes no bits, and the workspace stays sized by the keys actually cached.
    longest = max(call.before, default=0) + call.n_new if call.before is not None else call.capacity
    num_splits = max(cdiv(max(longest, 1), st.split), 1)
    num_m_tiles = cdiv(max(Lq, 1) * (Hq // Hk), st.block_m)   # GQA heads packed as rows
    # One query token on Hopper, grids of few waves: the Gluon kernel that overlaps the
    # tensor-core products with the softmax (same bits as the Triton kernel).
    gluon = options.decode_gluon   # None: the table's choice; forced: 4 stages
    if gluon is None:
        stages = table_stages(st.wgmma_waves, num_splits * B * Hk, q.device) if st.wgmma_waves else 0
    else:
        stages = 4 if gluon else 0
    leftpad = call.cache_leftpad is not None   # row offsets: pointer loads, the Triton kernel
    if st.want_tma and stages and not leftpad and v_cache.shape[3] == D and wgmma_decode_eligible(
            q, k_cache, v_cache, arch=st.arch, head_dim=D, head_dim_tile=st.head_dim_tile, group=Hq // Hk,
            block_m=st.block_m, block_n=st.block_n, num_warps=st.num_warps, paged=call.block_table is not None,
            softcap=softcap, has_alibi=alibi_slopes is not None, left=left, right=right):
        return DecodePlan("gluon", num_splits, st.split, st.block_n, st.block_m, 4,
                          max(options.decode_stages or stages, 3), True, True, st.pdl, st.combine,
                          st.head_dim_tile, num_m_tiles, st.kwargs)
    # Whole key blocks through the copy engine where the layout allows it (16-byte
    # aligned strides, pages holding whole blocks).
    return DecodePlan("triton", num_splits, st.split, st.block_n, st.block_m, st.num_warps,
                      st.kwargs["num_stages"], st.even_d,
                      tma_usable(k_cache, v_cache, st.triton_tma) and not leftpad, st.pdl,
                      st.combine, st.head_dim_tile, num_m_tiles, st.kwargs)
