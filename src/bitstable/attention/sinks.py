"""Learnable attention sinks (gpt-oss; FlashAttention 4's ``learnable_sink``).

A sink is one extra logit per query head that joins every row's softmax denominator and
carries no value: with the row's log-sum-exp ``lse`` over its visible keys and sink logit
``s_h``, the row's output becomes ``out * exp(lse - lse')`` with ``lse' = logaddexp(lse, s_h)``,
and ``lse'`` is the log-sum-exp reported.  bitstable applies that to the attention's
(out, lse) in float32, rounding ``out`` once more to its dtype: the same elementwise
function of the same (out, lse) bits on every path (dense, varlen, KV-cache decode), so
training = prefill = decode and batch invariance carry over.  Differentiable in out, lse
(hence q, k, v through the backward's lse gradient) and the sink.

Rows that see no key (lse +inf by bitstable's convention) get out 0 and lse' = s_h; with a
sink of -inf they keep lse +inf.  A sink of -inf leaves every bit of out and lse unchanged.
"""

from __future__ import annotations

import torch


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


def apply_learnable_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor):
    """(out', lse') with the sink in each row's denominator.

    out [..., L, H, Dv] (dense [B, L, H, Dv] or varlen [T, H, Dv]), lse [..., H, L] float32
    (dense [B, H, L], varlen [H, T]), sink [H] float32.  Elementwise per row (no reduction
    across rows), float32 math, out' rounded to out's dtype.
    """
    neg_inf = torch.tensor(float("-inf"), device=lse.device)
    seen = torch.isinf(lse).logical_not()
    lse_eff = torch.where(seen, lse, neg_inf)
    new = torch.logaddexp(lse_eff, sink.view(-1, 1))
    none = torch.isneginf(new)                 # no key and a -inf sink
    # (where() before exp: the unselected branch would be nan, and nan * 0 in its gradient)
    diff = torch.where(none, torch.zeros_like(new), lse_eff - new)
    scale = torch.where(none, torch.zeros_like(new), torch.exp(diff))
    out = (out.float() * scale.transpose(-1, -2).unsqueeze(-1)).to(out.dtype)
    return out, torch.where(none, torch.full_like(new, float("inf")), new)
