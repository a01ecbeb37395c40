"""One Triton launch with less host work per call: ``launch(kernel, grid, *args, **kwargs)``.

``kernel[grid](*args, **kwargs)`` runs Triton's ``JITFunction.run`` on every call: the
argument binder, a cache key that formats the options as a string, a check of the
kernel's globals, the launch-metadata hook, then the compiled kernel's launcher.  An eager
model pays that on every launch of every layer.  Here the first call of a specialization
goes through ``JITFunction.run`` (which compiles, checks and launches) and its compiled
kernel is kept under a key made of what Triton specializes on (the binder's own
specialization of every argument, and the options); later calls with that key call the
compiled kernel's launcher directly.  The same compiled kernel gets the same arguments, so
the launch is the same (bits included); only host time changes.

The direct path is taken only where it is known to match Triton's: a GPU (not the
interpreter), a Triton whose ``JITFunction`` has the ``device_caches`` binder and whose
compiled kernels have ``run`` / ``function`` / ``packed_metadata`` (3.4 to 3.6 do), and no
launch hooks installed (profilers such as proton install them: then every call goes
through ``JITFunction.run``).  ``BITSTABLE_DIRECT_LAUNCH=0`` turns it off.

Triton 3.6's launcher object (``CudaLauncher``) wraps its C ``launch`` in a Python function
that, on every call, loops over every argument to expand the TMA descriptor arguments
(``make_tensordesc_arg``) into the C launcher's fields: a list append per argument, some
fifty per attention launch.  Where the compiled kernel's launcher has exactly that shape
(:func:`_raw_launch`), the positions and metadata of its descriptor arguments are read once
from that wrapper, and later calls expand only those positions (with the wrapper's own
``make_tensordesc_arg``) and call the C ``launch`` with the fields the wrapper would have
passed: the same launch.  Anything else keeps the compiled kernel's own launcher.
"""

from __future__ import annotations

import os

import torch

from ._backend import interpreting    # first: it decides the interpreter before triton loads

import triton  # noqa: E402


def _supported() -> bool:
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (3, 4) <= (major, minor) <= (3, 6)


#: On by default: the whole ``-m gpu`` suite passed with it on (H200, triton 3.6, 238 passed;
#: benchmarks/results/2026-12-03-h200-session13/).  ``BITSTABLE_DIRECT_LAUNCH=0`` turns it off.
_ENABLED = (not interpreting()) and os.environ.get("BITSTABLE_DIRECT_LAUNCH", "1") != "0" and _supported()

#: Calls of Triton 3.6's C launcher without its Python wrapper (see the module docstring);
#: ``BITSTABLE_RAW_LAUNCH=0`` keeps the compiled kernel's own launcher (the A/B switch).
_RAW_ENABLED = os.environ.get("BITSTABLE_RAW_LAUNCH", "1") != "0"

#: (id(kernel), device, specialization, options) -> the compiled kernel's :class:`_Direct`
#: (kernels live as long as their modules, so their ids stay theirs)
_COMPILED: dict = {}
#: Launches that took the direct path (tests read it).
direct_launches = 0
#: Of those, launches that called Triton's C launcher without its Python wrapper.
raw_launches = 0

#: ``CudaLauncher.__call__``'s leading fields before the kernel's arguments, in Triton 3.6:
#: grid x/y/z, stream, function, cooperative grid, PDL, global scratch, profile scratch,
#: packed metadata, launch metadata, enter hook, exit hook.
_BASE_FIELDS = 13


class _Direct:
    """One compiled specialization's direct launch: ``raw`` (the C launcher, or None: call
    ``compiled.run``), ``descs`` ((argument position, tensordesc metadata) of every TMA
    descriptor argument, last position first) and ``make_desc`` (the launcher's own
    expansion of one descriptor)."""

    __slots__ = ("compiled", "raw", "descs", "make_desc", "cooperative", "pdl")

    def __init__(self, compiled):
        self.compiled = compiled
        self.raw, self.descs, self.make_desc = _raw_launch(compiled)
        launcher = compiled.run if self.raw is not None else None
        self.cooperative = getattr(launcher, "launch_cooperative_grid", False)
        self.pdl = getattr(launcher, "launch_pdl", False)


def _raw_launch(compiled):
    """``(c_launch, descs, make_desc)`` when ``compiled.run`` is Triton 3.6's ``CudaLauncher``
    with no scratch buffers and its ``launch`` is the C launcher itself or the descriptor
    wrapper over it (``wrap_handle_tensordesc``'s ``inner``, recognised by its code's free
    variables and module constant); ``(None, (), None)`` for anything else."""
    try:
        return _recognise(compiled)
    except Exception:      # a launcher of another shape: its own path
        return None, (), None


