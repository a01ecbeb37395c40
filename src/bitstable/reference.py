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


def attention_reference(q, k, v, softmax_scale: Optional[float] = None, causal: bool = False,
                        window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                        compute_dtype: Optional[torch.dtype] = None,
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager attention. Returns (out [B, Lq, Hq, D] in ``compute_dtype``, lse [B, Hq, Lq]).

    Rows that see no key get out = 0 and lse = +inf, like the kernels.
    ``compute_dtype`` defaults to q's dtype.
    """
    dt = compute_dtype or q.dtype
    B, Lq, Hq, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qh = q.to(dt).transpose(1, 2)                               # B, Hq, Lq, D
    kh = k.to(dt).transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
    vh = v.to(dt).transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, B, Hq, Lq, Lk, dt)
    ok = visibility(Lq, Lk, causal, window_size, q.device)
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s.float() if dt != torch.float64 else s, dim=-1)
    empty = ~ok.any(dim=-1)                                     # [Lq]
    p = torch.softmax(s, dim=-1).masked_fill(empty[:, None], 0.0)
    out = torch.matmul(p.to(dt), vh).transpose(1, 2)
    lse = lse.masked_fill(empty, float("inf"))
    return out, lse
