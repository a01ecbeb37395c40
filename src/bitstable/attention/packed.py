"""flash-attn's packed variants: q, k, v (or k, v) stacked in one tensor.

``flash_attn_qkvpacked_func``, ``flash_attn_kvpacked_func``,
``flash_attn_varlen_qkvpacked_func`` and ``flash_attn_varlen_kvpacked_func`` take
flash-attn's arguments, in its order, with its defaults.  Each unbinds the packed
tensor into views (no copy: the kernels take any strides with a unit head-dim
stride) and runs :func:`~bitstable.flash_attn_func` /
:func:`~bitstable.flash_attn_varlen_func` on them, so:

* the output is bitwise the unpacked call's output (layout invariance);
* the gradient reaches the packed tensor, and it is bitwise the unpacked call's
  dq, dk, dv stacked on the packing axis.  (Autograd stacks them: one copy of the
  gradient that flash-attn's packed kernels avoid by writing into one buffer.)

Errors name the packed argument as the user wrote it (``qkv``, ``kv``,
``cu_seqlens``, ``max_seqlen``); checks made on the unbound views name the view
(``qkv[:, :, 0]`` is q).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .flash_attn import dense_attention, varlen_attention_call
from .validation import SUPPORTED_DTYPES


def _check_packed(t, name: str, shape: str, dims: int, axis: int, count: int) -> None:
    """``t`` a floating tensor of ``dims`` dims whose ``axis`` holds ``count`` stacked tensors."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape {shape}, got {t.dim()} dims {tuple(t.shape)}")
    if t.shape[axis] != count:
        raise ValueError(f"{name}.shape[{axis}] must be {count} ({name} stacks {count} tensors: "
                         f"shape {shape}), got {t.shape[axis]}")


def _views(name: str, dims: int, axis: int, count: int) -> Tuple[str, ...]:
    """How the unbound views read in messages: ``qkv[:, :, 0]`` and so on."""
    lead = ", ".join([":"] * axis)
    return tuple(f"{name}[{lead}, {i}]" if lead else f"{name}[{i}]" for i in range(count))


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0,
                              softmax_scale: Optional[float] = None, causal: bool = False,
                              window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False, *,
                              dropout_seeds: Optional[torch.Tensor] = None):
    """:func:`~bitstable.flash_attn_func` on q, k, v stacked in one tensor.

    Args (flash-attn's names, order and defaults):
        qkv: (batch, seqlen, 3, nheads, headdim), bfloat16 / float16 / float32;
            headdim 1 to 256 (not a multiple of 8: zero-padded inside).
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        return_attn_probs: as :func:`~bitstable.flash_attn_func`.
        deterministic: accepted for compatibility (flash-attn's default, False);
            bitstable is always deterministic.

    Returns out (batch, seqlen, nheads, headdim), or ``(out, softmax_lse, None)``
    with lse (batch, nheads, seqlen) float32 when ``return_attn_probs``.

    Invariance: out is bitwise ``flash_attn_func(qkv[:, :, 0], qkv[:, :, 1],
    qkv[:, :, 2], ...)``, and ``qkv.grad`` is bitwise that call's (dq, dk, dv)
    stacked on dim 2; both keep flash_attn_func's batch and chunking invariance.
    """
    _check_packed(qkv, "qkv", "(batch, seqlen, 3, nheads, headdim)", 5, 2, 3)
    q, k, v = qkv.unbind(2)
    return dense_attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, return_attn_probs, names=_views("qkv", 5, 2, 3),
                           dropout_seeds=dropout_seeds)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False, *,
                              dropout_seeds: Optional[torch.Tensor] = None):
    """:func:`~bitstable.flash_attn_func` with k and v stacked in one tensor.

    Args (flash-attn's names, order and defaults):
        q: (batch, seqlen_q, nheads, headdim).
        kv: (batch, seqlen_k, 2, nheads_k, headdim), q's dtype; nheads % nheads_k == 0
            (GQA/MQA); headdim 1 to 256.
        other arguments as :func:`flash_attn_qkvpacked_func`.

    Returns out (batch, seqlen_q, nheads, headdim), or ``(out, softmax_lse, None)``.

    Invariance: out is bitwise ``flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], ...)``;
    ``kv.grad`` is bitwise that call's (dk, dv) stacked on dim 2.
    """
    _check_packed(kv, "kv", "(batch, seqlen_k, 2, nheads_k, headdim)", 5, 2, 2)
    k, v = kv.unbind(2)
    return dense_attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, return_attn_probs, names=("q",) + _views("kv", 5, 2, 2),
                           dropout_seeds=dropout_seeds)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                     causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                                     deterministic: bool = False, return_attn_probs: bool = False, *,
                              dropout_seeds: Optional[torch.Tensor] = None):
    """:func:`~bitstable.flash_attn_varlen_func` on packed sequences with q, k, v stacked.

    Args (flash-attn's names, order and defaults):
        qkv: (total, 3, nheads, headdim); total = the sum of the sequences' lengths.
        cu_seqlens: int32 (num_seqs + 1,) cumulative lengths from 0 (for q and k).
        max_seqlen: the longest sequence's length (int).
        other arguments as :func:`flash_attn_qkvpacked_func`; ``alibi_slopes`` may be
        (nheads,) or (num_seqs, nheads).

    Returns out (total, nheads, headdim), or ``(out, softmax_lse, None)`` with lse
    (nheads, total) float32.

    Invariance: out is bitwise ``flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2],
    cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, ...)`` (so each sequence's rows are
    what it gets alone); ``qkv.grad`` is that call's (dq, dk, dv) stacked on dim 1.
    """
    _check_packed(qkv, "qkv", "(total, 3, nheads, headdim)", 4, 1, 3)
    q, k, v = qkv.unbind(1)
    return varlen_attention_call(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                 softmax_scale, causal, window_size, softcap, alibi_slopes,
                                 return_attn_probs, names=_views("qkv", 4, 1, 3),
                                 cu_names=("cu_seqlens", "cu_seqlens"),
                                 max_names=("max_seqlen", "max_seqlen"), dropout_seeds=dropout_seeds)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                    causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                                    deterministic: bool = False, return_attn_probs: bool = False, *,
                              dropout_seeds: Optional[torch.Tensor] = None):
    """:func:`~bitstable.flash_attn_varlen_func` with k and v stacked in one tensor.

    Args (flash-attn's names, order and defaults):
        q: (total_q, nheads, headdim).
        kv: (total_k, 2, nheads_k, headdim); nheads % nheads_k == 0.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: as
        :func:`~bitstable.flash_attn_varlen_func`; other arguments as
        :func:`flash_attn_qkvpacked_func`.

    Returns out (total_q, nheads, headdim), or ``(out, softmax_lse, None)``.

    Invariance: out is bitwise ``flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], ...)``;
    ``kv.grad`` is that call's (dk, dv) stacked on dim 1.
    """
    _check_packed(kv, "kv", "(total_k, 2, nheads_k, headdim)", 4, 1, 2)
    k, v = kv.unbind(1)
    return varlen_attention_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                 return_attn_probs, names=("q",) + _views("kv", 4, 1, 2),
                                 dropout_seeds=dropout_seeds)
