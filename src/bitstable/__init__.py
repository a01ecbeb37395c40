"""bitstable: bitwise-reproducible attention kernels for PyTorch, in Triton.

Public API only; see DESIGN.md for the invariance contract.
"""

from . import _backend  # noqa: F401  (decides CUDA vs Triton's interpreter before triton loads)
from .attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from . import ops
from .batch_invariant import (disable_batch_invariant_mode, enable_batch_invariant_mode,
                              is_batch_invariant_mode_enabled, set_batch_invariant_mode)
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
    "set_batch_invariant_mode",
    "enable_batch_invariant_mode",
    "disable_batch_invariant_mode",
    "is_batch_invariant_mode_enabled",
    "ops",
    "__version__",
]
