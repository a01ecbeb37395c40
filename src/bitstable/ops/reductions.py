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
from .._launch import launch


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.device.type != kernel_device_type():
        raise ValueError(f"x is on {x.device}; bitstable's kernels run on {kernel_device_type()} tensors here")


def _check_dtype(dtype) -> None:
    """``dtype=``: None (the input's) or a float dtype the kernels write."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be bfloat16, float16 or float32 (or None), got {dtype}")


def _wrap_dim(d, ndim: int) -> int:
    """torch's dim rule: ``-ndim <= d < ndim`` (a 0-d tensor takes -1 and 0), else IndexError."""
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"dim must be an int or a sequence of ints, got {type(d).__name__}")
    r = builtins.max(ndim, 1)
    if not -r <= d < r:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-r}, {r - 1}], but got {d})")
    return d % r


def _rows(x: torch.Tensor, dims: Sequence[int]):
    """(x's reduced dims moved last and flattened: [rows, n], the kept dims' sizes); rows of
    no elements (n = 0) keep their count."""
    keep = [d for d in range(x.dim()) if d not in dims]
    moved = x.permute(*keep, *dims).contiguous()
    n = 1
    for d in dims:
        n *= x.shape[d]
    kept = [x.shape[d] for d in keep]
    rows = 1
    for s in kept:
        rows *= s
    return moved.reshape(rows, n), kept


def _softmax(x: torch.Tensor, dim: int, log: bool, dtype=None) -> torch.Tensor:
    _check(x)
    _check_dtype(dtype)
    dim = _wrap_dim(dim, x.dim())
    out_dtype = dtype or x.dtype
    if x.numel() == 0:        # no rows, or rows of no elements: nothing to compute
        return torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if dim == x.dim() - 1 and x.is_contiguous():
        # the common case (the last dim of a contiguous tensor): the rows are x itself, the
        # launch the general path below makes for it, without its views and copies
        n = x.shape[-1]
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        launch(softmax_kernel, (x.numel() // n,), x, y, n, n, n, LOG=log, BLOCK=ROW_BLOCK[arch_key(x.device)])
        return y
    scalar = x.dim() == 0
    if scalar:
        x = x.reshape(1)
    moved = x.movedim(dim, -1).contiguous()
    rows = moved.reshape(-1, moved.shape[-1])
    y = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.numel():
        launch(softmax_kernel, (rows.shape[0],), rows, y, rows.shape[1], rows.stride(0), y.stride(0),
                                         LOG=log, BLOCK=ROW_BLOCK[arch_key(x.device)])
    y = y.reshape(moved.shape).movedim(-1, dim)
    return y.reshape(()) if scalar else y


def softmax(x: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    return _softmax(x, dim, False, dtype)


def log_softmax(x: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    return _softmax(x, dim, True, dtype)


def _reduce(x, dim, keepdim, dtype, mean_: bool):
    _check(x)
    _check_dtype(dtype)
    if not isinstance(keepdim, bool):
        raise TypeError(f"keepdim must be a bool, got {type(keepdim).__name__}")
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dim = list(range(x.dim()))
    if not isinstance(dim, (int, list, tuple)):
        raise TypeError(f"dim must be an int, a sequence of ints or None, got {type(dim).__name__}")
    given = [dim] if isinstance(dim, int) else list(dim)
    dims = [_wrap_dim(d, x.dim()) for d in given]
    if len(set(dims)) != len(dims):
        raise ValueError(f"dim names a dimension more than once: {dim!r}")
    out_dtype = dtype or x.dtype
    scalar = x.dim() == 0
    if scalar:   # torch reduces a 0-d tensor over dim 0 / -1 (or none) to itself, 0-d
        x, dims = x.reshape(1), [0]
    dims = sorted(dims)
    n = x.shape[-1]
    if dims == [x.dim() - 1] and n and x.is_contiguous():
        # the common case (the last dim of a contiguous tensor, as in x.pow(2).mean(-1)): the
        # rows are x itself, the launch the general path makes for it, without its copies
        lead = tuple(x.shape[:-1])       # () for a 0-d input (reshaped to [1] above)
        y = torch.empty(lead + (1,) if keepdim and not scalar else lead, dtype=out_dtype, device=x.device)
        if x.numel():
            launch(row_sum_kernel, (x.numel() // n,), x, y, n, n, 1.0 / n if mean_ else 1.0,
                   BLOCK=ROW_BLOCK[arch_key(x.device)])
        return y
    rows, kept_shape = _rows(x, dims)
    y = torch.empty(rows.shape[0], dtype=out_dtype, device=x.device)
    n = rows.shape[1]
    if rows.shape[0]:
        scale = (1.0 / n if n else float("nan")) if mean_ else 1.0
        launch(row_sum_kernel, (rows.shape[0],), rows, y, n, rows.stride(0), scale,
                                         BLOCK=ROW_BLOCK[arch_key(x.device)])
    y = y.reshape(kept_shape)
    if keepdim and not scalar:
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
