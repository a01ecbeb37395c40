"""The batch-invariant mode under ``torch.compile``: its ops as ``torch.library`` custom ops.

In eager mode the mode's overrides sit at the backend dispatch key (``ops/batch_invariant.py``)
and autograd's own formulas call them.  ``torch.compile`` never reaches that key: AOTAutograd
traces ``aten.mm`` and friends with fake tensors and inductor then emits its own kernels
(cuBLAS, generated Triton reductions), so the mode would silently not apply.  The mode
therefore also registers the functions here at the *autograd* key:

* in eager (real tensors) they hand the call straight back to the stock autograd kernel, so
  eager bits, formulas and gradients are exactly those of the backend-key overrides;
* while tracing (``torch.compile``; fake or functional tensors) they run an
  ``autograd.Function`` whose forward is a ``bitstable::mode_*`` custom op (opaque to
  inductor; its implementation is the eager kernel, so the shape class of a matmul follows
  the runtime M, also under ``dynamic=True``) and whose backward is aten's own derivative
  formula written out (the same products, with the same layouts), the stock backward
  kernels of softmax / log_softmax / layer_norm wrapped as custom ops too, so inductor
  cannot re-derive them.

Shapes and dtypes are those of the aten ops they stand for.  Invariance: each op keeps the
row/batch invariance of its eager counterpart; the compiled graph's matmuls, norms, softmaxes
and reductions run bitstable's kernels (elementwise code around them is inductor's).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from .matmul import addmm as _addmm, bmm as _bmm, mm as _mm  # (ops.matmul is also a function)
from . import norms as _norms
from . import reductions as _red


def tracing(t) -> bool:
    """Whether ``t`` is being traced (torch.compile / export) rather than computed.  A tensor
    of the exact type ``torch.Tensor`` is fake only through a functionalization or functorch
    wrapper, which ``is_fake`` unwraps; without either it is real (the eager case, checked
    without ``is_fake``'s Python: a few microseconds on every call of the mode's ops)."""
    if torch.compiler.is_compiling():
        return True
    if type(t) is torch.Tensor and not torch._is_functional_tensor(t) and not _functorch_wrapped(t):
        return False
    return isinstance(t, torch.Tensor) and is_fake(t)


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


# --------------------------------------------------------------------------- custom ops (forward)

def _tp_tree() -> int:
    """The active mode's K tree (``set_batch_invariant_mode(tp_tree=S)``), 0 for none: read
    when the graph is traced and recorded in it as a constant argument."""
    from .batch_invariant import get_tp_tree   # (batch_invariant imports this module)

    return get_tp_tree() or 0


@torch.library.custom_op("bitstable::mode_mm", mutates_args=())
def mode_mm(a: torch.Tensor, b: torch.Tensor, tp_tree: int = 0) -> torch.Tensor:
    return _mm(a, b) if not tp_tree else _mm(a, b, tp_tree=tp_tree)


@mode_mm.register_fake
def _(a, b, tp_tree=0):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.custom_op("bitstable::mode_bmm", mutates_args=())
def mode_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _bmm(a, b)


@mode_bmm.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


@torch.library.custom_op("bitstable::mode_addmm", mutates_args=())
def mode_addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float,
               tp_tree: int = 0) -> torch.Tensor:
    if not tp_tree:
        return _addmm(bias, a, b, beta=beta, alpha=alpha)
    return _addmm(bias, a, b, beta=beta, alpha=alpha, tp_tree=tp_tree)


@mode_addmm.register_fake
def _(bias, a, b, beta, alpha, tp_tree=0):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.custom_op("bitstable::mode_softmax", mutates_args=())
def mode_softmax(x: torch.Tensor, dim: int, half_to_float: bool, log: bool) -> torch.Tensor:
    fn = _red.log_softmax if log else _red.softmax
    return fn(x, dim, dtype=torch.float32 if half_to_float else None)


@mode_softmax.register_fake
def _(x, dim, half_to_float, log):
    return torch.empty_like(x, dtype=torch.float32 if half_to_float else x.dtype,
                            memory_format=torch.contiguous_format)


@torch.library.custom_op("bitstable::mode_softmax_backward", mutates_args=())
def mode_softmax_backward(grad: torch.Tensor, out: torch.Tensor, dim: int, input_dtype: torch.dtype,
                          log: bool) -> torch.Tensor:
    """The stock backward kernel (per row), run eagerly inside the compiled graph."""
    op = torch.ops.aten._log_softmax_backward_data if log else torch.ops.aten._softmax_backward_data
    return op(grad, out, dim, input_dtype)


@mode_softmax_backward.register_fake
def _(grad, out, dim, input_dtype, log):
    return torch.empty_like(grad, dtype=input_dtype, memory_format=torch.contiguous_format)


def _reduced_shape(x, dim, keepdim) -> List[int]:
    dims = list(range(x.dim())) if not dim else [d % max(x.dim(), 1) for d in dim]
    return [1 if i in dims else s for i, s in enumerate(x.shape) if keepdim or i not in dims]


@torch.library.custom_op("bitstable::mode_reduce", mutates_args=())
def mode_reduce(x: torch.Tensor, dim: Optional[List[int]], keepdim: bool, dtype: Optional[torch.dtype],
                mean: bool) -> torch.Tensor:
    return (_red.mean if mean else _red.sum)(x, dim, keepdim, dtype)


@mode_reduce.register_fake
def _(x, dim, keepdim, dtype, mean):
    return x.new_empty(_reduced_shape(x, dim, keepdim), dtype=dtype or x.dtype)


@torch.library.custom_op("bitstable::mode_layer_norm", mutates_args=())
def mode_layer_norm(x: torch.Tensor, normalized_shape: List[int], weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], eps: float, rms: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """(y, mean, rstd) of bitstable's row kernel (mean unused for RMS norm)."""
    return _norms._norm(x, normalized_shape, weight, bias, eps, rms=rms)


