"""Batch-invariant matrix products: ``mm``, ``bmm``, ``addmm``, ``matmul``.

Each output element sums over K in ascending order (configs.MatmulConfig) with
tiles fixed per (arch, dtype) (configs.py), so ``mm(a[:m], b)`` equals
``mm(a, b)[:m]`` bit for bit for every m.  Accumulation is float32 (IEEE fp32
for float32 inputs, never tf32).

The K tree (``tp_tree=S``, off by default; docs/TENSOR_PARALLEL.md): ``mm`` and
``addmm`` cut K into ``tree_leaves(K, S)`` contiguous chunks, compute each chunk's
product in float32 (:func:`tree_partials`, one launch of the same kernel), add the
partials in a fixed balanced binary tree (:func:`tree_sum`) and round once.  A
tensor-parallel rank that holds a contiguous K shard computes a complete subtree of
that tree, so every TP size dividing S gives the one-process bits
(``bitstable.parallel``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host-side tensor descriptors
    TensorDescriptor = None

from .. import _poison
from .._backend import cdiv, compute_dtype, interpreting, kernel_device_type, sm_count
from ..configs import arch_key, matmul_classes, matmul_config, matmul_tma_config
from ..kernels.matmul import matmul_kernel
from ..kernels.matmul_tma import matmul_tma_kernel
from ..launch_options import _ACTIVE as _LAUNCH_OPTIONS
from .._launch import launch
from .._descriptors import descriptor

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(name: str, t: torch.Tensor, ndim: int) -> None:
    if type(t) is torch.Tensor and t.dtype in _DTYPES and t.dim() == ndim \
            and t.device.type == kernel_device_type():
        return   # the common case, checked in one test
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {tuple(t.shape)}")
    if t.device.type != kernel_device_type():
        raise ValueError(f"{name} is on {t.device}; bitstable's kernels run on "
                         f"{kernel_device_type()} tensors here")


def _unit_stride_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when one of its two matrix dims has unit stride (row- or column-major,
    any batch stride), else a row-major copy: the kernel loads 16-byte vectors along the
    unit-stride dim.  Same values either way, so the same bits (layout invariance)."""
    st = t.stride()
    if st[-1] == 1 or st[-2] == 1:
        return t
    return t.contiguous()


#: (device type, index, dtype) -> [(largest M or None, ((config, launch kwargs) for K-major B,
#: (config, launch kwargs) for N-major B)), ...]: the table's classes with everything a
#: launch passes besides shapes and strides, built once (per-call lookups cost host time).
_PLANS: dict = {}


def _tile_kwargs(cfg, dtype) -> dict:
    """The launch arguments both matmul kernels take from a config."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                COMPUTE_DTYPE=compute_dtype(dtype), ROWWISE=interpreting(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _kwargs(cfg, dtype) -> dict:
    """kernels/matmul.py's launch arguments (the pointer kernel)."""
    return dict(_tile_kwargs(cfg, dtype), CHUNK_BLOCKS=cfg.chunk_blocks, MASK_ROWS=cfg.mask_rows)


def _tma_kwargs(cfg, dtype) -> dict:
    """kernels/matmul_tma.py's launch arguments (the copy-engine kernel)."""
    return dict(_tile_kwargs(cfg, dtype), FLATTEN=cfg.flatten)


def _tma_matrix(t: torch.Tensor, rows: int, cols: int, s_row: int, s_col: int, box_rows: int, box_cols: int):
    """A host tensor descriptor over the [rows, cols] matrix ``t`` (strides ``s_row``,
    ``s_col``), or over its transpose's storage when it is column-major: ``(descriptor,
    transposed)``; None when the copy engine cannot take it (16-byte aligned base and
    non-unit stride needed)."""
    es = t.element_size()
    if t.data_ptr() % 16:
        return None
    if s_col == 1 and (s_row * es) % 16 == 0 and (rows == 1 or s_row >= cols):
        return descriptor(TensorDescriptor, t, (rows, cols), (s_row, 1), (box_rows, box_cols)), False
    if s_row == 1 and (s_col * es) % 16 == 0 and (cols == 1 or s_col >= rows):
        return descriptor(TensorDescriptor, t, (cols, rows), (s_col, 1), (box_cols, box_rows)), True
    return None


