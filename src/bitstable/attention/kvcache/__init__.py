"""``flash_attn_with_kvcache``: decode and chunked prefill against a KV cache.

New keys/values are appended in place at ``cache_seqlens``; the queries then
attend to the cache through the split-KV kernels (attention_decode), whose
output is bitwise the output the full-sequence ``flash_attn_func`` gives the
same query at the same absolute position.

One module per job: :mod:`.validation` (every check, before anything is written),
:mod:`.plan` (which kernels, tiles and loads a call uses: :func:`decode_plan`),
:mod:`.append` (the new tokens into the cache), :mod:`.launch` (the partial and combine
kernels), :mod:`.stock` (stock PyTorch, outside the deterministic mode) and :mod:`.ops`
(the whole step, and the ``bitstable::attn_kvcache`` custom op for ``torch.compile``).
"""

from __future__ import annotations

import inspect
from typing import Optional, Tuple, Union

import torch

from ...launch_options import LaunchOptions
from ...launch_options import current as _current_options
from ...mode import get_deterministic_mode
from ..validation import last_dim_contiguous
from .append import append as _append  # noqa: F401  (the names this module had)
from .launch import launch_combine as _launch_combine  # noqa: F401
from .ops import attn_kvcache, kvcache_attention
from .plan import DecodePlan, plan_call
from .stock import stock_kvcache as _stock_kvcache  # noqa: F401
from .validation import check_cache_args as _validate  # noqa: F401
from .validation import check_num_splits, validate

__all__ = ["flash_attn_with_kvcache", "decode_plan", "DecodePlan"]


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
                            rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                            cache_seqlens: Union[int, torch.Tensor, None] = None,
                            cache_batch_idx: Optional[torch.Tensor] = None,
                            cache_leftpad: Optional[torch.Tensor] = None,
                            block_table: Optional[torch.Tensor] = None,
                            softmax_scale: Optional[float] = None, causal: bool = False,
                            window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True,
                            alibi_slopes: Optional[torch.Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False, *,
                            split_size: Optional[int] = None, learnable_sink: Optional[torch.Tensor] = None):
    """Attention of new queries against a KV cache, appending new keys/values first.

    Positional order and names are flash-attn's (2.6+); ``split_size`` and
    ``learnable_sink`` are bitstable's, keyword-only.

    Args (flash-attn's names and meanings):
        q: (batch, seqlen_q, nheads, headdim): the new tokens' queries.
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with
            ``block_table`` (num_pages, page_size, nheads_k, headdim), page_size a
            multiple of 16; headdim any of 1-256; v_cache's head dim may be smaller
            (Dv <= headdim: out is then (..., Dv)).
        k, v: optional (batch, seqlen_new, nheads_k, headdim / Dv), written in place
            into the cache at ``cache_seqlens`` before the attention.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2), rotary_dim <= headdim:
            rotary embedding applied to the new ``k`` at positions ``cache_seqlens + i``
            and to ``q`` at those positions when ``causal`` or windowed, else all at
            ``cache_seqlens`` (flash-attn's rule), before the append; float32 math, one
            rounding, per token (attention/rotary.py): chunked prefill and decode with
            rotary equal the full forward on the rotated q and k, bitwise.
        rotary_interleaved: rotate pairs (0, 1), (2, 3), ... (GPT-J) if True (flash-attn's
            default), else halves (GPT-NeoX).
        cache_leftpad: optional int32 (batch,): row b's keys start at cache position
            ``cache_leftpad[b]`` (left padding; 0 <= it <= cache_seqlens[b]); cache_seqlens
            still counts from the cache's first slot, and the rotary positions are cache
            positions (flash-attn's rule).  Key position 0 is the first unpadded key, so a
            left-padded row gives the bits of the same sequence unpadded.  Contiguous
            caches only (with block_table: NotImplementedError, as flash-attn).
        cache_seqlens: int or int32 (batch,): tokens already in each cache row.
        cache_batch_idx: int32 (batch,): which cache row each batch row uses.
        block_table: int32 (batch, max_pages): the pages of each sequence.
        split_size: keys per split (default: the deterministic mode's); a
            different split size is a different reduction order.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as
            :func:`flash_attn_func` (causal aligned bottom-right: query ``i``
            sits at position ``cache_seqlens + seqlen_new - seqlen_q + i``).
        learnable_sink: (nheads,) float32 or None: a per-head sink logit in every row's
            denominator (see :func:`flash_attn_func`), applied to (out, lse) exactly as
            there, so decode with a sink equals the full forward with it, bitwise.
        num_splits: an int >= 0, accepted for flash-attn compatibility and ignored:
            flash-attn picks its split count by this argument (0: a heuristic of the
            batch and the lengths), which changes its bits; bitstable's splits are
            fixed by ``split_size`` (keys per split from key 0), so ``num_splits``
            changes neither the bits nor the launch.
    Returns out (batch, seqlen_q, nheads, headdim), and the lse (batch, nheads,
    seqlen_q) float32 if ``return_softmax_lse``.

    Invariance: a query's output is bitwise what ``flash_attn_func`` gives it in
    the full-sequence forward with the same keys and positions, whatever the
    chunking, the cache layout (contiguous or paged, any page size) or the
    other requests in the batch.  Bad input raises before the cache is touched.

    ``torch.compile(fullgraph=True)`` traces it as one custom op
    (``bitstable::attn_kvcache``) that mutates ``k_cache`` and ``v_cache``.
    """
    check_num_splits(num_splits)
    mode = get_deterministic_mode()
    if torch.compiler.is_compiling():
        seqlens, seqlens_int = cache_seqlens, 0
        if cache_seqlens is None or (isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool)):
            seqlens, seqlens_int = None, cache_seqlens or 0
        elif not isinstance(cache_seqlens, torch.Tensor):
            raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
        left, right = (int(x) for x in window_size)
        out, lse = attn_kvcache(q, k_cache, v_cache, k, v, seqlens, seqlens_int, cache_batch_idx, block_table,
                                softmax_scale, causal, left, right, float(softcap), alibi_slopes,
                                mode.split_size if split_size is None else split_size, mode.enabled,
                                rotary_cos, rotary_sin, rotary_interleaved, learnable_sink, cache_leftpad)
    else:
        out, lse = kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table,
                                     softmax_scale, causal, window_size, softcap, alibi_slopes, split_size,
                                     mode.enabled, return_softmax_lse, _current_options(), rotary_cos,
                                     rotary_sin, rotary_interleaved, learnable_sink, cache_leftpad)
    return (out, lse) if return_softmax_lse else out


