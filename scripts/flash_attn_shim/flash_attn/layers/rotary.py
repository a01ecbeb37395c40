"""``flash_attn.layers.rotary.apply_rotary_emb``, written here in plain PyTorch.

Semantics (flash-attn's documented ones): rotate the first ``rotary_dim = 2 *
cos.shape[-1]`` channels of ``x`` by the angles of rows ``position`` of ``cos``/``sin``
(``seqlen_ro, rotary_dim / 2``); the other channels pass through.  Non-interleaved
(GPT-NeoX): channel ``i`` pairs with ``i + rotary_dim / 2``; interleaved (GPT-J):
``2i`` pairs with ``2i + 1``.  A token's position is its index in its sequence plus
``seqlen_offsets`` (an int, or (batch,) per sequence).  ``x`` is (batch, seqlen, heads,
headdim), or (total, heads, headdim) with ``cu_seqlens`` (batch + 1,).  The arithmetic
is done in float32 and the result cast back to ``x``'s dtype.
"""

from typing import Optional, Union

import torch
from torch import Tensor


def _positions(x, seqlen_offsets, cu_seqlens):
    device = x.device
    if cu_seqlens is None:
        batch, seqlen = x.shape[0], x.shape[1]
        pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
        if isinstance(seqlen_offsets, Tensor):
            pos = pos + seqlen_offsets.to(device=device, dtype=torch.long).reshape(batch, 1)
        else:
            pos = pos + int(seqlen_offsets)
        return pos  # (batch, seqlen)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    total = x.shape[0]
    seq_of_token = torch.searchsorted(cu[1:], torch.arange(total, device=device), right=True)
    pos = torch.arange(total, device=device) - cu[seq_of_token]
    if isinstance(seqlen_offsets, Tensor):
        pos = pos + seqlen_offsets.to(device=device, dtype=torch.long)[seq_of_token]
    else:
        pos = pos + int(seqlen_offsets)
    return pos  # (total,)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                     inplace: bool = False, seqlen_offsets: Union[int, Tensor] = 0,
                     cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None):
    half = cos.shape[-1]
    rd = 2 * half
    if rd > x.shape[-1]:
        raise ValueError(f"rotary_dim (2 * cos.shape[-1] = {rd}) must be <= headdim {x.shape[-1]}")
    pos = _positions(x, seqlen_offsets, cu_seqlens)
    if int(pos.max().item() if pos.numel() else 0) >= cos.shape[0]:
        raise ValueError(f"positions up to {int(pos.max())} need cos/sin with more than "
                         f"{cos.shape[0]} rows")
    c = cos.float()[pos].unsqueeze(-2)  # (..., 1, half): broadcast over heads
    s = sin.float()[pos].unsqueeze(-2)
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
    o1 = x1 * c - x2 * s
    o2 = x1 * s + x2 * c
    rot = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    out = torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)
    if inplace:
        x.copy_(out)
        return x
    return out


#: flash-attn's older name for the same function.
apply_rotary_emb_func = apply_rotary_emb

__all__ = ["apply_rotary_emb", "apply_rotary_emb_func"]