def _launch_tma(a, b, c, M: int, N: int, K: int, sa, sb, cfg, kwargs) -> bool:
    """c [M, N] (row-major, fresh) = a @ b through :func:`matmul_tma_kernel` with ``cfg``'s
    tiles; False (nothing launched) when a descriptor cannot be made for these tensors, and
    the caller runs the pointer kernel with its class's tiles (the same bits: same K order)."""
    if TensorDescriptor is None or (N * c.element_size()) % 16 or c.data_ptr() % 16:
        return False
    da = _tma_matrix(a, M, K, sa[1], sa[2], cfg.block_m, cfg.block_k)
    db = _tma_matrix(b, K, N, sb[1], sb[2], cfg.block_k, cfg.block_n) if da is not None else None
    if db is None:
        return False
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    grid = (min(tiles, sm_count(c.device)) if cfg.persistent else tiles,)
    c_desc = descriptor(TensorDescriptor, c, (M, N), (N, 1), (cfg.block_m, cfg.block_n))
    launch(matmul_tma_kernel, grid, da[0], db[0], c_desc, M, N, K, A_T=da[1], B_T=db[1], **kwargs)
    return True


def _plan(device: torch.device, dtype: torch.dtype):
    key = (device.type, device.index, dtype)
    plan = _PLANS.get(key)
    if plan is None:
        arch = arch_key(device)
        plan = []
        for bound, _ in matmul_classes(arch, dtype):
            m = bound if bound is not None else 1 << 62
            tma = matmul_tma_config(arch, dtype, m)
            tma = (tma, _tma_kwargs(tma, dtype)) if tma is not None else (None, None)
            pair = tuple((cfg, _kwargs(cfg, dtype)) + tma
                         for cfg in (matmul_config(arch, dtype, m, False), matmul_config(arch, dtype, m, True)))
            plan.append((bound, pair))
        if device.index is not None or interpreting():
            _PLANS[key] = plan
    return plan


def _launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, Bt: int, M: int, N: int, K: int,
            sa, sb, sc, options=None) -> torch.Tensor:
    """c [Bt, M, N] = a [Bt, M, K] @ b [Bt, K, N] for checked tensors of one dtype given with
    their (batch, row, column) strides ``sa``/``sb``/``sc`` (batch stride 0 for 2-d), any
    layout with a unit stride in each matrix.  Tiles from the config table by (arch, dtype,
    M class, B's major dim); the sum over K runs in ascending order whatever the tiles and
    layouts (kernels/matmul.py).  ``options``: a :class:`bitstable.launch_options.LaunchOptions`
    whose ``matmul_config`` replaces the table's tiles (explorations only; default: the
    options in force)."""
    if Bt == 0 or M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    sab, sam, sak = sa
    sbb, sbk, sbn = sb
    # A dim of size 1 has an arbitrary stride; give it the row-major value, so that the
    # kernel never takes it for the unit-stride dim (a [1, K] view of a column made the
    # M=1 product 2x slower).  Launch-only: no element's address changes.
    if M == 1:
        sam = K * sak if sak else 1
    if N == 1:
        sbn = K * sbk if sbk else 1
    b_n_major = sbn == 1 and sbk != 1
    forced = (_LAUNCH_OPTIONS[0] if options is None else options).matmul_config
    if forced is not None:
        cfg, kwargs = forced, _kwargs(forced, a.dtype)
        tma_cfg, tma_kwargs = (forced, _tma_kwargs(forced, a.dtype)) if forced.tma else (None, None)
    else:
        for bound, pair in _plan(a.device, a.dtype):
            if bound is None or M <= bound:
                cfg, kwargs, tma_cfg, tma_kwargs = pair[b_n_major]
                break
    if tma_cfg is not None and Bt == 1 and c.dim() == 2 and _launch_tma(a, b, c, M, N, K, sa, sb, tma_cfg,
                                                                         tma_kwargs):
        return c
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n), Bt)
    launch(matmul_kernel, grid, a, b, c, M, N, K, sab, sam, sak, sbb, sbk, sbn, sc[0], sc[1], sc[2],
                        MASK_M=sam == 1 and sak != 1, MASK_N=b_n_major, **kwargs)
    return c


