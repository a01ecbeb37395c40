"""Batch-invariant LayerNorm and RMSNorm: one program per row, fixed chunks, fp32 math."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..configs import ROW_BLOCK, arch_key
from ..kernels.rowwise import layer_norm_kernel
from .reductions import _check
from .._launch import launch


def _check_args(x, normalized_shape, weight, bias, eps) -> Tuple[int, ...]:
    """torch's rules for the norms' arguments, as TypeError / ValueError naming the argument;
    returns ``normalized_shape`` as a tuple.  weight and bias must have exactly
    ``normalized_shape`` (the kernel reads that many elements of each, nothing past them)."""
    _check(x)
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in normalized_shape):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if k == 0:
        raise ValueError("normalized_shape must have at least one entry, got ()")
    if k > x.dim() or tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} does not match the input's last dims "
                         f"(x has shape {tuple(x.shape)})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
        if tuple(t.shape) != normalized_shape:
            raise ValueError(f"{name} must have shape normalized_shape {normalized_shape}, "
                             f"got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    return normalized_shape


def _norm(x, normalized_shape, weight, bias, eps, rms) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    normalized_shape = _check_args(x, normalized_shape, weight, bias, eps)
    k = len(normalized_shape)
    n = 1
    for s in normalized_shape:
        n *= s
    xc = x if x.is_contiguous() else x.contiguous()
    stat_shape = tuple(x.shape[:x.dim() - k]) + (1,) * k
    # outputs in their final shapes (contiguous: row r at r * n, its stats at r)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(stat_shape, dtype=torch.float32, device=x.device)
    rstd = torch.empty(stat_shape, dtype=torch.float32, device=x.device)
    w = weight.contiguous() if weight is not None else xc
    b = bias.contiguous() if bias is not None else xc
    if not n:       # rows of no elements: stock's statistics (mean 0, 1/sqrt(var) NaN)
        mean.zero_()
        rstd.fill_(float("nan"))
    elif xc.numel():
        launch(layer_norm_kernel, (xc.numel() // n,), xc, w, b, y, mean, rstd, n, n, n, float(eps),
               HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms, BLOCK=ROW_BLOCK[arch_key(x.device)])
    return y, mean, rstd


def layer_norm(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.layer_norm``, each row normalised on its own."""
    return _norm(x, normalized_shape, weight, bias, eps, rms=False)[0]


def rms_norm(x: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor] = None,
             eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight``, each row on its own."""
    return _norm(x, normalized_shape, weight, None, eps, rms=True)[0]


def native_layer_norm(x, normalized_shape, weight, bias, eps):
    """aten::native_layer_norm's contract: (y, mean, rstd), stats shaped for its backward."""
    return _norm(x, normalized_shape, weight, bias, eps, rms=False)
