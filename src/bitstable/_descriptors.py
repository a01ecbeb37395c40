"""Host-side TMA descriptors with the validation done once per geometry:
``descriptor(cls, base, shape, strides, block_shape, *rest)``.

Triton's ``TensorDescriptor`` (and Gluon's) is a dataclass whose ``__post_init__`` checks
the rank, the block shape, the dtype's width against the strides, the layout, on every
construction: several microseconds per descriptor, two or three descriptors per launch.
Everything it checks but the base's alignment is a function of (class, dtype, shape,
strides, block shape, the remaining fields), so the first descriptor of a geometry is built
(and checked) by the class itself and its fields but the base are kept as a template;
later ones copy those fields and set their own base, after checking the base's 16-byte
alignment themselves (the one per-tensor check).  A descriptor is launch-only: the kernels load the same values from
either, so this changes no output.

Classes without an instance ``__dict__`` (a slotted dataclass in some other Triton) are
always built by the class.
"""

from __future__ import annotations

from typing import Sequence

import torch

#: (class, dtype, shape, strides, block_shape, rest) -> the fields (all but the base) of a
#: descriptor of that geometry that the class checked
_TEMPLATES: dict = {}
_MAX_TEMPLATES = 4096   # geometries are few (one per layer shape); a bound keeps a leak impossible


def descriptor(cls, base: torch.Tensor, shape: Sequence[int], strides: Sequence[int],
               block_shape: Sequence[int], *rest):
    """``cls(base, list(shape), list(strides), list(block_shape), *rest)``, checked by ``cls``
    the first time this geometry is seen and copied from that checked template after.
    ``base``: a tensor whose storage the descriptor addresses (its dtype is part of the
    geometry).  Raises what ``cls`` raises for a bad geometry, and AssertionError (as ``cls``
    does) for a base that is not 16-byte aligned."""
    key = (cls, base.dtype, tuple(shape), tuple(strides), tuple(block_shape), rest)
    fields = _TEMPLATES.get(key)
    if fields is None:
        made = cls(base, list(shape), list(strides), list(block_shape), *rest)
        if hasattr(made, "__dict__") and len(_TEMPLATES) < _MAX_TEMPLATES:
            # the checked fields without the base: a template pins no tensor's memory
            _TEMPLATES[key] = {k: v for k, v in made.__dict__.items() if k != "base"}
        return made
    if base.data_ptr() % 16:
        raise AssertionError("base must be 16-byte aligned")
    made = cls.__new__(cls)
    made.__dict__.update(fields)
    made.base = base
    return made