def decode_plan(*args, options: Optional[LaunchOptions] = None, **kwargs) -> DecodePlan:
    """The :class:`DecodePlan` that ``flash_attn_with_kvcache`` with these arguments would
    run in the deterministic mode (which partial kernel, its tiles, stages and loads, the
    split count, the combine tile), under the launch options in force (or ``options``).
    Takes ``flash_attn_with_kvcache``'s arguments, bound by its signature; validates them
    as the call does; writes nothing.  For tests and explorations: it tells which launch
    variant a call really takes."""
    a = _SIGNATURE.bind(*args, **kwargs)
    a.apply_defaults()
    a = a.arguments
    check_num_splits(a["num_splits"])
    q, k_cache, v_cache = a["q"], a["k_cache"], a["v_cache"]
    call = validate(q, k_cache, v_cache, a["k"], a["v"], a["cache_seqlens"], a["cache_batch_idx"],
                    a["block_table"], a["softmax_scale"], a["causal"], a["window_size"], a["softcap"],
                    a["alibi_slopes"], a["cache_leftpad"])
    return plan_call(q, last_dim_contiguous(k_cache), last_dim_contiguous(v_cache), call, a["softcap"],
                     a["alibi_slopes"], a["split_size"], _current_options() if options is None else options)


_SIGNATURE = inspect.signature(flash_attn_with_kvcache)
decode_plan.__signature__ = _SIGNATURE.replace(
    parameters=list(_SIGNATURE.parameters.values())
    + [inspect.Parameter("options", inspect.Parameter.KEYWORD_ONLY, default=None)],
    return_annotation=DecodePlan)