def _recognise(compiled):
    none = (None, (), None)
    launcher = getattr(compiled, "run", None)
    call = getattr(type(launcher), "__call__", None)
    code = getattr(call, "__code__", None)
    if (type(launcher).__name__ != "CudaLauncher" or code is None or code.co_argcount != 6
            or code.co_varnames[:6] != ("self", "gridX", "gridY", "gridZ", "stream", "function")):
        return none
    if getattr(launcher, "global_scratch_size", 1) or getattr(launcher, "profile_scratch_size", 1):
        return none
    fn = getattr(launcher, "launch", None)
    if fn is None:
        return none
    inner = getattr(fn, "__code__", None)
    if inner is None:                       # the C launcher itself: no descriptor arguments
        return fn, (), None
    cells = dict(zip(inner.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    make_desc = fn.__globals__.get("make_tensordesc_arg")
    if (set(cells) != {"launcher", "tensordesc_indices", "tensordesc_meta"} or make_desc is None
            or fn.__globals__.get("_BASE_ARGS_FORMAT_LEN") != _BASE_FIELDS):
        return none
    indices = sorted(cells["tensordesc_indices"])
    metas = cells["tensordesc_meta"] or [None] * len(indices)
    if len(metas) != len(indices):
        return none
    return cells["launcher"], tuple(reversed(list(zip(indices, metas)))), make_desc


def expand_descriptors(args: tuple, descs, make_desc) -> list:
    """The kernel arguments ``args`` with each TMA descriptor argument at the positions of
    ``descs`` ((position, metadata), last position first) replaced by its launcher fields
    ``make_desc(arg, metadata)``: what Triton 3.6's descriptor wrapper passes on."""
    out = list(args)
    for pos, meta in descs:
        out[pos:pos + 1] = make_desc(out[pos], meta)
    return out


def _installed(hook) -> bool:
    """A launch hook is set: Triton 3.6 keeps them as (possibly empty) ``HookChain`` objects,
    earlier ones as a callable or None."""
    return hook is not None and bool(getattr(hook, "calls", True))


_KNOBS = getattr(triton, "knobs", None)   # Triton 3.4+: its runtime switches
#: The current CUDA device's index without ``torch.cuda.current_device``'s Python (its lazy
#: init check: a launch has CUDA tensors, so CUDA is initialised)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def _hooks_installed() -> bool:
    return _installed(_KNOBS.runtime.launch_enter_hook) or _installed(_KNOBS.runtime.launch_exit_hook)


def _triton_options(kwargs: dict) -> None:
    """The two options ``JITFunction.run`` adds to every call's keyword arguments."""
    kwargs["debug"] = kwargs.get("debug", False) or _KNOBS.runtime.debug
    kwargs["instrumentation_mode"] = _KNOBS.compilation.instrumentation_mode


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel's launcher once this
    specialization has been compiled (see the module docstring).  ``grid``: a tuple of 1-3
    ints.  Returns nothing."""
    global direct_launches, raw_launches, _ENABLED
    if not _ENABLED or _KNOBS is None or _hooks_installed():
        kernel[grid](*args, **kwargs)
        return
    try:
        device = _current_device()
        caches = kernel.device_caches[device]
        binder = caches[4]
        _triton_options(kwargs)
        bound, specialization, options = binder(*args, **kwargs)
        key = (id(kernel), device, tuple(specialization), tuple(options.items()))
        entry = _COMPILED.get(key)
    except Exception:          # a Triton whose internals differ: the standard path from now on
        _ENABLED = False
        kwargs.pop("debug", None)
        kwargs.pop("instrumentation_mode", None)
        kernel[grid](*args, **kwargs)
        return
    if entry is None:
        compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        _COMPILED[key] = _Direct(compiled)
        return
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    compiled = entry.compiled
    raw = entry.raw
    if raw is None or not _RAW_ENABLED:
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *bound.values())
    else:
        values = bound.values()
        if entry.descs:
            values = expand_descriptors(tuple(values), entry.descs, entry.make_desc)
        raw(grid[0], g1, g2, stream, compiled.function, entry.cooperative, entry.pdl, None, None,
            compiled.packed_metadata, None, None, None, *values)
        raw_launches += 1
    direct_launches += 1
