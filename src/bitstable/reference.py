"""PyTorch reference implementations (eager math) of bitstable's attention.

``attention_reference`` runs in whatever dtype it is asked for: float64 gives
the accuracy reference; the input dtype gives "stock PyTorch in the same dtype"
(FlashAttention's ``upcast=False`` reference), the yardstick for tolerances.
Semantics match ``flash_attn_func``: layout (batch, seqlen, heads, headdim),
bottom-right causal alignment, sliding window, softcap, ALiBi, GQA/MQA.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def visibility(seqlen_q: int, seqlen_k: int, causal: bool, window_size: Tuple[int, int],
               device) -> torch.Tensor:
    """[Lq, Lk] bool: which keys each query sees (bottom-right aligned)."""
    left, right = window_size
    if causal:
        right = 0
    pos_q = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    pos_k = torch.arange(seqlen_k, device=device)[None, :]
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= pos_k <= pos_q + right
    if left >= 0:
        ok &= pos_k >= pos_q - left
    return ok


def alibi_bias(alibi_slopes: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
               dtype) -> torch.Tensor:
    """[B, H, Lq, Lk] bias ``-slope * |i + Lk - Lq - j|``."""
    slopes = alibi_slopes.to(dtype)
    if slopes.dim() == 1:
        slopes = slopes[None, :].expand(batch, heads)
    pos_q = torch.arange(seqlen_q, device=slopes.device)[:, None] + (seqlen_k - seqlen_q)
    pos_k = torch.arange(seqlen_k, device=slopes.device)[None, :]
    dist = (pos_q - pos_k).abs().to(dtype)
    return -slopes[:, :, None, None] * dist


def attention_scores(q, k, softmax_scale: float, causal: bool = False, window_size=(-1, -1),
                     softcap: float = 0.0, alibi_slopes=None, dtype: Optional[torch.dtype] = None):
    """(scores [B, Hq, Lq, Lk] in ``dtype`` (default q's), -inf where a row cannot see the key;
    visibility ok [Lq, Lk]): ``softmax_scale * q.k``, through softcap, plus ALiBi, masked
    (causal bottom-right, window).  The logits every eager path here starts from."""
    dt = dtype or q.dtype
    B, Lq, Hq, _ = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    qh = q.to(dt).transpose(1, 2)                               # B, Hq, Lq, D
    kh = k.to(dt).transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, B, Hq, Lq, Lk, dt)
    ok = visibility(Lq, Lk, causal, window_size, q.device)
    return s.masked_fill(~ok, float("-inf")), ok


def attention_reference(q, k, v, softmax_scale: Optional[float] = None, causal: bool = False,
                        window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                        compute_dtype: Optional[torch.dtype] = None, learnable_sink=None,
                        dropout_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager attention. Returns (out [B, Lq, Hq, Dv] in ``compute_dtype``, lse [B, Hq, Lq]).

    Rows that see no key get out = 0 and lse = +inf, like the kernels.
    ``compute_dtype`` defaults to q's dtype.  ``learnable_sink`` [Hq]: one more logit per
    head in every row's softmax, with no value (a row that sees no key then gets out 0 and
    lse = its sink).  ``dropout_mask`` bool [B, Hq, Lq, Lk] (True = kept) with ``dropout_p``:
    the weights outside the mask are zeroed and the kept ones scaled by 1 / (1 - p) before
    the value product (flash-attn's dropout; the lse is the undropped softmax's).
    """
    dt = compute_dtype or q.dtype
    B, Lq, Hq, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    vh = v.to(dt).transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
    s, ok = attention_scores(q, k, scale, causal, window_size, softcap, alibi_slopes, dt)
    empty = ~ok.any(dim=-1)                                     # [Lq]
    if learnable_sink is not None:
        sink = learnable_sink.to(s.dtype).view(1, Hq, 1, 1).expand(B, Hq, Lq, 1)
        s = torch.cat([s, sink], dim=-1)
    lse = torch.logsumexp(s.float() if dt != torch.float64 else s, dim=-1)
    empty = empty[None, :].expand(Hq, Lq)                      # [Hq, Lq]
    if learnable_sink is not None:                              # a finite sink is always seen
        empty = empty & torch.isneginf(learnable_sink)[:, None].to(empty.device)
    p = torch.softmax(s, dim=-1).masked_fill(empty[..., None], 0.0)[..., :Lk]
    if dropout_mask is not None:
        p = p.masked_fill(~dropout_mask.to(p.device), 0.0) * (1.0 / (1.0 - dropout_p))
    out = torch.matmul(p.to(dt), vh).transpose(1, 2)
    lse = lse.masked_fill(empty, float("inf"))
    return out, lse


def _float64_grads(q, k, v, dout, dlse, kw):
    q, k, v = (t.detach().to(torch.float64).requires_grad_(True) for t in (q, k, v))
    out, lse = attention_reference(q, k, v, compute_dtype=torch.float64, **kw)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout.to(torch.float64), dlse.to(torch.float64)))
    return out.detach(), grads


