"""Batch-invariant LayerNorm and RMSNorm: one program per row, fixed chunks, fp32 math."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..configs import ROW_BLOCK, arch_key
from ..kernels.rowwise import layer_norm_kernel
from .reductions import _check


def _norm(x, normalized_shape, weight, bias, eps, rms) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x)
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} does not match the input's last dims "
                         f"{tuple(x.shape[x.dim() - k:])}")
    n = 1
    for s in normalized_shape:
        n *= s
    rows = x.contiguous().reshape(-1, n)
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    w = weight.contiguous() if weight is not None else rows
    b = bias.contiguous() if bias is not None else rows
    if rows.shape[0] and n:
        layer_norm_kernel[(rows.shape[0],)](rows, w, b, y, mean, rstd, n, rows.stride(0), y.stride(0),
                                            float(eps), HAS_W=weight is not None, HAS_B=bias is not None,
                                            RMS=rms, BLOCK=ROW_BLOCK[arch_key(x.device)])
    stat_shape = tuple(x.shape[:x.dim() - k]) + (1,) * k
    return y.reshape(x.shape), mean.reshape(stat_shape), rstd.reshape(stat_shape)


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
