"""FlashAttention-compatible attention functions."""

from .flash_attn import flash_attn_func, flash_attn_varlen_func
from .kvcache import flash_attn_with_kvcache
from .packed import (flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                     flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func)

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