def _check_out_dtype(out_dtype, dtype: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return dtype
    if out_dtype not in (dtype, torch.float32):
        raise TypeError(f"out_dtype must be None, the inputs' dtype {dtype} or torch.float32, got {out_dtype}")
    return out_dtype


def bmm(a: torch.Tensor, b: torch.Tensor, *, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """a [batch, M, K] @ b [batch, K, N] -> [batch, M, N] in a's dtype, any strides.

    ``out_dtype=torch.float32`` stores the float32 accumulator unrounded (16-bit inputs);
    the sum is the same, only the final rounding is skipped."""
    _check("a", a, 3)
    _check("b", b, 3)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share one dtype, got {a.dtype} and {b.dtype}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
    Bt, M, K = a.shape
    N = b.shape[2]
    c = torch.empty((Bt, M, N), dtype=_check_out_dtype(out_dtype, a.dtype), device=a.device)
    a, b = _unit_stride_view(a), _unit_stride_view(b)
    return _launch(a, b, c, Bt, M, N, K, a.stride(), b.stride(), c.stride())


def _check_mm_operands(a: torch.Tensor, b: torch.Tensor):
    """(M, K, N) of ``a [M, K] @ b [K, N]``: two 2-d tensors the kernel takes, one dtype,
    matching inner dims (errors name ``a`` and ``b``)."""
    _check("a", a, 2)
    _check("b", b, 2)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share one dtype, got {a.dtype} and {b.dtype}")
    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
    return M, K, N


def mm(a: torch.Tensor, b: torch.Tensor, *, tp_tree: Optional[int] = None,
       out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N], any strides (row-major, column-major, strided views).

    ``tp_tree=S`` (a power of two): K reduced as the fixed tree of :func:`tree_leaves`
    ``(K, S)`` float32 leaf partials (:func:`tree_mm`).  ``out_dtype=torch.float32``:
    the float32 result unrounded."""
    if tp_tree is not None:
        return tree_mm(a, b, tp_tree, out_dtype=out_dtype)
    M, K, N = _check_mm_operands(a, b)
    c = torch.empty((M, N), dtype=_check_out_dtype(out_dtype, a.dtype), device=a.device)
    a, b = _unit_stride_view(a), _unit_stride_view(b)
    sa, sb = a.stride(), b.stride()
    return _launch(a, b, c, 1, M, N, K, (0, sa[0], sa[1]), (0, sb[0], sb[1]), (0, N, 1))


def _check_scalar(name: str, value) -> None:
    if isinstance(value, complex) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta=1, alpha=1, *,
          tp_tree: Optional[int] = None) -> torch.Tensor:
    """``torch.addmm``: ``beta * bias + alpha * (a @ b)``, the product ``mm(a, b)``
    (batch-invariant), the rest elementwise in float32, rounded once to a's dtype.

    ``bias`` broadcasts to [M, N] (0-d, [N], [1, N], [M, 1], [M, N]) and has a's dtype;
    ``beta == 0`` ignores it entirely (NaN and inf in it are not propagated), as stock.
    ``tp_tree=S``: the product is :func:`tree_mm` (rounded once), the bias added after it
    exactly as here.
    """
    _check("a", a, 2)
    _check("b", b, 2)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share one dtype, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor, got {type(bias).__name__}")
    if bias.dtype != a.dtype:
        raise TypeError(f"bias must have a and b's dtype {a.dtype}, got {bias.dtype}")
    if bias.device != a.device:
        raise ValueError(f"bias is on {bias.device}, expected a's device {a.device}")
    M, N = a.shape[0], b.shape[1]
    if bias.dim() > 2 or any(s not in (1, want) for s, want in zip(reversed(bias.shape), (N, M))):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to the product's "
                         f"[{M}, {N}] (0-d, [{N}], [1, {N}], [{M}, 1] or [{M}, {N}])")
    _check_scalar("beta", beta)
    _check_scalar("alpha", alpha)
    prod = mm(a, b) if tp_tree is None else tree_mm(a, b, tp_tree)
    if beta == 0 and alpha == 1:
        return prod
    if beta == 1 and alpha == 1:   # one rounding either way: the same bits as through float32
        return prod + bias
    out = prod.float() if alpha == 1 else prod.float() * alpha
    if beta != 0:
        out = out + (bias.float() if beta == 1 else bias.float() * beta)
    return out.to(a.dtype)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a [..., M, K] and b [K, N] (a linear layer's product) or 2-d/3-d pairs."""
    if isinstance(b, torch.Tensor) and b.dim() == 2 and isinstance(a, torch.Tensor) and a.dim() >= 2:
        lead = a.shape[:-1]
        return mm(a.reshape(-1, a.shape[-1]), b).reshape(*lead, b.shape[-1])
    if isinstance(a, torch.Tensor) and a.dim() == 3:
        return bmm(a, b)
    raise ValueError("bitstable.ops.matmul takes a [..., M, K] @ b [K, N] or 3-d @ 3-d")


# --- the K tree (tp_tree) ---------------------------------------------------------------------

def check_tp_tree(tp_tree) -> int:
    """``tp_tree`` itself if it is a power of two >= 1, else a clear error."""
    if isinstance(tp_tree, bool) or not isinstance(tp_tree, int):
        raise TypeError(f"tp_tree must be an int (a power of two), got {type(tp_tree).__name__}")
    if tp_tree < 1 or tp_tree & (tp_tree - 1):
        raise ValueError(f"tp_tree must be a power of two >= 1 (the largest tensor-parallel size), got {tp_tree}")
    return tp_tree


def tree_leaves(K: int, tp_tree: int) -> int:
    """The number of leaves of the K tree: ``gcd(K, tp_tree)``, the largest power of two
    that divides K, capped at ``tp_tree``.

    K divisible by S gets S leaves of K/S.  Any other K gets fewer, equal leaves (K odd:
    one leaf, the plain product).  The rule holds at every TP size: a size t that
    divides S and K (an even K shard) divides ``gcd(K, S)``, and a rank's shard
    ``K/t`` has ``tree_leaves(K/t, S/t) = gcd(K, S)/t`` leaves, a complete subtree."""
    check_tp_tree(tp_tree)
    return math.gcd(K, tp_tree) if K > 0 else tp_tree


def tree_partials(a: torch.Tensor, b: torch.Tensor, leaves: int) -> torch.Tensor:
    """float32 [leaves, M, N]: leaf i is ``a[:, i*c:(i+1)*c] @ b[i*c:(i+1)*c]`` (c = K/leaves),
    each summed by the batch-invariant kernel into its own float32 accumulator; one
    launch (the leaves are the batch of strided views, no copies)."""
    M, K, N = _check_mm_operands(a, b)
    if isinstance(leaves, bool) or not isinstance(leaves, int) or leaves < 1 or (K and K % leaves):
        raise ValueError(f"leaves must be a positive int dividing K={K}, got {leaves}")
    c = torch.empty((leaves, M, N), dtype=torch.float32, device=a.device)
    _poison.fill(c)
    a, b = _unit_stride_view(a), _unit_stride_view(b)
    kc = K // leaves
    sa, sb = a.stride(), b.stride()
    return _launch(a, b, c, leaves, M, N, kc, (kc * sa[1], sa[0], sa[1]), (kc * sb[0], sb[0], sb[1]),
                   c.stride())


def tree_sum(partials: torch.Tensor) -> torch.Tensor:
    """The root of the balanced binary tree over ``partials`` [leaves, ...] (float32, a
    power-of-two count): each level adds neighbours ``(2i, 2i+1)``; ``leaves`` 1 is itself.

    The nodes of one level are independent of the others, so a contiguous, aligned
    run of 2^j leaves reduces to exactly the node the whole tree has there: a rank's
    subtree root, gathered with the other ranks' and finished here, is the same number."""
    n = partials.shape[0]
    if n < 1 or n & (n - 1):
        raise ValueError(f"tree_sum needs a power-of-two number of partials, got {n}")
    while partials.shape[0] > 1:
        partials = partials[0::2] + partials[1::2]
    return partials[0]


def tree_mm(a: torch.Tensor, b: torch.Tensor, tp_tree: int, *,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``a @ b`` with K reduced as the fixed tree of ``tree_leaves(K, tp_tree)`` float32
    leaves (:func:`tree_partials`, :func:`tree_sum`), rounded once to a's dtype (or kept
    float32: ``out_dtype=torch.float32``).  One leaf is the plain :func:`mm`."""
    _check("a", a, 2)
    _check("b", b, 2)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
    leaves = tree_leaves(a.shape[1], tp_tree)
    if leaves == 1 or a.shape[1] == 0:
        return mm(a, b, out_dtype=out_dtype)
    out_dtype = _check_out_dtype(out_dtype, a.dtype)
    root = tree_sum(tree_partials(a, b, leaves))
    return root if out_dtype == torch.float32 else root.to(out_dtype)
