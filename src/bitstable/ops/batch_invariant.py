"""``set_batch_invariant_mode``: swap PyTorch's own ops for batch-invariant ones.

Through ``torch.library`` the mode registers bitstable's kernels (``bitstable.ops``)
as the implementations of ``aten::mm``, ``aten::addmm``, ``aten::bmm``,
``aten::_softmax``, ``aten::_log_softmax``, ``aten::mean.dim``,
``aten::sum.dim_IntList`` and ``aten::native_layer_norm`` on the device kernels run on (CUDA; the CPU under
Triton's interpreter), so unmodified models become batch-invariant.  Autograd's
formulas for these ops call the same ops, so gradients through them are
deterministic too.  ``aten::rms_norm`` and ``aten::scaled_dot_product_attention``
(composite ops in PyTorch) are registered at the autograd key and the backend key,
with their own deterministic gradients: RMS norm through bitstable's row kernel,
SDPA through bitstable's attention (``attention/sdpa.py``).  Inputs the kernels do not take (other dtypes, devices)
fall through to the stock kernels.

The mode nests: ``with set_batch_invariant_mode():`` inside another block, or
``set_batch_invariant_mode(False)`` to turn it off inside an enabled block;
``exclude=[...]`` leaves chosen ops stock.  Leaving a block (also through an
exception) restores the state before it.

``tp_tree=S`` (a power of two, off by default) turns on the K tree of ``mm`` and
``addmm`` (``bitstable.ops.tree_mm``): the reduction over K that tensor parallelism
up to S ranks computes (``bitstable.parallel``), so a one-process model and every
TP size dividing S give the same bits.  Like ``exclude`` it belongs to the block:
an inner block without ``tp_tree`` runs without the tree.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as _fwad

from .. import ops
from .matmul import check_tp_tree
from .._backend import interpreting
from . import traced
from ..attention.sdpa import batch_invariant_sdpa, set_stock_guard

#: The ops the mode replaces, by the names ``exclude`` takes.
OPS = ("mm", "addmm", "bmm", "_softmax", "_log_softmax", "mean.dim", "sum.dim_IntList",
       "native_layer_norm", "rms_norm", "scaled_dot_product_attention")

_lock = threading.RLock()
#: A mode state: (enabled, excluded op names, tp_tree or None).
_State = Tuple[bool, frozenset, Optional[int]]
_OFF: _State = (False, frozenset(), None)
_base: _State = _OFF
_stack: List[_State] = []
_lib: Optional[torch.library.Library] = None
_active: _State = _OFF
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dispatch_key() -> str:
    return "CPU" if interpreting() else "CUDA"


@contextlib.contextmanager
def stock_ops():
    """Run stock kernels for a moment (inputs the batch-invariant kernels do not take)."""
    with _lock:
        saved = _active
        _apply(_OFF)
        try:
            yield
        finally:
            _apply(saved)


#: The stock kernels of the replaced ops, captured at import before any override exists:
#: name -> (kernel, dispatch keyset).  A fallback calls the stock kernel directly instead of
#: tearing the registrations down and rebuilding them around the call (which cost two
#: rebuilds of every override per fallback).  Empty on torch without
#: ``torch.library.get_kernel`` (< 2.9): fallbacks then take :func:`stock_ops`.
_STOCK: dict = {}
#: The stock *autograd* kernels of the non-composite ops (name -> kernel): the autograd-key
#: entries (:data:`_AUTOGRAD_IMPLS`) hand eager calls back to them.
_STOCK_AUTOGRAD: dict = {}


def _capture_stock_kernels() -> None:
    if not hasattr(torch.library, "get_kernel"):
        return
    key = _dispatch_key()
    for name in OPS:
        k = ("Autograd" + key) if name in ("rms_norm", "scaled_dot_product_attention") else key
        try:
            _STOCK[name] = (torch.library.get_kernel("aten::" + name, k),
                            torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, k)))
            if k == key:
                _STOCK_AUTOGRAD[name] = torch.library.get_kernel("aten::" + name, "Autograd" + key)
        except Exception:  # noqa: BLE001 - an op this torch build lacks keeps the slow path
            pass


def _stock(name: str, fallback, *args, **kwargs):
    """Run the stock kernel of ``name`` (an entry of :data:`OPS`) on these arguments;
    ``fallback`` (the public torch call) runs under :func:`stock_ops` where no stock
    kernel was captured."""
    entry = _STOCK.get(name)
    if entry is not None:
        kernel, keyset = entry
        return kernel.call_boxed(keyset, *args, **kwargs)
    with stock_ops():
        return fallback(*args, **kwargs)


def _grad_wanted(*args) -> bool:
    """Whether autograd would record anything for a call on ``args``: grad mode on and a
    tensor argument that requires grad, or a forward-mode AD level open (its dual tensors
    need the autograd kernel's jvp).  False lets the overrides skip the autograd layer."""
    if getattr(_fwad, "_current_level", 0) >= 0:     # (unknown: assume a level is open)
        return True
    if not torch.is_grad_enabled():
        return False
    for t in args:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def _ok(*tensors) -> bool:
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
            return False
    return True


def _mm(a, b):
    if not _ok(a, b) or a.dtype != b.dtype:
        return _stock("mm", torch.mm, a, b)
    tree = _active[2]
    return ops.mm(a, b) if tree is None else ops.mm(a, b, tp_tree=tree)


def _bmm(a, b):
    if not _ok(a, b) or a.dtype != b.dtype:
        return _stock("bmm", torch.bmm, a, b)
    return ops.bmm(a, b)


def _addmm(bias, a, b, *, beta=1, alpha=1):
    # Float matrices of one dtype take bitstable's product whatever the bias: a bias of
    # another dtype (stock raises too) or shape gets ops.addmm's TypeError / ValueError.
    if not _ok(a, b) or a.dtype != b.dtype:
        return _stock("addmm", torch.addmm, bias, a, b, beta=beta, alpha=alpha)
    tree = _active[2]
    if tree is None:
        return ops.addmm(bias, a, b, beta=beta, alpha=alpha)
    return ops.addmm(bias, a, b, beta=beta, alpha=alpha, tp_tree=tree)


def _softmax(x, dim, half_to_float):
    if not _ok(x) or (half_to_float and x.dtype != torch.float16):   # stock's error for the rest
        return _stock("_softmax", torch.ops.aten._softmax, x, dim, half_to_float)
    return ops.softmax(x, dim, dtype=torch.float32 if half_to_float else None)


def _log_softmax(x, dim, half_to_float):
    if not _ok(x) or (half_to_float and x.dtype != torch.float16):
        return _stock("_log_softmax", torch.ops.aten._log_softmax, x, dim, half_to_float)
    return ops.log_softmax(x, dim, dtype=torch.float32 if half_to_float else None)


def _mean(x, dim=None, keepdim=False, *, dtype=None):
    if not _ok(x) or (dtype is not None and dtype not in _DTYPES):
        return _stock("mean.dim", torch.ops.aten.mean.dim, x, dim, keepdim, dtype=dtype)
    return ops.mean(x, dim, keepdim, dtype)


def _sum(x, dim=None, keepdim=False, *, dtype=None):
    if not _ok(x) or (dtype is not None and dtype not in _DTYPES):
        return _stock("sum.dim_IntList", torch.ops.aten.sum.dim_IntList, x, dim, keepdim, dtype=dtype)
    return ops.sum(x, dim, keepdim, dtype)


def _native_layer_norm(x, normalized_shape, weight, bias, eps):
    # A float input takes bitstable's kernel; bad weight / bias (dtype, shape, device) get
    # ops.norms' TypeError / ValueError naming them.
    if not _ok(x):
        return _stock("native_layer_norm", torch.ops.aten.native_layer_norm, x, normalized_shape, weight,
                      bias, eps)
    from .norms import native_layer_norm

    return native_layer_norm(x, normalized_shape, weight, bias, eps)


class _RMSNorm(torch.autograd.Function):
    """RMS norm with bitstable's row kernel forward (the same bits with and without
    grad) and a deterministic composite backward (fp32)."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        y, rstd = traced.rms_norm_forward(x, normalized_shape, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xh = x.float() * rstd
        g = dy.float() * (weight.float() if weight is not None else 1.0)
        dx = rstd * (g - xh * (g * xh).mean(ctx.dims, keepdim=True))
        dw = None
        if weight is not None and ctx.needs_input_grad[2]:
            lead = tuple(range(x.dim() - len(ctx.dims)))
            dw = (dy.float() * xh).sum(lead).to(weight.dtype) if lead else (dy.float() * xh).to(weight.dtype)
        return dx.to(x.dtype), None, dw, None


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    if not _ok(x) or (weight is not None and (not _ok(weight) or weight.dtype != x.dtype)):
        return _stock("rms_norm", torch.ops.aten.rms_norm, x, normalized_shape, weight, eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    if not _grad_wanted(x, weight):      # _RMSNorm.forward's own call, without the Function
        return traced.rms_norm_forward(x, tuple(normalized_shape), weight, eps)[0]
    return _RMSNorm.apply(x, tuple(normalized_shape), weight, eps)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    return batch_invariant_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _autograd_entry(name: str, traced_fn, takes):
    """The autograd-key entry of ``name``: eager calls that need a gradient go back to the
    stock autograd kernel (which records aten's formula and reaches the backend-key
    override), eager calls that need none call the backend-key override directly (what the
    stock autograd kernel would reach, one dispatcher round trip sooner), so eager bits are
    unchanged; traced calls (torch.compile) whose inputs the kernels take run
    ``traced_fn`` (ops/traced.py: custom ops the compiled graph keeps)."""
    stock = _STOCK_AUTOGRAD[name]
    key = _dispatch_key()
    # the autograd kernel redispatches to ``keys & after_autograd``: the backend key (none of
    # these ops is a view or in-place, so ADInplaceOrView would only fall through)
    keys = (torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, "Autograd" + key))
            | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key)))

    impl = _IMPLS[name]

    def entry(x, *args, **kwargs):
        if traced.tracing(x) and takes(x, *args, **kwargs):
            return traced_fn(x, *args, **kwargs)
        if not _grad_wanted(x, *args):
            return impl(x, *args, **kwargs)
        return stock.call_boxed(keys, x, *args, **kwargs)

    return entry


def _mm_takes(a, b):
    return _ok(a, b) and a.dtype == b.dtype


def _addmm_takes(bias, a, b, *, beta=1, alpha=1):
    return _ok(a, b) and a.dtype == b.dtype and isinstance(beta, (int, float)) and isinstance(alpha, (int, float))


def _softmax_takes(x, dim, half_to_float):
    return _ok(x) and not (half_to_float and x.dtype != torch.float16)


def _reduce_takes(x, dim=None, keepdim=False, *, dtype=None):
    return _ok(x) and (dtype is None or dtype in _DTYPES)


def _layer_norm_takes(x, normalized_shape, weight, bias, eps):
    return _ok(x)


_TRACED = {
    "mm": (traced.mm, _mm_takes),
    "bmm": (traced.bmm, _mm_takes),
    "addmm": (lambda bias, a, b, *, beta=1, alpha=1: traced.addmm(bias, a, b, beta, alpha), _addmm_takes),
    "_softmax": (lambda x, dim, h: traced.softmax(x, dim, h, False), _softmax_takes),
    "_log_softmax": (lambda x, dim, h: traced.softmax(x, dim, h, True), _softmax_takes),
    "mean.dim": (lambda x, dim=None, keepdim=False, *, dtype=None: traced.reduce(x, dim, keepdim, dtype, True),
                 _reduce_takes),
    "sum.dim_IntList": (lambda x, dim=None, keepdim=False, *, dtype=None:
                        traced.reduce(x, dim, keepdim, dtype, False), _reduce_takes),
    "native_layer_norm": (traced.native_layer_norm, _layer_norm_takes),
}


#: Composite ops: registered at the autograd key too (their kernels handle gradients).
_COMPOSITE = ("rms_norm", "scaled_dot_product_attention")

_capture_stock_kernels()
set_stock_guard(stock_ops)

_IMPLS = {"mm": _mm, "addmm": _addmm, "bmm": _bmm, "_softmax": _softmax,
          "_log_softmax": _log_softmax, "mean.dim": _mean, "sum.dim_IntList": _sum,
          "native_layer_norm": _native_layer_norm, "rms_norm": _rms_norm,
          "scaled_dot_product_attention": _sdpa}

#: name -> autograd-key entry (torch.compile); empty on torch without get_kernel (< 2.9)
_AUTOGRAD_IMPLS = {name: _autograd_entry(name, fn, takes) for name, (fn, takes) in _TRACED.items()
                   if name in _STOCK_AUTOGRAD}


def _overload(name: str):
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


def _uncache_python_dispatch() -> None:
    """Forget the Python dispatcher's cached kernels of the replaced ops.  Tracing
    (torch.compile) resolves kernels through ``OpOverload._dispatch_cache``, which
    registering or destroying a ``torch.library`` impl does not clear: without this a graph
    traced after the mode ends would still find the mode's autograd entry, or none."""
    for name in OPS:
        _overload(name)._dispatch_cache.clear()


def _apply(state: _State) -> None:
    """Make the registered overrides match ``state`` (enabled, excluded op names, tp_tree)."""
    global _lib, _active
    if state == _active:
        return
    if state[:2] == _active[:2]:   # only the tree changed: the overrides read it per call
        _active = state
        return
    if _lib is not None:
        _lib._destroy()
        _lib = None
    enabled, exclude, _ = state
    if enabled:
        _lib = torch.library.Library("aten", "IMPL")
        key = _dispatch_key()
        for name, fn in _IMPLS.items():
            if name not in exclude:
                _lib.impl(name, fn, key)
                if name in _COMPOSITE:
                    _lib.impl(name, fn, "Autograd" + key)
                elif name in _AUTOGRAD_IMPLS:
                    _lib.impl(name, _AUTOGRAD_IMPLS[name], "Autograd" + key)
    _uncache_python_dispatch()
    _active = state


def _current() -> _State:
    return _stack[-1] if _stack else _base


def _check_exclude(exclude: Iterable[str]) -> frozenset:
    names = frozenset(exclude)
    unknown = names - set(OPS)
    if unknown:
        raise ValueError(f"exclude names unknown ops {sorted(unknown)}; choose from {list(OPS)}")
    return names


def _check_tree(tp_tree, enabled: bool) -> Optional[int]:
    if tp_tree is None:
        return None
    check_tp_tree(tp_tree)
    if not enabled:
        raise ValueError("tp_tree needs the batch-invariant mode on (enabled=True)")
    return tp_tree


class set_batch_invariant_mode:
    """Context manager: batch-invariant ``aten`` ops inside the block (``enabled=False``
    turns them off inside an enabled block); ``exclude`` leaves chosen ops stock;
    ``tp_tree=S`` (a power of two) reduces K of ``mm``/``addmm`` as the fixed tree of
    S leaves that tensor parallelism up to S ranks computes (docs/TENSOR_PARALLEL.md)."""

    def __init__(self, enabled: bool = True, exclude: Iterable[str] = (), tp_tree: Optional[int] = None):
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self._state = (enabled, _check_exclude(exclude), _check_tree(tp_tree, enabled))

    def __enter__(self):
        with _lock:
            _stack.append(self._state)
            _apply(self._state)
        return self

    def __exit__(self, *exc):
        with _lock:
            _stack.pop()
            _apply(_current())
        return False


def enable_batch_invariant_mode(exclude: Iterable[str] = (), tp_tree: Optional[int] = None) -> None:
    """Turn the mode on for the process (outside any ``with`` block); ``tp_tree`` as in
    :class:`set_batch_invariant_mode`."""
    global _base
    with _lock:
        _base = (True, _check_exclude(exclude), _check_tree(tp_tree, True))
        _apply(_current())


def disable_batch_invariant_mode() -> None:
    """Turn the process-wide mode off (``with`` blocks still apply inside them)."""
    global _base
    with _lock:
        _base = _OFF
        _apply(_current())


def is_batch_invariant_mode_enabled() -> bool:
    """Whether the batch-invariant overrides are active here and now."""
    return _current()[0]


def get_tp_tree() -> Optional[int]:
    """The K tree's leaf count S of the mode active here and now (None: no tree, or the
    mode is off, or ``mm`` is excluded)."""
    enabled, exclude, tree = _current()
    return tree if enabled and "mm" not in exclude else None


_attention_lib: Optional[torch.library.Library] = None


def register_batch_invariant_attention() -> None:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to bitstable for the whole
    process, whatever the batch-invariant mode (any model calling SDPA: transformers'
    ``attn_implementation="sdpa"``, custom modules).  Without a mask it runs bitstable's
    attention kernels (batch-invariant, deterministic backward); with a mask it runs
    SDPA's math path, whose matmuls and softmax are batch-invariant only while
    ``set_batch_invariant_mode`` is on.  Undo with :func:`unregister_batch_invariant_attention`."""
    global _attention_lib
    with _lock:
        if _attention_lib is not None:
            return
        lib = torch.library.Library("aten", "IMPL")
        key = _dispatch_key()
        lib.impl("scaled_dot_product_attention", _sdpa, key)
        lib.impl("scaled_dot_product_attention", _sdpa, "Autograd" + key)
        _attention_lib = lib
        _uncache_python_dispatch()


def unregister_batch_invariant_attention() -> None:
    """Give ``scaled_dot_product_attention`` back to PyTorch (the mode's own override stays)."""
    global _attention_lib
    with _lock:
        if _attention_lib is not None:
            _attention_lib._destroy()
            _attention_lib = None
            _uncache_python_dispatch()
