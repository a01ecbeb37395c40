"""Old import path of :mod:`bitstable.ops.batch_invariant`, kept as an alias for one release.

``import bitstable.batch_invariant`` gives the very module object of ``bitstable.ops.batch_invariant``
(attribute reads and writes reach the real module).
"""
import sys as _sys

from .ops import batch_invariant as _real

_sys.modules[__name__] = _real
