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

#: (id(kernel), device, specialization, options) -> the compiled kernel (kernels live as long
#: as their modules, so their ids stay theirs)
_COMPILED: dict = {}
#: Launches that took the direct path (tests read it).
direct_launches = 0


def _installed(hook) -> bool:
    """A launch hook is set: Triton 3.6 keeps them as (possibly empty) ``HookChain`` objects,
    earlier ones as a callable or None."""
    return hook is not None and bool(getattr(hook, "calls", True))


_KNOBS = getattr(triton, "knobs", None)   # Triton 3.4+: its runtime switches


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
    global direct_launches, _ENABLED
    if not _ENABLED or _KNOBS is None or _hooks_installed():
        kernel[grid](*args, **kwargs)
        return
    try:
        device = torch.cuda.current_device()
        caches = kernel.device_caches[device]
        binder = caches[4]
        _triton_options(kwargs)
        bound, specialization, options = binder(*args, **kwargs)
        key = (id(kernel), device, tuple(specialization), tuple(options.items()))
        compiled = _COMPILED.get(key)
    except Exception:          # a Triton whose internals differ: the standard path from now on
        _ENABLED = False
        kwargs.pop("debug", None)
        kwargs.pop("instrumentation_mode", None)
        kernel[grid](*args, **kwargs)
        return
    if compiled is None:
        compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        _COMPILED[key] = compiled
        return
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *bound.values())
    direct_launches += 1
