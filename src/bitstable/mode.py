"""Process-wide mode switches: deterministic attention on/off and the split size.

``set_deterministic(False)`` routes bitstable's attention calls to stock
PyTorch (``scaled_dot_product_attention``, or eager math where SDPA cannot
express a feature), so users can compare the two with one switch.

``split_size`` is the number of keys per split of the reduction order (see
DESIGN.md): configuration, chosen once, never derived from the input.  It must
be a positive multiple of the key block ``block_n`` of every config in use
(the default, 1024, is a multiple of all of them).

``reduction_tree`` names the order in which a row's split states are merged.
bitstable has one: ``"sequential"`` (splits merged one after another in ascending
key order into a running total, the same chain in the prefill kernel's registers
and in the decode combine kernel; docs/CONTRACT.md section 3).  The deterministic
flash-attn fork's ``"pairwise"`` (a balanced tree over the splits) is a different
order and is not implemented: it raises ``NotImplementedError`` (see
:data:`REDUCTION_TREES`).

Each setter returns a handle that restores the previous mode when used as a
context manager::

    with bitstable.set_deterministic_mode(True, split_size=4096):
        out = bitstable.flash_attn_func(q, k, v)
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional

from .configs import DEFAULT_SPLIT_SIZE


class DeterministicMode(NamedTuple):
    """What :func:`get_deterministic_mode` returns."""

    enabled: bool
    split_size: int


_lock = threading.Lock()
_mode = DeterministicMode(True, DEFAULT_SPLIT_SIZE)


class _Restore:
    """Returned by the setters; restores the previous mode on ``__exit__``."""

    def __init__(self, previous: DeterministicMode):
        self._previous = previous

    def __enter__(self) -> DeterministicMode:
        return _mode

    def __exit__(self, *exc) -> None:
        _set(self._previous)


def _set(mode: DeterministicMode) -> _Restore:
    global _mode
    with _lock:
        previous, _mode = _mode, mode
    return _Restore(previous)


def check_split_size(split_size, block_n: Optional[int] = None) -> int:
    """``split_size`` checked: an int (not a bool), positive, a multiple of 16 and, when
    ``block_n`` is given (at launch), of the config's key block.  Raises TypeError /
    ValueError naming ``split_size``; returns it."""
    if isinstance(split_size, bool) or not isinstance(split_size, int):
        raise TypeError(f"split_size must be an int, got {type(split_size).__name__}")
    if split_size <= 0 or split_size % 16 != 0:
        raise ValueError(f"split_size must be a positive multiple of 16 (and of the "
                         f"config's block_n at launch), got {split_size}")
    if block_n is not None and split_size % block_n != 0:
        raise ValueError(f"split_size={split_size} must be a multiple of the key block "
                         f"block_n={block_n} of this (arch, dtype, head_dim) config")
    return split_size


_check_split_size = check_split_size


def set_deterministic(enabled: bool) -> _Restore:
    """Turn bitstable's deterministic kernels on (default) or route to stock PyTorch."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    return _set(DeterministicMode(enabled, _mode.split_size))


#: The values of ``set_deterministic_mode(reduction_tree=...)`` and what they mean.
REDUCTION_TREES = {
    "sequential": "implemented (the default and only order): a row's split states are merged "
                  "one after another in ascending split order, from the first split on",
    "pairwise": "not implemented: a balanced binary tree over the splits.  A tree whose shape "
                "depends only on the row's own splits (which training, chunked prefill and "
                "decode agree on) could keep training = prefill = decode, but bitstable's "
                "kernels merge splits as a running fold; a tree needs kernel work (a stack of "
                "up to log2(num_splits) partial states per row in the prefill kernel, a tree "
                "in the decode combine kernel) that has not been done",
}

#: The one order bitstable's kernels compute.
REDUCTION_TREE = "sequential"


def check_reduction_tree(reduction_tree) -> str:
    """``reduction_tree`` checked: None or ``"sequential"`` pass (returns ``"sequential"``);
    ``"pairwise"`` raises ``NotImplementedError``, any other string ``ValueError``, any
    other type ``TypeError``, each naming ``reduction_tree``."""
    if reduction_tree is None:
        return REDUCTION_TREE
    if not isinstance(reduction_tree, str):
        raise TypeError(f"reduction_tree must be a str or None, got {type(reduction_tree).__name__}")
    if reduction_tree == REDUCTION_TREE:
        return reduction_tree
    if reduction_tree in REDUCTION_TREES:
        raise NotImplementedError(
            f"reduction_tree={reduction_tree!r} is {REDUCTION_TREES[reduction_tree]}; "
            f"pass reduction_tree={REDUCTION_TREE!r} (bitstable's order)")
    raise ValueError(f"reduction_tree must be {REDUCTION_TREE!r} (bitstable's split merge order: "
                     f"ascending, one split after another), got {reduction_tree!r}")


def set_deterministic_mode(enabled: bool, split_size: Optional[int] = None,
                           reduction_tree: Optional[str] = REDUCTION_TREE) -> _Restore:
    """Set determinism and the split size (``None`` restores the default, 1024).

    ``reduction_tree``: the order of the merge of split states; only ``"sequential"``
    (bitstable's order; ``None`` means the same) is accepted.  ``"pairwise"`` (the
    deterministic flash-attn fork's default) raises ``NotImplementedError``; see
    :data:`REDUCTION_TREES`.  All arguments are checked before the mode changes.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    check_reduction_tree(reduction_tree)
    size = DEFAULT_SPLIT_SIZE if split_size is None else _check_split_size(split_size)
    return _set(DeterministicMode(enabled, size))


def get_deterministic_mode() -> DeterministicMode:
    """The current ``(enabled, split_size)``."""
    return _mode
