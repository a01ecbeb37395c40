"""Old import path of :mod:`bitstable.cli.bench_ops`, kept as an alias for one release.

``import bitstable.bench_ops`` gives the very module object of ``bitstable.cli.bench_ops``
(attribute reads and writes reach the real module).
"""
import sys as _sys

from .cli import bench_ops as _real

_sys.modules[__name__] = _real
