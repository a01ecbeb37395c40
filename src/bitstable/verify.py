"""Old import path of :mod:`bitstable.cli.verify`, kept as an alias for one release.

``import bitstable.verify`` gives the very module object of ``bitstable.cli.verify``
(attribute reads and writes reach the real module).
"""
import sys as _sys

from .cli import verify as _real

_sys.modules[__name__] = _real
