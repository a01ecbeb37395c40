"""flash-attn's public names, as its package exports them, for a one-line switch::

    from bitstable.flash_attn import flash_attn_qkvpacked_func   # was: from flash_attn import ...

The same functions as :mod:`bitstable`'s top level (bitwise-reproducible; see each
docstring for what differs from flash-attn: no dropout, ``return_attn_probs`` returns
``None`` in place of the probability matrix).
"""

from .attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                        flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                        flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
