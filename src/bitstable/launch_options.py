"""Launch options: the one home of every launch-only knob a caller may force.

The kernels' launch choices (loop structure, copy-engine loads, pipeline depth, the
decode kernel family, combine tiles, ...) come from the frozen config table
(:mod:`bitstable.configs`).  Explorations (``benchmarks/explore_*.py``) and tests force
other choices to time them or to prove they give the same bits, and they do it only
here: one frozen :class:`LaunchOptions` whose ``None`` fields mean "the table's
choice", and the :func:`forced` context manager::

    from bitstable import launch_options

    with launch_options.forced(fwd_loop="nested", fwd_tma=False):
        out = flash_attn_func(q, k, v, causal=True)

The launchers read :func:`current` once per call (or take ``options=`` explicitly) and
key their plan caches on it, so the default costs one global read per call.  A call
reads the options in force when it runs: an autograd backward reads them when
``backward()`` runs, and a CUDA graph keeps the launches it captured.  Which variant a
call takes can be read from its plan: :func:`bitstable.attention.launch.forward_plan`,
:func:`bitstable.attention.backward.backward_plan`,
:func:`bitstable.attention.kvcache.decode_plan`.

Every field but ``bwd_config`` and ``matmul_config`` is launch-only: it changes how an
output is computed, never which sum it is (the tests prove it bit for bit).  Those two
replace a whole table entry; a config with another ``block_n`` (backward) or
``block_k`` (matmul) is another reduction order, for the exploration scripts only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

_LOOPS = (None, "branch", "nested")


@dataclass(frozen=True)
class LaunchOptions:
    """Forced launch choices; ``None`` everywhere (:data:`DEFAULT`) forces nothing.

    Forward (attention/launch.py):
        fwd_loop: ``"branch"`` or ``"nested"``, the forward kernel's block-loop structure.
        fwd_tma: whole key/value blocks through the copy engine (True) or pointer loads.
    Backward (attention/backward.py):
        bwd_config: a :class:`bitstable.configs.BackwardConfig` replacing the table's.
        bwd_skip_full_masks: skip the mask work on fully visible tiles or not.
    Decode (attention/kvcache, ``flash_attn_with_kvcache``):
        decode_tile: ``(block_m, num_warps)`` of the Triton partial kernel.
        decode_stages: pipeline stages of the partial kernel (Triton or Gluon).
        decode_even_d: False forces masked head-dim loads (True: the table's, i.e.
            16-byte loads where the head dim needs no padding).
        decode_combine: ``(block_m, num_warps)`` of the combine kernel.
        decode_tma: False: no copy-engine loads (and no Gluon kernel, which needs them).
        decode_pdl: False: the combine kernel launches after the partial kernel ends
            instead of as its programmatic dependent.
        decode_gluon: False: never the Hopper Gluon one-token kernel; True: wherever it
            can run (any grid, 4 stages unless ``decode_stages``).
    Matmul (ops/matmul.py):
        matmul_config: a :class:`bitstable.configs.MatmulConfig` for every product.
    """

    fwd_loop: Optional[str] = None
    fwd_tma: Optional[bool] = None
    bwd_config: Optional[object] = None
    bwd_skip_full_masks: Optional[bool] = None
    decode_tile: Optional[Tuple[int, int]] = None
    decode_stages: Optional[int] = None
    decode_even_d: Optional[bool] = None
    decode_combine: Optional[Tuple[int, int]] = None
    decode_tma: Optional[bool] = None
    decode_pdl: Optional[bool] = None
    decode_gluon: Optional[bool] = None
    matmul_config: Optional[object] = None

    def __post_init__(self):
        if self.fwd_loop not in _LOOPS:
            raise ValueError(f"fwd_loop must be one of {_LOOPS}, got {self.fwd_loop!r}")
        for name in ("decode_tile", "decode_combine"):
            value = getattr(self, name)
            if value is not None:
                if not (isinstance(value, (tuple, list)) and len(value) == 2
                        and all(isinstance(x, int) and x > 0 for x in value)):
                    raise ValueError(f"{name} must be (block_m, num_warps) of positive ints, got {value!r}")
                object.__setattr__(self, name, tuple(value))
        if self.decode_stages is not None and not (isinstance(self.decode_stages, int)
                                                   and self.decode_stages > 0):
            raise ValueError(f"decode_stages must be a positive int, got {self.decode_stages!r}")
        # Plan caches key on the options: hash once, not on every lookup.
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self))))

    def __hash__(self) -> int:
        return self._hash


#: No forcing: every launch choice is the config table's.
DEFAULT = LaunchOptions()

_ACTIVE = [DEFAULT]


def current() -> LaunchOptions:
    """The options in force (:data:`DEFAULT` outside :func:`forced`)."""
    return _ACTIVE[0]


@contextlib.contextmanager
def forced(**fields) -> Iterator[LaunchOptions]:
    """Force launch options inside a ``with`` block (nestable: fields add to the
    enclosing block's); yields the options in force.  Process-wide, not per thread:
    for explorations and tests, never for production code.  Unknown names raise
    ``TypeError``."""
    prev = _ACTIVE[0]
    opts = dataclasses.replace(prev, **fields)
    _ACTIVE[0] = opts
    try:
        yield opts
    finally:
        _ACTIVE[0] = prev
