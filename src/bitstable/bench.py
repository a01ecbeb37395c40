"""Old import path of :mod:`bitstable.cli.bench`, kept as an alias for one release.

``import bitstable.bench`` gives the very module object of ``bitstable.cli.bench``
(attribute reads and writes reach the real module).
"""
import sys as _sys

from .cli import bench as _real

_sys.modules[__name__] = _real
