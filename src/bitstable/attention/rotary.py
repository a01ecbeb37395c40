"""Rotary position embedding as ``flash_attn_with_kvcache`` applies it (``rotary_cos`` /
``rotary_sin``), an elementwise function of each token's absolute position.

``x`` [B, L, H, D]; ``cos``/``sin`` [seqlen_ro, rotary_dim / 2] (rotary_dim <= D, even);
``positions`` [B, L] int64 absolute positions (rows of cos/sin).  The first ``rotary_dim``
dims of each head rotate, the rest pass through:

* non-interleaved (GPT-NeoX): halves ``x1 = x[..., :r/2]``, ``x2 = x[..., r/2:r]``;
* interleaved (GPT-J): pairs ``x1 = x[..., 0:r:2]``, ``x2 = x[..., 1:r:2]``;

``(x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)`` in float32, rounded once to x's dtype.
Invariance: each output element depends only on its own input pair and its position's
cos/sin (no reduction), so a token rotated alone, in a chunk or in a batch gets the same bits;
chunked prefill and token-by-token decode therefore see exactly the q and k that a full
forward on the rotated tensors sees.
"""

from __future__ import annotations

from typing import Optional

import torch
from .._backend import next_power_of_2
from .._launch import launch


def check_rotary(rotary_cos, rotary_sin, head_dim: int, dtype: torch.dtype, device) -> Optional[int]:
    """rotary_dim, or None without rotary (TypeError / ValueError naming the argument)."""
    if rotary_cos is None and rotary_sin is None:
        return None
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (seqlen_ro, rotary_dim / 2), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {device}")
    if rotary_cos.shape != rotary_sin.shape:
        raise ValueError(f"rotary_cos {tuple(rotary_cos.shape)} and rotary_sin {tuple(rotary_sin.shape)} "
                         "must have one shape")
    rotary_dim = 2 * rotary_cos.shape[1]
    if rotary_dim == 0 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim (2 * rotary_cos.shape[1] = {rotary_dim}) must be in [2, head dim "
                         f"{head_dim}]")
    return rotary_dim


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool = False) -> torch.Tensor:
    """``x`` rotated at ``positions`` (see the module docstring); a new tensor, x's dtype."""
    r = 2 * cos.shape[1]
    c = cos.float()[positions][:, :, None, :]           # [B, L, 1, r/2]
    s = sin.float()[positions][:, :, None, :]
    xf = x[..., :r].float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., :r // 2], xf[..., r // 2:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., r:]), dim=-1) if r < x.shape[-1] else rot.to(x.dtype)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor):
    """(cos, sin) as the kernels read them: unit stride on the last dim and one stride
    shared by both (copies only where needed)."""
    cos = cos if cos.stride(1) == 1 else cos.contiguous()
    sin = sin if sin.stride() == cos.stride() else sin.contiguous()
    cos = cos if sin.stride() == cos.stride() else cos.contiguous()
    return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, base: torch.Tensor, along: bool,
           interleaved: bool = False) -> torch.Tensor:
    """:func:`apply_rotary` in one kernel launch (kernels/rotary.py), bit for bit: ``x``
    [B, L, H, D] rotated at positions ``base[b] + t`` (``along``) or ``base[b]``; ``base``
    [B] int32 on x's device (cache_seqlens: nothing is read on the host).  A new tensor."""
    from ..kernels.rotary import rotary_kernel

    B, L, H, D = x.shape
    out = torch.empty((B, L, H, D), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    if x.stride(3) != 1:
        x = x.contiguous()
    cos, sin = rotary_tables(cos, sin)
    half = cos.shape[1]
    launch(rotary_kernel, (B, L), x, out, cos, sin, base, x.stride(0), x.stride(1), x.stride(2),
                          out.stride(0), out.stride(1), out.stride(2), cos.stride(0), H, D, half,
                          cos.shape[0],
                          BLOCK_H=next_power_of_2(H), BLOCK_HALF=next_power_of_2(half),
                          BLOCK_D=next_power_of_2(D), ALONG=bool(along), INTERLEAVED=bool(interleaved),
                          PASS_THROUGH=2 * half < D, enable_fp_fusion=False)
    return out
