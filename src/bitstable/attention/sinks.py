"""Learnable attention sinks (gpt-oss; FlashAttention 4's ``learnable_sink``).

A sink is one extra logit per query head that joins every row's softmax denominator and
carries no value: with the row's log-sum-exp ``lse`` over its visible keys and sink logit
``s_h``, the row's output becomes ``out * exp(lse - lse')`` with ``lse' = logaddexp(lse, s_h)``,
and ``lse'`` is the log-sum-exp reported.  bitstable applies that to the attention's
(out, lse) in one Triton kernel (kernels/sink.py: float32, one more rounding of ``out``):
the same arithmetic on every row, so every path that gives a row the same (out, lse) bits
(dense, varlen, chunked prefill, KV-cache decode) gives it the same (out', lse') bits, and
batch invariance carries over.  Differentiable in out, lse (hence q, k, v through the
attention backward's lse gradient) and the sink (its gradient sums per-row terms over the
rows in a fixed order).

Rows that see no key (lse +inf by bitstable's convention) get out 0 and lse' = s_h; with a
sink of -inf they keep lse +inf.  A sink of -inf leaves every bit of out and lse unchanged.
"""

from __future__ import annotations

import torch

from .._backend import next_power_of_2
from ..kernels.sink import sink_backward_kernel, sink_forward_kernel


def check_learnable_sink(sink, q: torch.Tensor, heads: int, name: str = "learnable_sink") -> None:
    """``sink`` None or a float32 tensor [heads] on q's device (TypeError / ValueError naming it)."""
    if sink is None:
        return
    if not isinstance(sink, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(sink).__name__}")
    if sink.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {sink.dtype}")
    if tuple(sink.shape) != (heads,):
        raise ValueError(f"{name} must have shape (nheads,) = ({heads},), got {tuple(sink.shape)}")
    if sink.device != q.device:
        raise ValueError(f"{name} is on {sink.device}, expected q's device {q.device}")


def _blocks(H: int, D: int):
    return next_power_of_2(max(H, 1)), next_power_of_2(max(D, 1))


class _Sink(torch.autograd.Function):
    """out [B, R, H, D], lse [B, H, R] float32, sink [H] float32 -> (out', lse')."""

    @staticmethod
    def forward(ctx, out, lse, sink):
        B, R, H, D = out.shape
        new_out = torch.empty((B, R, H, D), dtype=out.dtype, device=out.device)
        new_lse = torch.empty((B, H, R), dtype=torch.float32, device=out.device)
        scale = torch.empty_like(new_lse)
        sink = sink.contiguous()
        if B * R:
            bh, bd = _blocks(H, D)
            sink_forward_kernel[(B, R)](out, lse, sink, new_out, new_lse, scale, *out.stride(), *lse.stride(),
                                        *new_out.stride(), R, H, D, BLOCK_H=bh, BLOCK_D=bd)
        ctx.save_for_backward(out, scale)
        return new_out, new_lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        out, scale = ctx.saved_tensors
        B, R, H, D = out.shape
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is None:
            grad_lse = torch.zeros_like(scale)
        dout = torch.empty((B, R, H, D), dtype=out.dtype, device=out.device)
        dlse = torch.empty_like(scale)
        rows = torch.empty_like(scale)
        if B * R:
            bh, bd = _blocks(H, D)
            sink_backward_kernel[(B, R)](grad_out, grad_lse, out, scale, dout, dlse, rows, *grad_out.stride(),
                                         *grad_lse.stride(), *out.stride(), R, H, D, BLOCK_H=bh, BLOCK_D=bd)
        return dout, dlse, rows.sum(dim=(0, 2))


def apply_learnable_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor):
    """(out', lse') with the sink in each row's denominator.

    Dense: out [B, L, H, Dv], lse [B, H, L]; varlen: out [T, H, Dv], lse [H, T]; lse
    float32, sink [H] float32.  Returns new tensors of the same shapes.
    """
    if out.dim() == 3:
        new_out, new_lse = _Sink.apply(out[None], lse[None], sink)
        return new_out[0], new_lse[0]
    return _Sink.apply(out, lse, sink)
