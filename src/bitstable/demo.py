"""Old import path of :mod:`bitstable.cli.demo`, kept as an alias for one release.

``import bitstable.demo`` gives the very module object of ``bitstable.cli.demo``
(attribute reads and writes reach the real module).
"""
import sys as _sys

from .cli import demo as _real

_sys.modules[__name__] = _real