def flash_backward_slack(q, k, v, out, dout, dlse=None, **kw) -> Tuple[float, float, float]:
    """What a FlashAttention-style backward may differ from the float64 gradients by,
    beyond stock PyTorch's own error: one float per gradient (dq, dk, dv), a max-abs.

    Such a backward (bitstable's, FlashAttention's, cuDNN's) forms ``dS = P * (dP - Delta +
    dlse)`` with ``Delta = rowsum(dO * O)`` taken from the forward's output ``out`` *as
    stored* (rounded to its dtype), where stock autograd uses ``rowsum(P * dP)``.
    ``dP - Delta`` cancels (a row that sees one key has exactly 0), and ``P`` is recomputed
    from the stored lse, so three effects are not proportional to the gradients:

    * the stored output's rounding moves ``Delta`` by ``rowsum(dO * (out - O))``: its exact
      effect is a ``dlse`` shift of minus that, computed here in float64 (with a peaked
      softmax, e.g. softmax_scale 1 at D 56 in bf16, it is several times stock's error);
    * ``dP`` and ``Delta`` are fp32 sums in different orders: one fp32 unit of roundoff of
      ``P * (|dO| @ |V|^T)``, carried through ``|K|`` (dq) or ``|Q|`` (dk);
    * ``P = exp2(s * c - lse * c)`` (``s`` the scaled score, ``c = log2 e``) in fp32 rounds
      ``s * c``, ``lse * c`` and their difference, each at fp32's half unit of its own
      magnitude, which can be tens when softmax_scale is large: a relative error of up to ``ln 2 * eps32 * (|s c| + |lse c|
      + |s c - lse c|)`` in each weight (stock's ``exp(s - max)`` sees only the small
      difference), carried through ``|dO|`` (dv) and through ``|dS|`` and ``|K|`` / ``|Q|``
      (dq / dk).

    ``dv = P^T @ dO`` has only the last.  ``q, k, v, dout`` any float dtype, layout
    (batch, seqlen, heads, headdim); ``out`` the forward output the backward received;
    ``dlse`` [B, Hq, Lq] or None; ``kw`` attention_reference's keywords.
    """
    B, Lq, Hq, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    zero = torch.zeros(B, Hq, Lq, dtype=torch.float64, device=q.device)
    dlse = zero if dlse is None else dlse.to(torch.float64)
    exact, g_exact = _float64_grads(q, k, v, dout, dlse, kw)
    delta_err = (dout.to(torch.float64) * (out.to(torch.float64) - exact)).sum(-1).transpose(1, 2)
    _, g_stored = _float64_grads(q, k, v, dout, dlse - delta_err, kw)
    # the fp32 accumulation term, from the float64 probabilities
    g = Hq // Hk
    scale = kw.get("softmax_scale") or 1.0 / math.sqrt(D)
    qh, kh, vh, doh = (t.detach().to(torch.float64).transpose(1, 2) for t in (q, k, v, dout))
    kh, vh = kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1)
    s, ok = attention_scores(q, k, scale, kw.get("causal", False), tuple(kw.get("window_size", (-1, -1))),
                             kw.get("softcap", 0.0), kw.get("alibi_slopes"), torch.float64)   # -inf: unseen
    p = torch.softmax(s, dim=-1).masked_fill(~ok.any(-1)[:, None], 0.0)
    ds = p * torch.matmul(doh.abs(), vh.abs().transpose(-1, -2))
    mq = scale * torch.matmul(ds, kh.abs()).max().item()
    mk = scale * torch.matmul(ds.transpose(-1, -2), qh.abs()).reshape(B, Hk, g, Lk, D).sum(2).max().item()
    eps32 = torch.finfo(torch.float32).eps
    # the recompute term: each weight's relative error from the base-2 exponent's roundings
    c = math.log2(math.e)                      # s is already scaled
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    lc = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * c
    sc = (s * c).masked_fill(~ok, 0.0)
    rel = math.log(2.0) * eps32 * (sc.abs() + lc.abs() + (sc - lc).abs())
    dp = torch.matmul(doh, vh.transpose(-1, -2))
    dsr = (p * (dp - (p * dp).sum(-1, keepdim=True) + dlse[..., None])).abs() * rel
    rq = scale * torch.matmul(dsr, kh.abs()).max().item()
    rk = scale * torch.matmul(dsr.transpose(-1, -2), qh.abs()).reshape(B, Hk, g, Lk, D).sum(2).max().item()
    rv = torch.matmul((p * rel).transpose(-1, -2), doh.abs()).reshape(B, Hk, g, Lk, -1).sum(2).max().item()
    shift = [(a - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(g_stored, g_exact)]
    return shift[0] + eps32 * mq + rq, shift[1] + eps32 * mk + rk, rv
