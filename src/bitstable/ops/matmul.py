"""Batch-invariant matrix products: ``mm``, ``bmm``, ``addmm``, ``matmul``.

Each output element sums over K in ascending order (configs.MatmulConfig) with
tiles fixed per (arch, dtype) (configs.py), so ``mm(a[:m], b)`` equals
``mm(a, b)[:m]`` bit for bit for every m.  Accumulation is float32 (IEEE fp32
for float32 inputs, never tf32).
"""

from __future__ import annotations

import torch
import triton

from .._backend import compute_dtype, interpreting, kernel_device_type
from ..configs import arch_key, matmul_classes, matmul_config
from ..kernels.matmul import matmul_kernel
from ..launch_options import _ACTIVE as _LAUNCH_OPTIONS

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


def _kwargs(cfg, dtype) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                CHUNK_BLOCKS=cfg.chunk_blocks, MASK_ROWS=cfg.mask_rows,
                COMPUTE_DTYPE=compute_dtype(dtype), ROWWISE=interpreting(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _plan(device: torch.device, dtype: torch.dtype):
    key = (device.type, device.index, dtype)
    plan = _PLANS.get(key)
    if plan is None:
        arch = arch_key(device)
        plan = []
        for bound, _ in matmul_classes(arch, dtype):
            m = bound if bound is not None else 1 << 62
            pair = tuple((cfg, _kwargs(cfg, dtype))
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
        cfg = forced
        kwargs = _kwargs(cfg, a.dtype)
    else:
        for bound, pair in _plan(a.device, a.dtype):
            if bound is None or M <= bound:
                cfg, kwargs = pair[b_n_major]
                break
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), Bt)
    matmul_kernel[grid](a, b, c, M, N, K, sab, sam, sak, sbb, sbk, sbn, sc[0], sc[1], sc[2],
                        MASK_M=sam == 1 and sak != 1, MASK_N=b_n_major, **kwargs)
    return c


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [batch, M, K] @ b [batch, K, N] -> [batch, M, N] in a's dtype, any strides."""
    _check("a", a, 3)
    _check("b", b, 3)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share one dtype, got {a.dtype} and {b.dtype}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
    Bt, M, K = a.shape
    N = b.shape[2]
    c = torch.empty((Bt, M, N), dtype=a.dtype, device=a.device)
    a, b = _unit_stride_view(a), _unit_stride_view(b)
    return _launch(a, b, c, Bt, M, N, K, a.stride(), b.stride(), c.stride())


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N], any strides (row-major, column-major, strided views)."""
    _check("a", a, 2)
    _check("b", b, 2)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share one dtype, got {a.dtype} and {b.dtype}")
    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    a, b = _unit_stride_view(a), _unit_stride_view(b)
    sa, sb = a.stride(), b.stride()
    return _launch(a, b, c, 1, M, N, K, (0, sa[0], sa[1]), (0, sb[0], sb[1]), (0, N, 1))


def _check_scalar(name: str, value) -> None:
    if isinstance(value, complex) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta=1, alpha=1) -> torch.Tensor:
    """``torch.addmm``: ``beta * bias + alpha * (a @ b)``, the product ``mm(a, b)``
    (batch-invariant), the rest elementwise in float32, rounded once to a's dtype.

    ``bias`` broadcasts to [M, N] (0-d, [N], [1, N], [M, 1], [M, N]) and has a's dtype;
    ``beta == 0`` ignores it entirely (NaN and inf in it are not propagated), as stock.
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
    prod = mm(a, b)
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
