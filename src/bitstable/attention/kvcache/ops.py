"""The KV-cache attention as one step (validate, plan, append, launch) and as the
``torch.library`` custom op ``bitstable::attn_kvcache`` that ``torch.compile`` traces.

* ``bitstable::attn_kvcache(q, k_cache!, v_cache!, k, v, cache_seqlens, ...) -> (out, lse)``
  mutates ``k_cache`` and ``v_cache`` (the new tokens' append) and returns fresh tensors.

Eager calls run :func:`kvcache_attention` directly (the op's Python dispatch costs tens of
microseconds per call, see attention/ops.py); while ``torch.compile`` traces, the public
function calls the op, whose fake implementation gives the output shapes.  Same code,
same kernels, same bits either way.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...configs import arch_key, attention_config
from ...launch_options import LaunchOptions
from ...launch_options import current as _current_options
from ..launch import resolve_split_size
from ..validation import last_dim_contiguous
from .append import append
from .launch import launch_decode
from .plan import plan_call
from .stock import stock_kvcache
from .validation import validate


def kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, split_size: Optional[int], deterministic: bool,
                      need_lse: bool, options: LaunchOptions) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``flash_attn_with_kvcache``'s work, in its order: every check (validate, then the
    plan, which checks the split size), then the append, then the attention (bitstable's
    kernels when ``deterministic``, else stock PyTorch).  A call that raises has written
    nothing.  Returns (out, lse or None unless ``need_lse`` or ``deterministic``)."""
    call = validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale,
                    causal, window_size, softcap, alibi_slopes)
    if not deterministic and call.before is None:
        raise RuntimeError("the stock (non-deterministic) KV-cache path reads cache_seqlens on the "
                           "host and cannot run inside CUDA graph capture")
    plan = None
    if deterministic:
        k_cache_c, v_cache_c = last_dim_contiguous(k_cache), last_dim_contiguous(v_cache)
        plan = plan_call(q, k_cache_c, v_cache_c, call, softcap, alibi_slopes, split_size, options)
    else:   # the split size is still checked before the append
        resolve_split_size(attention_config(arch_key(q.device), q.dtype, q.shape[3]).block_n, split_size)
    if k is not None and call.n_new > 0 and q.shape[0] > 0:
        append(k_cache, v_cache, k, v, call.cache_seqlens, call.cache_batch_idx, call.block_table,
               call.page_size)
    if not deterministic:
        totals = [s + call.n_new for s in call.before]
        return stock_kvcache(q, k_cache, v_cache, totals, call.cache_batch_idx, call.block_table,
                             call.page_size, call.softmax_scale, causal, window_size, softcap, alibi_slopes,
                             need_lse=need_lse)
    return launch_decode(plan, last_dim_contiguous(q), k_cache_c, v_cache_c, call, softcap, alibi_slopes)


@torch.library.custom_op("bitstable::attn_kvcache", mutates_args=("k_cache", "v_cache"))
def attn_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
                 v: Optional[torch.Tensor], cache_seqlens: Optional[torch.Tensor], cache_seqlens_int: int,
                 cache_batch_idx: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
                 softmax_scale: Optional[float], causal: bool, window_left: int, window_right: int,
                 softcap: float, alibi_slopes: Optional[torch.Tensor], split_size: int,
                 deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op: ``cache_seqlens`` a tensor, or None and ``cache_seqlens_int`` the int every
    row holds (read on the host for free).  Returns (out, lse); ``k_cache``/``v_cache``
    receive ``k``/``v`` in place."""
    seqlens = cache_seqlens if cache_seqlens is not None else cache_seqlens_int
    out, lse = kvcache_attention(q, k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table, softmax_scale,
                                 causal, (window_left, window_right), softcap, alibi_slopes, split_size,
                                 deterministic, True, _current_options())
    return out, lse


@attn_kvcache.register_fake
def _attn_kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, cache_seqlens_int, cache_batch_idx, block_table,
                       softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, split_size,
                       deterministic):
    B, Lq, Hq, D = q.shape
    return q.new_empty((B, Lq, Hq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)
