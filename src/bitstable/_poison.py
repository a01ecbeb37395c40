"""Debug switch: fill kernel outputs with NaN before the kernels write them.

With poisoning on (``bitstable.testing.poison_outputs()``, or the environment
variable ``BITSTABLE_POISON=1``), every output buffer a launcher allocates is
NaN-filled first, so an element a kernel forgot to write fails a test instead
of silently holding stale memory.  Off by default: it costs a memory pass.
"""

from __future__ import annotations

import os

import torch

_enabled = os.environ.get("BITSTABLE_POISON", "0") == "1"


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Set poisoning on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def fill(*tensors: torch.Tensor) -> None:
    """NaN-fill floating-point ``tensors`` if poisoning is on."""
    if _enabled:
        for t in tensors:
            t.fill_(float("nan"))
