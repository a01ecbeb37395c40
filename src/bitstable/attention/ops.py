"""``torch.library`` custom ops for attention, with fake (meta) implementations
and an autograd formula, so ``torch.compile(fullgraph=True)`` traces them
without a graph break and forward + backward can be captured in a CUDA graph.

* ``bitstable::attn_fwd(q, k, v, ...) -> (out, lse)``
* ``bitstable::attn_bwd(dout, dlse, q, k, v, out, lse, ...) -> (dq, dk, dv)``
* ``bitstable::attn_varlen_fwd`` / ``attn_varlen_bwd``: the same over packed sequences

Window sizes arrive normalised (-1 = unbounded; causal is ``window_right=0``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .backward import attention_backward
from .launch import attention_forward


@torch.library.custom_op("bitstable::attn_fwd", mutates_args=())
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
             window_left: int, window_right: int, softcap: float,
             alibi_slopes: Optional[torch.Tensor], split_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, softmax_scale, window_left, window_right, softcap,
                             alibi_slopes, split_size=split_size)


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes, split_size):
    B, Lq, Hq, D = q.shape
    return (q.new_empty((B, Lq, Hq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32))


@torch.library.custom_op("bitstable::attn_bwd", mutates_args=())
def attn_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, softmax_scale: float,
             window_left: int, window_right: int, softcap: float,
             alibi_slopes: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, softmax_scale, window_left, window_right,
                              softcap, alibi_slopes, dlse=dlse)


@attn_bwd.register_fake
def _attn_bwd_fake(dout, dlse, q, k, v, out, lse, softmax_scale, window_left, window_right,
                   softcap, alibi_slopes):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, left, right, softcap, alibi_slopes, _split = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.params = (softmax_scale, left, right, softcap)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    softmax_scale, left, right, softcap = ctx.params
    dq, dk, dv = attn_bwd(dout, dlse, q, k, v, out, lse, softmax_scale, left, right, softcap,
                          alibi_slopes)
    return dq, dk, dv, None, None, None, None, None, None


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("bitstable::attn_varlen_fwd", mutates_args=())
def attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                    softmax_scale: float,
                    window_left: int, window_right: int, softcap: float,
                    alibi_slopes: Optional[torch.Tensor], split_size: int,
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, softmax_scale, window_left, window_right, softcap,
                             alibi_slopes, split_size=split_size, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q)


@attn_varlen_fwd.register_fake
def _attn_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                          window_left, window_right, softcap, alibi_slopes, split_size):
    total_q, Hq, D = q.shape
    return q.new_empty((total_q, Hq, D)), q.new_empty((Hq, total_q), dtype=torch.float32)


@torch.library.custom_op("bitstable::attn_varlen_bwd", mutates_args=())
def attn_varlen_bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                    max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
                    softcap: float, alibi_slopes: Optional[torch.Tensor],
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, softmax_scale, window_left, window_right,
                              softcap, alibi_slopes, dlse=dlse, cu_seqlens_q=cu_seqlens_q,
                              cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                              max_seqlen_k=max_seqlen_k)


@attn_varlen_bwd.register_fake
def _attn_varlen_bwd_fake(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, softmax_scale, window_left, window_right, softcap, alibi_slopes):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, left, right, softcap, alibi_slopes,
     _split) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
    ctx.params = (max_q, max_k, softmax_scale, left, right, softcap)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    max_q, max_k, softmax_scale, left, right, softcap = ctx.params
    dq, dk, dv = attn_varlen_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                 softmax_scale, left, right, softcap, alibi_slopes)
    return (dq, dk, dv) + (None,) * 10


attn_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)
