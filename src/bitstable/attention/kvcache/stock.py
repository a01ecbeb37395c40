"""The stock (non-deterministic mode) KV-cache attention: PyTorch's SDPA over the caches."""

from __future__ import annotations

import torch
from ..._backend import cdiv


def stock_kvcache(q, k_cache, v_cache, totals, cache_batch_idx, block_table, page_size,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, need_lse=True, leftpad=None):
    """Stock PyTorch: one SDPA call over the batch's caches padded to the longest, with a
    mask of each row's valid, visible keys (eager math for softcap).  ``leftpad`` [B] int32:
    cache rows before it are padding (masked); positions stay cache positions, which gives
    the masks and ALiBi distances of the unpadded sequence."""
    B, Lq, Hq, D = q.shape
    Hk = k_cache.shape[2]
    L = max(max(totals, default=0), 1)
    dev = q.device
    if block_table is not None:
        pages = block_table[:, : cdiv(L, page_size)].long()
        keys = k_cache[pages].reshape(B, -1, Hk, D)[:, :L]
        vals = v_cache[pages].reshape(B, -1, Hk, D)[:, :L]
    else:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(B, device=dev)
        keys, vals = k_cache[rows, :L], v_cache[rows, :L]
    lens = torch.tensor(totals, device=dev)
    pos_q = torch.arange(Lq, device=dev)[None, :, None] + (lens[:, None, None] - Lq)   # B, Lq, 1
    pos_k = torch.arange(L, device=dev)[None, None, :]
    ok = (pos_k < lens[:, None, None]).expand(B, Lq, L)
    if leftpad is not None:
        ok = ok & (pos_k >= leftpad.long()[:, None, None])
    left, right = window_size
    if causal:
        right = 0
    if right >= 0:
        ok = ok & (pos_k <= pos_q + right)
    if left >= 0:
        ok = ok & (pos_k >= pos_q - left)
    s = None
    if softcap > 0 or alibi_slopes is not None:
        qh = q.float().transpose(1, 2)
        kh = keys.float().transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
        vh = vals.float().transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
        s = qh @ kh.transpose(-1, -2) * softmax_scale
        if softcap > 0:
            s = torch.tanh(s / softcap) * softcap
        if alibi_slopes is not None:
            sl = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(B, Hq)
            s = s - sl[:, :, None, None] * (pos_q - pos_k).abs()[:, None].float()
        s = s.masked_fill(~ok[:, None], float("-inf"))
        out = (torch.softmax(s, -1) @ vh).transpose(1, 2).to(q.dtype)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=ok[:, None],
            scale=softmax_scale, enable_gqa=Hq != Hk).transpose(1, 2)
    if not need_lse:
        return out, None
    if s is None:
        qh = q.float().transpose(1, 2)
        kh = keys.float().transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
        s = (qh @ kh.transpose(-1, -2) * softmax_scale).masked_fill(~ok[:, None], float("-inf"))
    return out, torch.logsumexp(s, dim=-1)
