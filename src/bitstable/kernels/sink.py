"""Learnable attention sinks applied to an attention's (out, lse): one program per
(batch, row), all heads at once.

Every row runs the same arithmetic, whatever the shapes, strides or batch: the sink's
result per row is a function of that row's (out, lse) bits and the sink alone (torch's own
elementwise exp/log on the CPU vectorise by tensor size, which changed the bits of a
row between a chunk and the full sequence, so this is a kernel).

Forward, per row and head h, with ``l = lse`` (``-inf`` where lse is +inf: the row saw no
key) and ``s = sink[h]``::

    m = max(l, s);  new = m + log(exp(l - m) + exp(s - m));  c = exp(l - new)
    out' = round(out * c);  lse' = new            (c = 0, lse' = +inf if l = s = -inf)

Backward, with upstream grads ``G`` (of out') and ``g`` (of lse')::

    dot = sum_d G * out            (fp32, one fixed order per row)
    dout = round(c * G);  dlse = c * (1 - c) * dot + c * g;  dsink_row = (1 - c) * (g - c * dot)
"""

import triton
import triton.language as tl


@triton.jit
def _row_pointers(b, r, offs_h, offs_d, s_b, s_r, s_h, s_d):
    return b * s_b + r * s_r + offs_h[:, None] * s_h + offs_d[None, :] * s_d


@triton.jit
def sink_forward_kernel(OUT, LSE, SINK, OUT_NEW, LSE_NEW, SCALE,
                        so_b, so_r, so_h, so_d, sl_b, sl_h, sl_r, sn_b, sn_r, sn_h, sn_d,
                        R, H, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B, R).  out [B, R, H, D], lse [B, H, R] float32, sink [H] float32; writes
    out' (out's dtype, out_new's strides), lse' and the scale c ([B, H, R] contiguous)."""
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < H
    lse = tl.load(LSE + b * sl_b + offs_h * sl_h + r * sl_r, mask=hmask, other=float("inf"))
    s = tl.load(SINK + offs_h, mask=hmask, other=float("-inf"))
    neg_inf = float("-inf")
    inf = float("inf")
    l = tl.where((lse == inf) | (lse == neg_inf), neg_inf, lse)
    none = (l == neg_inf) & (s == neg_inf)
    m = tl.where(none, 0.0, tl.maximum(l, s))
    new = m + tl.log(tl.exp(l - m) + tl.exp(s - m))
    c = tl.where(none, 0.0, tl.exp(l - new))
    lse_new = tl.where(none, inf, new)
    mask = hmask[:, None] & (offs_d[None, :] < D)
    o = tl.load(OUT + _row_pointers(b, r, offs_h, offs_d, so_b, so_r, so_h, so_d), mask=mask, other=0.0)
    o_new = o.to(tl.float32) * c[:, None]
    tl.store(OUT_NEW + _row_pointers(b, r, offs_h, offs_d, sn_b, sn_r, sn_h, sn_d),
             o_new.to(OUT_NEW.dtype.element_ty), mask=mask)
    stat = (b * H + offs_h) * R + r
    tl.store(LSE_NEW + stat, lse_new, mask=hmask)
    tl.store(SCALE + stat, c, mask=hmask)


@triton.jit
def sink_backward_kernel(GRAD_OUT, GRAD_LSE, OUT, SCALE, DOUT, DLSE, DSINK_ROWS,
                         sg_b, sg_r, sg_h, sg_d, sgl_b, sgl_h, sgl_r, so_b, so_r, so_h, so_d,
                         R, H, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B, R).  grad_out [B, R, H, D] (out''s grad), grad_lse [B, H, R] float32,
    out [B, R, H, D] (the attention's own output), c [B, H, R]; writes dout [B, R, H, D]
    contiguous in out's dtype, dlse and per-row sink grads [B, H, R] float32."""
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < H
    mask = hmask[:, None] & (offs_d[None, :] < D)
    stat = (b * H + offs_h) * R + r
    c = tl.load(SCALE + stat, mask=hmask, other=0.0)
    g = tl.load(GRAD_LSE + b * sgl_b + offs_h * sgl_h + r * sgl_r, mask=hmask, other=0.0)
    go = tl.load(GRAD_OUT + _row_pointers(b, r, offs_h, offs_d, sg_b, sg_r, sg_h, sg_d), mask=mask,
                 other=0.0).to(tl.float32)
    o = tl.load(OUT + _row_pointers(b, r, offs_h, offs_d, so_b, so_r, so_h, so_d), mask=mask,
                other=0.0).to(tl.float32)
    dot = tl.sum(go * o, axis=1)
    seen = c > 0.0
    dlse = tl.where(seen, c * (1.0 - c) * dot + c * g, 0.0)
    dsink = (1.0 - c) * (g - c * dot)
    dout = go * c[:, None]
    tl.store(DOUT + ((b * R + r) * H + offs_h[:, None]) * D + offs_d[None, :],
             dout.to(DOUT.dtype.element_ty), mask=mask)
    tl.store(DLSE + stat, dlse, mask=hmask)
    tl.store(DSINK_ROWS + stat, dsink, mask=hmask)
