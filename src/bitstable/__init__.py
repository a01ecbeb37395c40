"""bitstable: bitwise-reproducible attention kernels for PyTorch, in Triton.

Public API only; see DESIGN.md for the invariance contract.
"""

from . import _backend  # noqa: F401  (decides CUDA vs Triton's interpreter before triton loads)
from .attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from .mode import (DeterministicMode, get_deterministic_mode, set_deterministic,
                   set_deterministic_mode)

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "set_deterministic",
    "set_deterministic_mode",
    "get_deterministic_mode",
    "DeterministicMode",
    "__version__",
]
