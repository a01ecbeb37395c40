"""Old import path of :mod:`bitstable.cli.bench_model`, kept as an alias for one release.

``import bitstable.bench_model`` gives the very module object of ``bitstable.cli.bench_model``
(attribute reads and writes reach the real module).
"""
import sys as _sys

from .cli import bench_model as _real

_sys.modules[__name__] = _real
