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
from ..rotary import check_rotary, rotate
from ..sinks import apply_learnable_sink, check_learnable_sink
from ..validation import last_dim_contiguous
from .append import AppendRotary, append
from .launch import launch_decode
from .plan import plan_call
from .stock import stock_kvcache
from .validation import validate


def _rotary_span(q, n_new: int, along: bool) -> int:
    """How many positions past ``cache_seqlens[b]`` the call rotates: the new keys, and q's
    tokens (``along``: causal or windowed) or its one position."""
    return max(n_new, q.shape[1] if along else 1) if q.shape[0] else 0


def _check_rotary_range(call, rotary_cos, span: int) -> None:
    """The host check of the rotary table's length, where the lengths are on the host (else
    the kernels check it: ``max_before`` in kernels/cache_checks.py)."""
    if call.before is None:
        return
    need = max(call.before, default=0) + span
    if need > rotary_cos.shape[0]:
        raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions (seqlen_ro), the call "
                         f"rotates up to position {need - 1}")


def kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, split_size: Optional[int], deterministic: bool,
                      need_lse: bool, options: LaunchOptions, rotary_cos=None, rotary_sin=None,
                      rotary_interleaved: bool = True, learnable_sink=None, cache_leftpad=None,
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``flash_attn_with_kvcache``'s work, in its order: every check (validate, the rotary
    tables and the sink, then the plan, which checks the split size), then the rotary of q
    and the new k (flash-attn's positions: k at cache_seqlens + i; q too when causal or
    windowed, else all at cache_seqlens) and the append, in one launch where q has one
    token per new key (kernels/kv_append.py), then the attention (bitstable's kernels
    when ``deterministic``, else stock PyTorch) and the sink.  A call that raises has written
    nothing.  Values on the GPU (lengths, batch indices, pages, left pads) are checked by
    the kernels, not read back (kernels/cache_checks.py): a failing row writes nothing and
    gets NaN outputs.  Returns (out, lse or None unless ``need_lse`` or ``deterministic``)."""
    call = validate(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale,
                    causal, window_size, softcap, alibi_slopes, cache_leftpad,
                    read_device_values=not deterministic)
    rotary_dim = check_rotary(rotary_cos, rotary_sin, q.shape[3], q.dtype, q.device)
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(rotary_interleaved).__name__}")
    check_learnable_sink(learnable_sink, q, q.shape[2])
    along = bool(causal) or tuple(int(x) for x in window_size) != (-1, -1)
    # The largest valid cache_seqlens entry: the device checks' bound (kernels/cache_checks.py).
    max_before = call.capacity - call.n_new
    if rotary_dim is not None:
        span = _rotary_span(q, call.n_new, along)
        _check_rotary_range(call, rotary_cos, span)
        max_before = min(max_before, rotary_cos.shape[0] - span)
    need_lse = need_lse or learnable_sink is not None
    if not deterministic and call.before is None:
        raise RuntimeError("the stock (non-deterministic) KV-cache path reads cache_seqlens on the "
                           "host and cannot run inside CUDA graph capture")
    plan = None
    if deterministic:
        k_cache_c, v_cache_c = last_dim_contiguous(k_cache), last_dim_contiguous(v_cache)
        plan = plan_call(q, k_cache_c, v_cache_c, call, softcap, alibi_slopes, split_size, options)
    else:   # the split size is still checked before the append
        resolve_split_size(attention_config(arch_key(q.device), q.dtype, q.shape[3]).block_n, split_size)
    appending = k is not None and call.n_new > 0 and q.shape[0] > 0
    # Rotary (apply_rotary's bits, positions from the device lengths): the new keys are rotated
    # inside the append launch, and q too when it has one token per new key (decode); else q
    # takes a launch of its own (kernels/rotary.py).
    fuse_q = appending and q.shape[1] == call.n_new
    if rotary_dim is not None and q.shape[0] > 0 and not fuse_q:
        q = rotate(q, rotary_cos, rotary_sin, call.cache_seqlens, along, rotary_interleaved)
    if appending:
        rotary = None
        if rotary_dim is not None:
            rotary = AppendRotary(rotary_cos, rotary_sin, rotary_interleaved, q if fuse_q else None, along)
        q_rotated = append(k_cache, v_cache, k, v, call.cache_seqlens, call.cache_batch_idx, call.block_table,
                           call.page_size, device_checks=call.device_checks, max_before=max_before,
                           cache_leftpad=call.cache_leftpad, rotary=rotary)
        if q_rotated is not None:
            q = q_rotated
    if not deterministic:
        totals = [s + call.n_new for s in call.before]
        out, lse = stock_kvcache(q, k_cache, v_cache, totals, call.cache_batch_idx, call.block_table,
                                 call.page_size, call.softmax_scale, causal, window_size, softcap, alibi_slopes,
                                 need_lse=need_lse, leftpad=call.cache_leftpad)
    else:
        out, lse = launch_decode(plan, last_dim_contiguous(q), k_cache_c, v_cache_c, call, softcap, alibi_slopes,
                                 max_before=max_before)
    if learnable_sink is not None:
        out, lse = apply_learnable_sink(out, lse, learnable_sink)
    return out, lse


@torch.library.custom_op("bitstable::attn_kvcache", mutates_args=("k_cache", "v_cache"))
def attn_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
                 v: Optional[torch.Tensor], cache_seqlens: Optional[torch.Tensor], cache_seqlens_int: int,
                 cache_batch_idx: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
                 softmax_scale: Optional[float], causal: bool, window_left: int, window_right: int,
                 softcap: float, alibi_slopes: Optional[torch.Tensor], split_size: int,
                 deterministic: bool, rotary_cos: Optional[torch.Tensor] = None,
                 rotary_sin: Optional[torch.Tensor] = None, rotary_interleaved: bool = True,
                 learnable_sink: Optional[torch.Tensor] = None, cache_leftpad: Optional[torch.Tensor] = None,
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op: ``cache_seqlens`` a tensor, or None and ``cache_seqlens_int`` the int every
    row holds (read on the host for free).  Returns (out, lse); ``k_cache``/``v_cache``
    receive ``k``/``v`` in place."""
    seqlens = cache_seqlens if cache_seqlens is not None else cache_seqlens_int
    out, lse = kvcache_attention(q, k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table, softmax_scale,
                                 causal, (window_left, window_right), softcap, alibi_slopes, split_size,
                                 deterministic, True, _current_options(), rotary_cos, rotary_sin,
                                 rotary_interleaved, learnable_sink, cache_leftpad)
    return out, lse


@attn_kvcache.register_fake
def _attn_kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, cache_seqlens_int, cache_batch_idx, block_table,
                       softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, split_size,
                       deterministic, rotary_cos=None, rotary_sin=None, rotary_interleaved=True,
                       learnable_sink=None, cache_leftpad=None):
    B, Lq, Hq, _ = q.shape
    return q.new_empty((B, Lq, Hq, v_cache.shape[3])), q.new_empty((B, Hq, Lq), dtype=torch.float32)
