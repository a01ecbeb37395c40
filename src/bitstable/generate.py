"""Old import path of :mod:`bitstable.integrations.generate`, kept as an alias for one release.

``import bitstable.generate`` gives the very module object of ``bitstable.integrations.generate``
(attribute reads and writes reach the real module).
"""
import sys as _sys

from .integrations import generate as _real

_sys.modules[__name__] = _real
