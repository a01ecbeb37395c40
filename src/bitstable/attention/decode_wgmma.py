"""Launch of the Hopper one-token decode partial kernel (kernels/attention_decode_wgmma.py).

:func:`wgmma_decode_eligible` says whether a decode step is in the kernel's scope and
:func:`launch_partial_wgmma` runs it; otherwise the caller runs the Triton partial
kernel.  Both write the same split states bit for bit (the choice is launch-only, tested
on the device against the full forward and against each other), so which one runs never
changes an output.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from .._backend import sm_count
from .._descriptors import descriptor
from .._launch import launch
from .launch import tma_eligible

try:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    from ..kernels.attention_decode_wgmma import HAVE_GLUON, attention_decode_wgmma_kernel
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False

_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}

#: Gluon's API moves between triton releases: the kernel ran on 3.6 and compiles on 3.8
#: (tools/compile_check_sm90.py); older releases keep the Triton kernel.
_TRITON_OK = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 6)

@functools.lru_cache(maxsize=None)
def _smem_layout(block_n: int, head_dim: int, dtype: torch.dtype):
    """The kernel's shared-memory layout of one [block_n, head_dim] key/value tile (the
    descriptors' layout), made once per (block_n, head_dim, dtype)."""
    return gl.NVMMASharedLayout.get_default_for([block_n, head_dim], getattr(gl, _GL_DTYPES[dtype]))


def table_stages(waves, programs: int, device: torch.device) -> int:
    """Pipeline stages the config table's ``decode_wgmma_waves`` gives a grid of ``programs``
    partial programs on ``device`` (0: the Triton kernel).  Few waves leave each SM one
    program's serial fold to run, where the Gluon kernel's overlap pays; with many, the
    Triton kernel measured faster."""
    for max_waves, stages in waves:
        if programs <= max_waves * sm_count(device):
            return stages
    return 0


def wgmma_decode_eligible(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, arch: str,
                          head_dim: int, head_dim_tile: int, group: int, block_m: int, block_n: int,
                          num_warps: int, paged: bool, softcap: float, has_alibi: bool, left: int,
                          right: int) -> bool:
    """Whether this step is in the kernel's scope: sm_90 with Gluon, 16-bit, one query
    token, head_dim 64 or 128 (unpadded), a GQA group of at most ``block_m`` heads, the
    dense kernel's 64x64 tiles on 4 warps, no softcap/ALiBi/sliding window, and contiguous
    caches the copy engine can address as ``[rows, Hkv * D]``."""
    if not (HAVE_GLUON and _TRITON_OK and arch == "sm90" and q.dtype in _GL_DTYPES
            and k_cache.dtype == q.dtype):
        return False
    if q.shape[1] != 1 or head_dim != head_dim_tile or head_dim not in (64, 128) or group > block_m:
        return False
    if (block_m, block_n, num_warps) != (64, 64, 4) or paged or softcap > 0 or has_alibi or left >= 0:
        return False
    if right > 0:
        return False
    return (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
            and tma_eligible(k_cache, v_cache))


def launch_partial_wgmma(q, k_cache, v_cache, ws_acc, ws_ml, cache_seqlens, cache_batch_idx: Optional[torch.Tensor],
                         *, num_splits: int, split_blocks: int, block_m: int, block_n: int, stages: int,
                         n_new: int, qk_scale: float, pdl: bool) -> None:
    """Launch the kernel over ``num_splits`` splits of every (sequence, KV head), with
    ``stages`` (at least 3) key blocks in flight; ``pdl``: the combine kernel follows as
    its programmatic dependent.  Call only when :func:`wgmma_decode_eligible` holds."""
    B, _, Hq, D = q.shape
    Bc, L, Hk, _ = k_cache.shape
    layout = _smem_layout(block_n, D, q.dtype)
    rows, box = (Bc * L, Hk * D), (block_n, D)

    def desc(t):
        flat = t.view(Bc * L, Hk * D)
        return descriptor(GluonTensorDescriptor, flat, rows, flat.stride(), box, layout)

    bidx = cache_batch_idx if cache_batch_idx is not None else cache_seqlens
    launch(attention_decode_wgmma_kernel, (num_splits, B * Hk),
        q, k_cache, v_cache, desc(k_cache), desc(v_cache), ws_acc, ws_ml, cache_seqlens, bidx,
        q.stride(0), q.stride(2), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        L, Hq, Hq // Hk, B, n_new, qk_scale,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_BLOCKS=split_blocks,
        HAS_BATCH_IDX=cache_batch_idx is not None, STAGES=max(stages, 3), USE_PDL=pdl, num_warps=4)
