"""FlashAttention-compatible attention functions."""

from .flash_attn import flash_attn_func, flash_attn_varlen_func
from .kvcache import flash_attn_with_kvcache

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]