@mode_layer_norm.register_fake
def _(x, normalized_shape, weight, bias, eps, rms):
    stat = list(x.shape[:x.dim() - len(normalized_shape)]) + [1] * len(normalized_shape)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(stat, dtype=torch.float32), x.new_empty(stat, dtype=torch.float32))


@torch.library.custom_op("bitstable::mode_layer_norm_backward", mutates_args=())
def mode_layer_norm_backward(grad: torch.Tensor, x: torch.Tensor, normalized_shape: List[int],
                             mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], mask: List[bool]
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stock native_layer_norm_backward kernel, run eagerly; absent results as empty."""
    outs = torch.ops.aten.native_layer_norm_backward(grad, x, normalized_shape, mean, rstd, weight, bias, mask)
    return tuple(o if o is not None else x.new_empty(0) for o in outs)


@mode_layer_norm_backward.register_fake
def _(grad, x, normalized_shape, mean, rstd, weight, bias, mask):
    def like(t, on):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if on and t is not None else x.new_empty(0)
    return like(x, mask[0]), like(weight, mask[1]), like(bias, mask[2])


# --------------------------------------------------------------------------- autograd (aten's formulas)

def _maybe_multiply(t, s):
    return t if s == 1 else t * s


def _column_major(sizes, strides) -> bool:
    return strides[0] == 1 and strides[1] == sizes[0]


def _mat1_grad(grad, mat2, sizes, strides, alpha):
    """aten's mm_mat1_backward: a column-major input gets its gradient column-major."""
    if _column_major(sizes, strides):
        return _maybe_multiply(mat2.mm(grad.t()).t(), alpha)
    return _maybe_multiply(grad.mm(mat2.t()), alpha)


def _mat2_grad(grad, mat1, sizes, strides, alpha):
    """aten's mm_mat2_backward."""
    if _column_major(sizes, strides):
        return _maybe_multiply(grad.t().mm(mat1).t(), alpha)
    return _maybe_multiply(mat1.t().mm(grad), alpha)


class _Mm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        ctx.layouts = (tuple(a.shape), a.stride(), tuple(b.shape), b.stride())
        return mode_mm(a, b, _tp_tree())

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        sa, ta, sb, tb = ctx.layouts
        ga = _mat1_grad(g, b, sa, ta, 1) if ctx.needs_input_grad[0] else None
        gb = _mat2_grad(g, a, sb, tb, 1) if ctx.needs_input_grad[1] else None
        return ga, gb


