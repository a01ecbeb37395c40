"""``torch.library`` custom ops for attention, with fake (meta) implementations
and an autograd formula, so ``torch.compile(fullgraph=True)`` traces them
without a graph break and forward + backward can be captured in a CUDA graph.

* ``bitstable::attn_fwd(q, k, v, ...) -> (out, lse)``
* ``bitstable::attn_bwd(dout, dlse, q, k, v, out, lse, ...) -> (dq, dk, dv)``
* ``bitstable::attn_varlen_fwd`` / ``attn_varlen_bwd``: the same over packed sequences

Window sizes arrive normalised (-1 = unbounded; causal is ``window_right=0``).  Dropout
arrives as ``(dropout_p, dropout_stream, dropout_seeds)`` (attention/dropout.py's
``to_op_args``: the stream key as a signed int64); the backward gets the forward's.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .backward import attention_backward
from .dropout import Dropout, from_op_args, to_op_args
from .launch import attention_forward


@torch.library.custom_op("bitstable::attn_fwd", mutates_args=())
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
             window_left: int, window_right: int, softcap: float,
             alibi_slopes: Optional[torch.Tensor], split_size: int, dropout_p: float = 0.0,
             dropout_stream: int = 0, dropout_seeds: Optional[torch.Tensor] = None,
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, softmax_scale, window_left, window_right, softcap,
                             alibi_slopes, split_size=split_size,
                             dropout=from_op_args(dropout_p, dropout_stream, dropout_seeds))


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes, split_size,
                   dropout_p=0.0, dropout_stream=0, dropout_seeds=None):
    B, Lq, Hq, D = q.shape
    return (q.new_empty((B, Lq, Hq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32))


@torch.library.custom_op("bitstable::attn_bwd", mutates_args=())
def attn_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, softmax_scale: float,
             window_left: int, window_right: int, softcap: float,
             alibi_slopes: Optional[torch.Tensor], dropout_p: float = 0.0, dropout_stream: int = 0,
             dropout_seeds: Optional[torch.Tensor] = None,
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, softmax_scale, window_left, window_right,
                              softcap, alibi_slopes, dlse=dlse,
                              dropout=from_op_args(dropout_p, dropout_stream, dropout_seeds))


@attn_bwd.register_fake
def _attn_bwd_fake(dout, dlse, q, k, v, out, lse, softmax_scale, window_left, window_right,
                   softcap, alibi_slopes, dropout_p=0.0, dropout_stream=0, dropout_seeds=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, left, right, softcap, alibi_slopes, _split = inputs[:9]
    drop_p, drop_stream, drop_seeds = (tuple(inputs[9:]) + (0.0, 0, None)[len(inputs) - 9:])
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, drop_seeds)
    ctx.params = (softmax_scale, left, right, softcap, drop_p, drop_stream)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes, drop_seeds = ctx.saved_tensors
    softmax_scale, left, right, softcap, drop_p, drop_stream = ctx.params
    dq, dk, dv = attn_bwd(dout, dlse, q, k, v, out, lse, softmax_scale, left, right, softcap,
                          alibi_slopes, drop_p, drop_stream, drop_seeds)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("bitstable::attn_varlen_fwd", mutates_args=())
def attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                    softmax_scale: float,
                    window_left: int, window_right: int, softcap: float,
                    alibi_slopes: Optional[torch.Tensor], split_size: int, dropout_p: float = 0.0,
                    dropout_stream: int = 0, dropout_seeds: Optional[torch.Tensor] = None,
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, softmax_scale, window_left, window_right, softcap,
                             alibi_slopes, split_size=split_size, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                             dropout=from_op_args(dropout_p, dropout_stream, dropout_seeds))


@attn_varlen_fwd.register_fake
def _attn_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                          window_left, window_right, softcap, alibi_slopes, split_size,
                          dropout_p=0.0, dropout_stream=0, dropout_seeds=None):
    total_q, Hq, D = q.shape
    return q.new_empty((total_q, Hq, D)), q.new_empty((Hq, total_q), dtype=torch.float32)


@torch.library.custom_op("bitstable::attn_varlen_bwd", mutates_args=())
def attn_varlen_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                    max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
                    softcap: float, alibi_slopes: Optional[torch.Tensor], dropout_p: float = 0.0,
                    dropout_stream: int = 0, dropout_seeds: Optional[torch.Tensor] = None,
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, softmax_scale, window_left, window_right,
                              softcap, alibi_slopes, dlse=dlse, cu_seqlens_q=cu_seqlens_q,
                              cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                              max_seqlen_k=max_seqlen_k,
                              dropout=from_op_args(dropout_p, dropout_stream, dropout_seeds))


@attn_varlen_bwd.register_fake
def _attn_varlen_bwd_fake(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, softmax_scale, window_left, window_right, softcap, alibi_slopes,
                          dropout_p=0.0, dropout_stream=0, dropout_seeds=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, left, right, softcap, alibi_slopes,
     _split) = inputs[:13]
    drop_p, drop_stream, drop_seeds = (tuple(inputs[13:]) + (0.0, 0, None)[len(inputs) - 13:])
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes, drop_seeds)
    ctx.params = (max_q, max_k, softmax_scale, left, right, softcap, drop_p, drop_stream)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes, drop_seeds = ctx.saved_tensors
    max_q, max_k, softmax_scale, left, right, softcap, drop_p, drop_stream = ctx.params
    dq, dk, dv = attn_varlen_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                 softmax_scale, left, right, softcap, alibi_slopes,
                                 drop_p, drop_stream, drop_seeds)
    return (dq, dk, dv) + (None,) * 13


attn_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


# ---------------------------------------------------------------------------------------
# Eager entry points.  ``torch.library.custom_op``'s Python dispatch costs tens of
# microseconds per call (measured 5x a plain ``autograd.Function`` on the CPU), which an
# eager model pays on every layer.  These Functions call the launchers directly in eager
# mode and the registered ops while ``torch.compile`` traces them, so compiled graphs
# still see one opaque op (fake implementation, no graph break).  Same kernels, same
# arguments, same bits either way.
# ---------------------------------------------------------------------------------------

def _compiling() -> bool:
    return torch.compiler.is_compiling()


class AttentionFunction(torch.autograd.Function):
    """Dense attention forward/backward: q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D] ->
    (out [B, Lq, Hq, D], lse [B, Hq, Lq] float32); gradients also through the lse.
    The last three inputs are the dropout's op arguments (attention/dropout.py)."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes,
                split_size, dropout_p, dropout_stream, dropout_seeds):
        if _compiling():
            out, lse = attn_fwd(q, k, v, softmax_scale, window_left, window_right, softcap,
                                alibi_slopes, split_size, dropout_p, dropout_stream, dropout_seeds)
        else:
            out, lse = attention_forward(q, k, v, softmax_scale, window_left, window_right,
                                         softcap, alibi_slopes, split_size=split_size,
                                         dropout=from_op_args(dropout_p, dropout_stream, dropout_seeds))
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, dropout_seeds)
        ctx.params = (softmax_scale, window_left, window_right, softcap, dropout_p, dropout_stream)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi_slopes, seeds = ctx.saved_tensors
        softmax_scale, left, right, softcap, drop_p, drop_stream = ctx.params
        if _compiling():
            dq, dk, dv = attn_bwd(dout, dlse, q, k, v, out, lse, softmax_scale, left, right,
                                  softcap, alibi_slopes, drop_p, drop_stream, seeds)
        else:
            dq, dk, dv = attention_backward(dout, q, k, v, out, lse, softmax_scale, left, right,
                                            softcap, alibi_slopes, dlse=dlse,
                                            dropout=from_op_args(drop_p, drop_stream, seeds))
        return (dq, dk, dv) + (None,) * 9


