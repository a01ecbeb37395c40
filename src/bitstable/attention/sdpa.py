"""``scaled_dot_product_attention`` with SDPA's arguments, batch-invariant.

Used by ``set_batch_invariant_mode`` (which routes ``aten::scaled_dot_product_attention``
here) and usable directly.  Layout is SDPA's: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D].

* No mask, no dropout, and ``is_causal`` only with Lq == Lk (SDPA's causal mask is
  top-left aligned, flash-attn's bottom-right; they agree when Lq == Lk):
  bitstable's attention kernels (bitwise reproducible forward and backward,
  batch-invariant, the same bits as ``flash_attn_func``).
* An explicit ``attn_mask`` (bool or additive) or top-left causal with Lq != Lk:
  SDPA's math decomposition, whose matmuls and softmax are the batch-invariant
  ops while the mode is on.
* ``dropout_p > 0`` or inputs the kernels do not take: stock SDPA.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch

from ..mode import get_deterministic_mode
from .ops import attention

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

#: Context manager under which stock SDPA runs for inputs bitstable does not take.  The
#: batch-invariant mode installs its own (which lifts its overrides for the call, so stock
#: SDPA does not re-enter this function); the mode imports this module, never the reverse.
_stock_guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def set_stock_guard(guard: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Install the context manager stock SDPA runs under (see :data:`_stock_guard`)."""
    global _stock_guard
    _stock_guard = guard


def _kernel_ok(q, k, v) -> bool:
    return (all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.dtype == q.dtype for t in (q, k, v))
            and q.dtype in _DTYPES and q.device == k.device == v.device
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and q.shape[0] == k.shape[0] == v.shape[0] and k.shape[1] == v.shape[1] and k.shape[2] == v.shape[2]
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0)


def batch_invariant_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                         is_causal: bool = False, scale: Optional[float] = None,
                         enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``'s contract, batch-invariant
    (see the module docstring for which path a call takes)."""
    Lq = query.shape[-2] if query.dim() >= 2 else 0
    Lk = key.shape[-2] if key.dim() >= 2 else 0
    grouped = query.dim() == 4 and key.dim() == 4 and query.shape[1] != key.shape[1]
    if (dropout_p == 0.0 and attn_mask is None and (not is_causal or Lq == Lk)
            and _kernel_ok(query, key, value) and (enable_gqa or not grouped)):
        sm = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        right = 0 if is_causal else -1
        out, _ = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), sm, -1, right,
                           0.0, None, get_deterministic_mode().split_size)
        return out.transpose(1, 2)
    if dropout_p == 0.0 and all(isinstance(t, torch.Tensor) and t.dtype in _DTYPES for t in (query, key, value)):
        if attn_mask is not None and attn_mask.dtype == torch.bool:   # as SDPA does before its math path
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=attn_mask.device).masked_fill(
                attn_mask.logical_not(), float("-inf"))
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, 0.0, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]
    with _stock_guard():
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa)