class _Addmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, bias, a, b, beta, alpha):
        ctx.save_for_backward(a, b)
        ctx.layouts = (tuple(a.shape), a.stride(), tuple(b.shape), b.stride())
        ctx.beta, ctx.alpha = beta, alpha
        return mode_addmm(bias, a, b, float(beta), float(alpha), _tp_tree())

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        sa, ta, sb, tb = ctx.layouts
        gbias = _maybe_multiply(g, ctx.beta) if ctx.needs_input_grad[0] else None   # engine sums to shape
        ga = _mat1_grad(g, b, sa, ta, ctx.alpha) if ctx.needs_input_grad[1] else None
        gb = _mat2_grad(g, a, sb, tb, ctx.alpha) if ctx.needs_input_grad[2] else None
        return gbias, ga, gb, None, None


class _Bmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return mode_bmm(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = g.bmm(b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        gb = a.transpose(1, 2).bmm(g) if ctx.needs_input_grad[1] else None
        return ga, gb


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, half_to_float, log):
        y = mode_softmax(x, dim, half_to_float, log)
        ctx.save_for_backward(y)
        ctx.args = (dim, x.dtype, log)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        dim, dtype, log = ctx.args
        return mode_softmax_backward(g, y, dim, dtype, log), None, None, None


def _expand_back(g, sizes, dim, keepdim):
    """aten's sum_backward: the reduced dims re-inserted, then expanded to the input."""
    if not keepdim and len(sizes):
        dims = range(len(sizes)) if not dim else sorted(d % len(sizes) for d in dim)
        for d in dims:
            g = g.unsqueeze(d)
    return g.expand(sizes)


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, keepdim, dtype, mean):
        ctx.args = (tuple(x.shape), dim, keepdim, mean)
        return mode_reduce(x, dim, keepdim, dtype, mean)

    @staticmethod
    def backward(ctx, g):
        sizes, dim, keepdim, mean = ctx.args
        gx = _expand_back(g, sizes, dim, keepdim)
        if mean:
            n = 1
            for d in (range(len(sizes)) if not dim else dim):
                n *= sizes[d] if len(sizes) else 1
            gx = gx / n
        return gx, None, None, None, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        y, mean, rstd = mode_layer_norm(x, normalized_shape, weight, bias, eps, False)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.shape = normalized_shape
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd

    @staticmethod
    def backward(ctx, g, _gm, _gr):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2],
                bias is not None and ctx.needs_input_grad[3]]
        dx, dw, db = mode_layer_norm_backward(g, x, list(ctx.shape), mean, rstd, weight, bias, mask)
        return (dx if mask[0] else None), None, (dw if mask[1] else None), (db if mask[2] else None), None


def rms_norm_forward(x, normalized_shape, weight, eps) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of bitstable's RMS norm: a custom op while tracing, the kernel in eager."""
    if tracing(x):
        y, _, rstd = mode_layer_norm(x, list(normalized_shape), weight, None, eps, True)
        return y, rstd
    y, _, rstd = _norms._norm(x, normalized_shape, weight, None, eps, rms=True)
    return y, rstd


# --------------------------------------------------------------------------- autograd-key entry points

def mm(a, b):
    return _Mm.apply(a, b)


def bmm(a, b):
    return _Bmm.apply(a, b)


def addmm(bias, a, b, beta=1, alpha=1):
    return _Addmm.apply(bias, a, b, beta, alpha)


def softmax(x, dim, half_to_float, log=False):
    return _Softmax.apply(x, dim, half_to_float, log)


def reduce(x, dim: Optional[Sequence[int]], keepdim, dtype, mean):
    return _Reduce.apply(x, None if dim is None else list(dim), keepdim, dtype, mean)


def native_layer_norm(x, normalized_shape, weight, bias, eps):
    return _LayerNorm.apply(x, list(normalized_shape), weight, bias, eps)
