"""Rotary position embedding in one launch: attention/rotary.py's function, bit for bit.

One program per (batch row, token).  The token's position is ``BASE[b] + t`` (``ALONG``) or
``BASE[b]``; its row of ``COS`` / ``SIN`` [seqlen_ro, R / 2] rotates the first ``R`` dims
of each of its ``H`` heads (halves, or even/odd pairs when ``INTERLEAVED``), the other dims
are copied.  ``(x1, x2) -> (x1 c - x2 s, x1 s + x2 c)`` in float32 with each product and
sum rounded on its own (the launcher turns off FMA contraction), then rounded once to the
output dtype: the same operations, in the same order, as the torch function, so the same
bits.  kernels/kv_append.py's rotary append runs the same functions.  Elementwise: a
token's output depends on nothing but its own values and position.
"""

import triton
import triton.language as tl


@triton.jit
def rotary_table_rows(COS, SIN, pos, stride_cs, HALF, seqlen_ro, BLOCK_HALF: tl.constexpr):
    """(cos, sin) [1, BLOCK_HALF] float32: row ``pos`` of the tables, NaN where ``pos`` lies
    outside ``[0, seqlen_ro)`` (no table row is read) and 0 past ``HALF``."""
    offs_i = tl.arange(0, BLOCK_HALF)[None, :]
    in_table = (offs_i < HALF) & (pos >= 0) & (pos < seqlen_ro)
    c = tl.load(COS + pos * stride_cs + offs_i, mask=in_table, other=float("nan")).to(tl.float32)
    s = tl.load(SIN + pos * stride_cs + offs_i, mask=in_table, other=float("nan")).to(tl.float32)
    return c, s


@triton.jit
def _pair_dims(BLOCK_HALF: tl.constexpr, HALF, INTERLEAVED: tl.constexpr):
    """(d1, d2) [1, BLOCK_HALF]: the dims of each rotated pair (halves, or even/odd)."""
    offs_i = tl.arange(0, BLOCK_HALF)[None, :]
    if INTERLEAVED:
        return 2 * offs_i, 2 * offs_i + 1
    return offs_i, offs_i + HALF


@triton.jit
def load_token(X, stride_xh, stride_xd, H, D, HALF,
               BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
               INTERLEAVED: tl.constexpr, PASS_THROUGH: tl.constexpr):
    """(x1, x2, rest) of one token's ``H`` heads at ``X`` (head and dim strides given): the
    pairs to rotate in float32 [BLOCK_H, BLOCK_HALF], and the unrotated dims ``2 * HALF ..
    D - 1`` [BLOCK_H, BLOCK_D] as stored (``PASS_THROUGH``; else x1 stands in, unused)."""
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_i = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (offs_h < H) & (offs_i < HALF)
    d1, d2 = _pair_dims(BLOCK_HALF, HALF, INTERLEAVED)
    x_row = X + offs_h * stride_xh
    x1 = tl.load(x_row + d1 * stride_xd, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + d2 * stride_xd, mask=ok, other=0.0).to(tl.float32)
    if PASS_THROUGH:
        offs_d = tl.arange(0, BLOCK_D)[None, :]
        rest = tl.load(x_row + offs_d * stride_xd, mask=(offs_h < H) & (offs_d >= 2 * HALF) & (offs_d < D))
    else:
        rest = x1
    return x1, x2, rest


@triton.jit
def store_token(OUT, stride_oh, stride_od, x1, x2, rest, c, s, H, D, HALF, keep,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                INTERLEAVED: tl.constexpr, PASS_THROUGH: tl.constexpr):
    """The token :func:`load_token` read, rotated by ``(c, s)`` (:func:`rotary_table_rows`)
    into ``OUT``: ``(x1, x2) -> (x1 c - x2 s, x1 s + x2 c)`` in float32 rounded once to
    OUT's dtype, the rest copied.  ``keep``: a scalar bool, False stores nothing.  Every
    caller launches with FMA contraction off, so each product and sum rounds on its own."""
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_i = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (offs_h < H) & (offs_i < HALF) & keep
    d1, d2 = _pair_dims(BLOCK_HALF, HALF, INTERLEAVED)
    o_row = OUT + offs_h * stride_oh
    o1 = x1 * c - x2 * s
    o2 = x1 * s + x2 * c
    tl.store(o_row + d1 * stride_od, o1.to(OUT.dtype.element_ty), mask=ok)
    tl.store(o_row + d2 * stride_od, o2.to(OUT.dtype.element_ty), mask=ok)
    if PASS_THROUGH:       # dims R .. D-1 unrotated
        offs_d = tl.arange(0, BLOCK_D)[None, :]
        tl.store(o_row + offs_d * stride_od, rest, mask=(offs_h < H) & (offs_d >= 2 * HALF) & (offs_d < D) & keep)


@triton.jit
def rotary_kernel(X, OUT, COS, SIN, BASE,
                  stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh, stride_cs,
                  H, D, HALF, seqlen_ro,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                  ALONG: tl.constexpr, INTERLEAVED: tl.constexpr, PASS_THROUGH: tl.constexpr):
    """Grid (B, L).  X / OUT [B, L, H, D] (unit stride on D); COS / SIN [seqlen_ro, HALF];
    BASE [B] int32; R = 2 * HALF <= D; BLOCK_HALF >= HALF, BLOCK_D >= D.  A position
    outside ``[0, seqlen_ro)`` reads no table row and rotates to NaN (a length the host did
    not check: kernels/cache_checks.py fails that row)."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    pos = tl.load(BASE + b).to(tl.int64)
    if ALONG:
        pos = pos + t
    x1, x2, rest = load_token(X + b * stride_xb + t * stride_xt, stride_xh, 1, H, D, HALF,
                              BLOCK_H, BLOCK_HALF, BLOCK_D, INTERLEAVED, PASS_THROUGH)
    c, s = rotary_table_rows(COS, SIN, pos, stride_cs, HALF, seqlen_ro, BLOCK_HALF)
    store_token(OUT + b * stride_ob + t * stride_ot, stride_oh, 1, x1, x2, rest, c, s, H, D, HALF, True,
                BLOCK_H, BLOCK_HALF, BLOCK_D, INTERLEAVED, PASS_THROUGH)
