"""bitstable: bitwise-reproducible attention kernels for PyTorch, in Triton.

Public API only; see DESIGN.md for the invariance contract.
"""

from . import _backend  # noqa: F401  (decides CUDA vs Triton's interpreter before triton loads)
from .attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                        flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                        flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
from . import ops
from .ops.batch_invariant import (disable_batch_invariant_mode, enable_batch_invariant_mode,
                              get_tp_tree, is_batch_invariant_mode_enabled, register_batch_invariant_attention,
                              set_batch_invariant_mode, unregister_batch_invariant_attention)
from . import parallel  # noqa: E402  (tensor parallelism: docs/TENSOR_PARALLEL.md)
from .mode import (DeterministicMode, get_deterministic_mode, set_deterministic,
                   set_deterministic_mode)



def register_bitstable_attention(name: str = "bitstable") -> str:
    """Register ``attn_implementation="bitstable"`` with Hugging Face transformers
    (see :mod:`bitstable.integrations.transformers`)."""
    from .integrations.transformers import register_bitstable_attention as _register

    return _register(name)


__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "set_deterministic",
    "set_deterministic_mode",
    "get_deterministic_mode",
    "DeterministicMode",
    "set_batch_invariant_mode",
    "enable_batch_invariant_mode",
    "disable_batch_invariant_mode",
    "is_batch_invariant_mode_enabled",
    "get_tp_tree",
    "register_batch_invariant_attention",
    "unregister_batch_invariant_attention",
    "register_bitstable_attention",
    "ops",
    "parallel",
    "__version__",
]
