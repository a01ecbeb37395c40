"""Attention dropout's keep-mask: Philox4x32-10 over absolute positions.

The mask is a pure function, the same in every kernel that needs it (the dense and
varlen forward, both backward kernels, :func:`dropout_mask_kernel`), whatever tiles
they use:

* philox key ``(k0, k1 ^ seq_hi)``: ``(k0, k1)`` is the call's 64-bit stream key (made on
  the host from torch's generator seed and offset, ``attention/dropout.py``), ``seq_hi``
  the high 32 bits of the sequence's key;
* philox counter ``(4 * (key // 16) + (key % 8) // 2, 16 * (query // 16) + query % 8, head,
  seq_lo)``: ``key`` and ``query`` are the positions inside the sequence (0-based, not
  aligned), ``head`` the query head, ``seq_lo`` the low 32 bits of the sequence's key (by
  default its batch index).  One call serves the query pair (q, q + 8) of a 16-row block
  and, in a 16-key block, the keys ``8i + 2c + h`` (i, h in {0, 1}) of one ``c``;
* the four 32-bit outputs give eight 16-bit draws: entry (query, key) takes half
  ``key % 2`` (0: the low 16 bits) of output ``(key // 8) % 2 + 2 * ((query // 8) % 2)``;
* an entry is kept iff its draw is ``>= threshold``, with ``threshold = floor(dropout_p *
  2**16)``.

Why this shape: eight entries per Philox call (the integer work is what dropout costs in
every tile; 16-bit draws keep ``p`` exact to 2**-16), and the eight are the entries one
thread holds of a Hopper MMA accumulator (rows r and r + 8, column pairs 2c, 2c + 1 of two
8-column groups), so the mask needs no exchange through shared memory: in the sm_90 SASS
of the dq kernel (64x64 tiles, 4 warps) the dropout variant has the plain variant's shared
loads, stores and barriers, where assembling an [M, N] mask from per-key-group draws
added 112 shared loads and 16 barriers.  Tiles must start at multiples of 16 rows and 16
keys and hold multiples of 16 (every config does).

So a row's mask depends on nothing but its sequence's key, its head and the two
positions: not on the batch around it, the block sizes or the launch.  Philox4x32-10 is
Random123's generator (Salmon et al., SC'11): 10 rounds, multipliers 0xD2511F53 and
0xCD9E8D57, key increments 0x9E3779B9 and 0xBB67AE85, the key bumped between rounds.
``attention/dropout.py`` holds the same function in torch integer arithmetic, and the
tests check the two against each other and against Random123's known answers.
"""

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Random123's philox4x32-10 of counter (c0..c3) under key (k0, k1); uint32 in and out."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.math.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.math.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def sequence_key(SEQ_KEYS, b, HAS_SEQ_KEYS: tl.constexpr):
    """(seq_lo, seq_hi) uint32 of sequence ``b``: ``SEQ_KEYS[b]`` (int64) or ``b``."""
    if HAS_SEQ_KEYS:
        key = tl.load(SEQ_KEYS + b).to(tl.int64)
    else:
        key = b.to(tl.int64)
    return (key & 0xFFFFFFFF).to(tl.uint32), ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def dropout_keep(stream_lo, stream_hi, seq_lo, seq_hi, head, rows, key_start, threshold,
                 BLOCK_N: tl.constexpr):
    """[M, BLOCK_N] bool keep-mask of query rows ``rows`` [M] (``row0 + arange(M)``, positions
    in the sequence, row0 and M multiples of 16) against keys ``key_start .. key_start +
    BLOCK_N - 1`` (``key_start`` and BLOCK_N multiples of 16) of query head ``head``.
    ``stream_lo``, ``stream_hi`` (the call's stream key) and ``threshold`` (the 16-bit drop
    threshold) are 32-bit values in the low bits of int64 arguments (the host sets bit 40 so
    that Triton always types them int64)."""
    M: tl.constexpr = rows.shape[0]
    R: tl.constexpr = M // 16
    G: tl.constexpr = BLOCK_N // 4            # (J, c) groups: 4 per 16 keys
    k0 = (stream_lo & 0xFFFFFFFF).to(tl.uint32)
    k1 = (stream_hi & 0xFFFFFFFF).to(tl.uint32) ^ seq_hi
    # rows [M] -> [R, 8, 2(s)]; the first of each pair (s = 0) keys the counter
    rows_lo, rows_hi = tl.split(tl.permute(tl.reshape(rows, [R, 2, 8]), (0, 2, 1)))
    groups = ((key_start // 16) * 4 + tl.arange(0, G)).to(tl.uint32)
    shape: tl.constexpr = [R, 8, G]
    c0 = tl.zeros(shape, tl.uint32) + groups[None, None, :]
    c1 = tl.zeros(shape, tl.uint32) + rows_lo.to(tl.uint32)[:, :, None]
    c2 = tl.zeros(shape, tl.uint32) + head.to(tl.uint32)
    c3 = tl.zeros(shape, tl.uint32) + seq_lo
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    x0 = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))   # [R, 8, G, h, i], s=0
    x1 = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))   # s = 1
    x = tl.reshape(tl.join(x0, x1), [R, 8, BLOCK_N // 16, 4, 2, 2, 2])              # R, t, J, c, h, i, s
    x = tl.reshape(tl.permute(x, (0, 6, 1, 2, 5, 3, 4)), [M, BLOCK_N])             # R, s, t, J, i, c, h
    return x >= (threshold & 0xFFFF).to(tl.uint32)


@triton.jit(do_not_specialize=["stream_lo", "stream_hi"])   # a new stream key per call: one variant
def dropout_mask_kernel(OUT, SEQ_KEYS, CU_Q, CU_K, stream_lo, stream_hi, threshold,
                        num_heads, seqlen_q, seqlen_k, stride_ob, stride_oh, stride_om,
                        HAS_SEQ_KEYS: tl.constexpr, VARLEN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M), cdiv(Lk, BLOCK_N), B * H): OUT [B, H, Lq, Lk] int8 gets 1
    where an entry is kept, 0 where dropped (varlen: per sequence, its own lengths from
    ``CU_Q``/``CU_K``, entries past them untouched)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    if VARLEN:
        seqlen_q = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        seqlen_k = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    seq_lo, seq_hi = sequence_key(SEQ_KEYS, b, HAS_SEQ_KEYS)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(stream_lo, stream_hi, seq_lo, seq_hi, h, rows, pid_n * BLOCK_N, threshold, BLOCK_N)
    ptrs = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_om + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :])