class VarlenAttentionFunction(torch.autograd.Function):
    """Packed attention: q [total_q, Hq, D], k/v [total_k, Hkv, D], int32 cu_seqlens ->
    (out [total_q, Hq, D], lse [Hq, total_q] float32).  The last three inputs as
    :class:`AttentionFunction`'s."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, window_left, window_right, softcap, alibi_slopes, split_size,
                dropout_p, dropout_stream, dropout_seeds):
        if _compiling():
            out, lse = attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, softmax_scale, window_left, window_right,
                                       softcap, alibi_slopes, split_size, dropout_p, dropout_stream,
                                       dropout_seeds)
        else:
            out, lse = attention_forward(q, k, v, softmax_scale, window_left, window_right,
                                         softcap, alibi_slopes, split_size=split_size,
                                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                         max_seqlen_q=max_seqlen_q,
                                         dropout=from_op_args(dropout_p, dropout_stream, dropout_seeds))
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seeds)
        ctx.params = (max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                      dropout_p, dropout_stream)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, alibi_slopes, seeds = ctx.saved_tensors
        max_q, max_k, softmax_scale, left, right, softcap, drop_p, drop_stream = ctx.params
        if _compiling():
            dq, dk, dv = attn_varlen_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                         softmax_scale, left, right, softcap, alibi_slopes,
                                         drop_p, drop_stream, seeds)
        else:
            dq, dk, dv = attention_backward(dout, q, k, v, out, lse, softmax_scale, left, right,
                                            softcap, alibi_slopes, dlse=dlse, cu_seqlens_q=cu_q,
                                            cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                            max_seqlen_k=max_k,
                                            dropout=from_op_args(drop_p, drop_stream, seeds))
        return (dq, dk, dv) + (None,) * 13


def attention(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes,
              split_size, dropout: Optional[Dropout] = None):
    """(out, lse) of dense attention on validated inputs; differentiable where needed.
    ``dropout``: attention/dropout.py's Dropout, or None."""
    drop = to_op_args(dropout)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return AttentionFunction.apply(q, k, v, softmax_scale, window_left, window_right,
                                       softcap, alibi_slopes, split_size, *drop)
    if _compiling():
        return attn_fwd(q, k, v, softmax_scale, window_left, window_right, softcap,
                        alibi_slopes, split_size, *drop)
    return attention_forward(q, k, v, softmax_scale, window_left, window_right, softcap,
                             alibi_slopes, split_size=split_size, dropout=dropout)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, window_left, window_right, softcap, alibi_slopes, split_size,
                     dropout: Optional[Dropout] = None):
    """(out, lse) of packed attention on validated inputs; differentiable where needed."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
            window_left, window_right, softcap, alibi_slopes, split_size) + to_op_args(dropout)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return VarlenAttentionFunction.apply(*args)
    if _compiling():
        return attn_varlen_fwd(*args)
    return attention_forward(q, k, v, softmax_scale, window_left, window_right, softcap,
                             alibi_slopes, split_size=split_size, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, dropout=dropout)
