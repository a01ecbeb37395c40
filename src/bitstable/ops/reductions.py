"""Batch-invariant softmax, log-softmax, sum and mean over one or more dims.

The reduced dims are moved last and flattened; one program reduces one row in
fixed chunks (configs.ROW_BLOCK), so a row's result never depends on the
others.  Computed in float32, returned in the input dtype (or ``dtype``).
"""

from __future__ import annotations

import builtins
from typing import Optional, Sequence, Union

import torch

from .._backend import kernel_device_type
from ..configs import ROW_BLOCK, arch_key
from ..kernels.rowwise import row_sum_kernel, softmax_kernel


def _rows(x: torch.Tensor, dims: Sequence[int]):
    dims = sorted(d % x.dim() for d in dims)
    keep = [d for d in range(x.dim()) if d not in dims]
    moved = x.permute(*keep, *dims).contiguous()
    n = 1
    for d in dims:
        n *= x.shape[d]
    return moved.reshape(-1, n), [x.shape[d] for d in keep], dims


def _check(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.device.type != kernel_device_type():
        raise ValueError(f"x is on {x.device}; bitstable's kernels run on {kernel_device_type()} tensors here")


def _softmax(x: torch.Tensor, dim: int, log: bool, dtype=None) -> torch.Tensor:
    _check(x)
    out_dtype = dtype or x.dtype
    if x.dim() == 0:
        x = x.reshape(1)
    dim = dim % x.dim()
    moved = x.movedim(dim, -1).contiguous()
    rows = moved.reshape(-1, moved.shape[-1])
    y = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.numel():
        softmax_kernel[(rows.shape[0],)](rows, y, rows.shape[1], rows.stride(0), y.stride(0),
                                         LOG=log, BLOCK=ROW_BLOCK[arch_key(x.device)])
    return y.reshape(moved.shape).movedim(-1, dim)


def softmax(x: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    return _softmax(x, dim, False, dtype)


def log_softmax(x: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    return _softmax(x, dim, True, dtype)


def _reduce(x, dim, keepdim, dtype, mean_: bool):
    _check(x)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dim = list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    rows, kept_shape, dims = _rows(x, dims)
    out_dtype = dtype or x.dtype
    y = torch.empty(rows.shape[0], dtype=out_dtype, device=x.device)
    n = rows.shape[1]
    if rows.shape[0]:
        scale = (1.0 / n if n else float("nan")) if mean_ else 1.0
        row_sum_kernel[(rows.shape[0],)](rows, y, n, rows.stride(0), scale,
                                         BLOCK=ROW_BLOCK[arch_key(x.device)])
    y = y.reshape(kept_shape)
    if keepdim:
        for d in dims:
            y = y.unsqueeze(d)
    return y


def sum(x: torch.Tensor, dim: Union[int, Sequence[int], None] = None, keepdim: bool = False,
        dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return _reduce(x, dim, keepdim, dtype, False)


def mean(x: torch.Tensor, dim: Union[int, Sequence[int], None] = None, keepdim: bool = False,
         dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return _reduce(x, dim, keepdim, dtype, True)


_ = builtins  # ``sum`` shadows the builtin inside this module on purpose
