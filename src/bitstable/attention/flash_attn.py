"""``flash_attn_func``: flash-attn's signature, bitwise-reproducible forward.

Switching from flash-attn is an import change::

    from bitstable import flash_attn_func   # was: from flash_attn import flash_attn_func
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..mode import get_deterministic_mode
from ..reference import alibi_bias, attention_reference, visibility
from .ops import attention, varlen_attention
from .validation import check_options, check_qkv, check_varlen, normalize_window


def _stock_attention(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes,
                     need_lse: bool = True):
    """Stock PyTorch: SDPA (with a mask for windows, bottom-right causal and ALiBi),
    eager math where SDPA cannot express the call (softcap).  SDPA returns no
    log-sum-exp, so it is computed by eager math only when ``need_lse``."""
    B, Lq, Hq, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    if softcap > 0:
        out, lse = attention_reference(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes)
        return out, lse.float()
    lse = None
    if need_lse:
        _, lse = attention_reference(q, k, v, softmax_scale, causal, window_size, softcap,
                                     alibi_slopes, compute_dtype=torch.float32)
    left, right = window_size
    mask, is_causal = None, False
    if left >= 0 or right >= 0 or (causal and Lq != Lk):
        mask = visibility(Lq, Lk, causal, window_size, q.device)
    elif causal:
        is_causal = True
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, B, Hq, Lq, Lk, q.dtype)
        if causal:
            mask = visibility(Lq, Lk, causal, window_size, q.device) if mask is None else mask
            is_causal = False
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=is_causal, scale=softmax_scale, enable_gqa=Hq != Hk)
    return out.transpose(1, 2), lse


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = True,
                    return_attn_probs: bool = False):
    """Scaled dot-product attention, bitwise reproducible.

    Args (flash-attn's names and meanings):
        q: (batch, seqlen_q, nheads, headdim), bfloat16 / float16 / float32.
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (GQA/MQA).
        dropout_p: must be 0.0 (dropout is not implemented; raises NotImplementedError).
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: causal mask aligned to the bottom-right corner (FlashAttention 2).
        window_size: (left, right) sliding window; -1 is unbounded.
        softcap: if > 0, scores become softcap * tanh(scores / softcap).
        alibi_slopes: (nheads,) or (batch, nheads) float32; adds
            -slope * |i + seqlen_k - seqlen_q - j| to the score of query i, key j.
        deterministic: accepted for compatibility; bitstable's forward and backward
            are always deterministic.
        return_attn_probs: if True, also return the softmax log-sum-exp
            (batch, nheads, seqlen_q) float32 and ``None`` in place of the
            attention-probability matrix, which is never materialised.

    Returns:
        out (batch, seqlen_q, nheads, headdim) in q's dtype; or
        ``(out, softmax_lse, None)`` when ``return_attn_probs``.  Both are
        differentiable (dq, dk, dv; deterministic, batch-invariant); ALiBi
        slopes get no gradient.

    Invariance: a query row's output bits depend only on its own query vector,
    the keys/values it can see, and (arch, dtype, head_dim, split_size), never
    on the batch, the other rows, the tensors' strides, or how the queries
    were cut into chunks (for the same keys and absolute positions).
    Rows that see no key (e.g. causal with seqlen_q > seqlen_k) are 0, with
    log-sum-exp +inf.
    """
    check_qkv(q, k, v)
    softmax_scale, left, right = check_options(q, dropout_p, softmax_scale, window_size,
                                               softcap, alibi_slopes)
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs must be a bool, got {type(return_attn_probs).__name__}")
    left, right = normalize_window(causal, left, right, k.shape[1])

    if not get_deterministic_mode().enabled:
        out, lse = _stock_attention(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                    need_lse=return_attn_probs)
        return (out, lse, None) if return_attn_probs else out

    out, lse = attention(q, k, v, softmax_scale, left, right, float(softcap), alibi_slopes,
                        get_deterministic_mode().split_size)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = True,
                           return_attn_probs: bool = False, block_table: Optional[torch.Tensor] = None):
    """Attention over packed variable-length sequences, bitwise equal to running each alone.

    Args (flash-attn's names and meanings):
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim).
        cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,) cumulative lengths from 0.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (ints).
        other arguments as :func:`flash_attn_func`; ``alibi_slopes`` may be
        (nheads,) or (num_seqs, nheads); ``block_table`` (paged k/v) is not
        supported here yet and must be None.

    Returns out (total_q, nheads, headdim), or ``(out, softmax_lse, None)`` with
    lse (nheads, total_q) float32 when ``return_attn_probs``.

    Invariance: sequence ``i``'s rows are bitwise equal to
    ``flash_attn_func(q_i[None], k_i[None], v_i[None], ...)[0]`` (same keys,
    same absolute positions, causal aligned bottom-right per sequence),
    whatever else is packed with it; so are its own dq, dk, dv.
    """
    if block_table is not None:
        raise NotImplementedError("block_table (paged k/v) is not supported by "
                                  "flash_attn_varlen_func yet; pass block_table=None")
    check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    num_seqs = cu_seqlens_q.numel() - 1
    q4 = q.unsqueeze(0)
    softmax_scale, left, right = check_options(q4, dropout_p, softmax_scale, window_size,
                                               softcap, None)
    if alibi_slopes is not None:
        check_options(q4.expand(num_seqs, *q.shape), 0.0, softmax_scale, window_size, softcap,
                      alibi_slopes)
    if not isinstance(return_attn_probs, bool):
        raise TypeError(f"return_attn_probs must be a bool, got {type(return_attn_probs).__name__}")
    left, right = normalize_window(causal, left, right, max(max_seqlen_k, 1))

    if not get_deterministic_mode().enabled:
        outs, lses = [], []
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(num_seqs):
            slopes = alibi_slopes
            if slopes is not None and slopes.dim() == 2:
                slopes = slopes[i:i + 1]
            o, l_ = _stock_attention(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]],
                                     v[None, ck[i]:ck[i + 1]], softmax_scale, causal, window_size,
                                     softcap, slopes, need_lse=return_attn_probs)
            outs.append(o[0])
            lses.append(None if l_ is None else l_[0])
        out = torch.cat(outs, 0)
        lse = torch.cat(lses, 1) if return_attn_probs else None
        return (out, lse, None) if return_attn_probs else out

    out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale,
                               left, right, float(softcap), alibi_slopes,
                               get_deterministic_mode().split_size)
    return (out, lse, None) if return_attn_probs else out
