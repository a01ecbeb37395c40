"""Attention dropout's keep-mask: Philox4x32-7 over absolute positions.

The mask is a pure function, the same in every kernel that needs it (the dense and
varlen forward, both backward kernels, :func:`dropout_mask_kernel`), whatever tiles
they use:

* philox key ``(k0, k1 ^ seq_hi)``: ``(k0, k1)`` is the call's 64-bit stream key (made on
  the host from torch's generator seed and offset, ``attention/dropout.py``), ``seq_hi``
  the high 32 bits of the sequence's key;
* philox counter ``(4 * (key // 32) + (key % 8) // 2, 16 * (query // 16) + query % 8, head,
  seq_lo)``: ``key`` and ``query`` are the positions inside the sequence (0-based, not
  aligned), ``head`` the query head, ``seq_lo`` the low 32 bits of the sequence's key (by
  default its batch index).  One call serves the query pair (q, q + 8) of a 16-row block
  and, in a 32-key block, the keys ``8i + 2c + h`` (i in 0..3, h in {0, 1}) of one ``c``;
* the four 32-bit outputs give sixteen 8-bit draws: entry (query, key) takes byte
  ``key % 2 + 2 * ((query // 8) % 2)`` (0: the low byte) of output ``(key // 8) % 4``;
* an entry is kept iff its draw is ``>= threshold``, with ``threshold = min(floor(dropout_p
  * 256), 255)``.

Why this shape: sixteen entries per Philox call, and seven rounds, as flash-attn's own
dropout draws them (Philox4x32-7, 8-bit draws; ``dropout_p`` counts in steps of 1/256, as
there).  The integer work of the generator is what dropout costs in every tile: ten
rounds and 16-bit draws took 1.41-1.59x the time of the same call without dropout on an
H200.  The sixteen entries are the ones one thread holds of a Hopper MMA accumulator
(rows r and r + 8, column pairs 2c, 2c + 1 of four 8-column groups), so the mask needs no
exchange through shared memory.  Tiles must start at multiples of 16 rows and hold
multiples of 16 rows; key tiles are 16 keys (half a 32-key group: the call's other half is
not used) or a multiple of 32 keys starting at a multiple of 32.

So a row's mask depends on nothing but its sequence's key, its head and the two
positions: not on the batch around it, the block sizes or the launch.  Philox4x32 is
Random123's generator (Salmon et al., SC'11): multipliers 0xD2511F53 and 0xCD9E8D57, key
increments 0x9E3779B9 and 0xBB67AE85, the key bumped between rounds; seven rounds is the
fewest the paper finds crush-resistant for it (Random123's default is ten).
``attention/dropout.py`` holds the same function in torch integer arithmetic, and the
tests check the two against each other and against Random123's known answers.
"""

import triton
import triton.language as tl

#: Philox rounds of the dropout mask.
DROPOUT_ROUNDS = tl.constexpr(7)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr):
    """Random123's philox4x32-``ROUNDS`` of counter (c0..c3) under key (k0, k1); uint32 in
    and out."""
    for r in tl.static_range(ROUNDS):
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
def _bytes(r):
    """[..., 2(h), 2(s)]: byte ``h + 2 s`` of each uint32 of ``r``."""
    return tl.join(tl.join(r & 0xFF, (r >> 8) & 0xFF), tl.join((r >> 16) & 0xFF, r >> 24))


@triton.jit
def dropout_draws(stream_lo, stream_hi, seq_lo, seq_hi, head, rows, key_start, BLOCK_N: tl.constexpr):
    """[M, BLOCK_N] uint32 8-bit draws (0..255) of query rows ``rows`` [M] (``row0 + arange(M)``,
    positions in the sequence, row0 and M multiples of 16) against keys ``key_start ..
    key_start + BLOCK_N - 1`` of query head ``head`` (BLOCK_N 16 with ``key_start`` a multiple
    of 16, or a multiple of 32 with ``key_start`` one too).  ``stream_lo``, ``stream_hi`` (the
    call's stream key) are 32-bit values in the low bits of int64 arguments (the host sets
    bit 40 so that Triton always types them int64).  An entry is kept iff its draw is at
    least the threshold (:func:`dropout_keep`, :func:`drop_weights`)."""
    tl.static_assert(BLOCK_N == 16 or BLOCK_N % 32 == 0, "key tiles of 16 keys or multiples of 32")
    M: tl.constexpr = rows.shape[0]
    R: tl.constexpr = M // 16
    k0 = (stream_lo & 0xFFFFFFFF).to(tl.uint32)
    k1 = (stream_hi & 0xFFFFFFFF).to(tl.uint32) ^ seq_hi
    # rows [M] -> [R, 8, 2(s)]; the first of each pair (s = 0) keys the counter
    rows_lo, rows_hi = tl.split(tl.permute(tl.reshape(rows, [R, 2, 8]), (0, 2, 1)))
    G: tl.constexpr = 4 if BLOCK_N == 16 else BLOCK_N // 8     # (32-key group, c) pairs
    groups = ((key_start // 32) * 4 + tl.arange(0, G)).to(tl.uint32)
    shape: tl.constexpr = [R, 8, G]
    c0 = tl.zeros(shape, tl.uint32) + groups[None, None, :]
    c1 = tl.zeros(shape, tl.uint32) + rows_lo.to(tl.uint32)[:, :, None]
    c2 = tl.zeros(shape, tl.uint32) + head.to(tl.uint32)
    c3 = tl.zeros(shape, tl.uint32) + seq_lo
    r0, r1, r2, r3 = philox4x32(c0, c1, c2, c3, k0, k1, DROPOUT_ROUNDS)
    if BLOCK_N == 16:
        # the tile is one half of its 32-key group: outputs 0, 1 or 2, 3
        upper = (key_start // 16) % 2 == 1
        x = tl.join(_bytes(tl.where(upper, r2, r0)), _bytes(tl.where(upper, r3, r1)))   # R, t, c, h, s, i
        x = tl.reshape(tl.permute(x, (0, 4, 1, 5, 2, 3)), [M, BLOCK_N])                 # R, s, t, i, c, h
    else:
        x = tl.join(tl.join(_bytes(r0), _bytes(r1)), tl.join(_bytes(r2), _bytes(r3)))  # R, t, G, h, s, i%2, i//2
        x = tl.reshape(x, [R, 8, BLOCK_N // 32, 4, 2, 2, 2, 2])                         # R, t, g, c, h, s, il, ih
        x = tl.reshape(tl.permute(x, (0, 5, 1, 2, 7, 6, 3, 4)), [M, BLOCK_N])           # R, s, t, g, ih, il, c, h
    return x


@triton.jit
def dropout_keep(stream_lo, stream_hi, seq_lo, seq_hi, head, rows, key_start, threshold,
                 BLOCK_N: tl.constexpr):
    """[M, BLOCK_N] bool keep-mask: :func:`dropout_draws` ``>= threshold`` (the 8-bit drop
    threshold, in the low bits of an int64 argument)."""
    return _kept(dropout_draws(stream_lo, stream_hi, seq_lo, seq_hi, head, rows, key_start, BLOCK_N), threshold)


@triton.jit
def _kept(draws, threshold):
    """The keep test itself: ``draws`` (uint32, 0..255) at least the 8-bit ``threshold``."""
    return draws >= (threshold & 0xFF).to(tl.uint32)


# Inline PTX that applies the keep test to four entries at once (``drop_weights`` with
# ``PACKED``).  Operands after the outputs: the four values, their four
# draws packed as the bytes of one register (entry j in byte j, as Triton packs 8-bit
# inputs), the threshold in every byte (four copies), and the same with each byte's top bit
# cleared (four copies).  Per byte, ``x >= t`` is computed without carries between bytes:
# ``d = (x | 0x80) - (t & 0x7f)`` has its top bit set iff ``x & 0x7f >= t & 0x7f``, and the
# comparison's top bit is ``(x & ~t) | (~(x ^ t) & d)`` (LUT 0xB2).  ``prmt`` with the sign
# flag copies a byte's top bit over a 16-bit lane of a packed pair, and an ``and`` keeps
# or clears the value: dropped entries become +0, kept ones keep their bits, exactly as
# ``tl.where(keep, value, 0.0)``.
_KEEP_TEST = """
or.b32 d, $X, 0x80808080;
sub.u32 d, d, $T7;
lop3.b32 g, $X, $T, d, 0xB2;
"""

_WEIGHTS_ASM = ("{\n.reg .b32 d, g, m, a;\n" + _KEEP_TEST.replace("$X", "$6").replace("$T7", "$11")
                .replace("$T", "$7")
                + "cvt.rn.CVT.f32 a, $3, $2;\nprmt.b32 m, g, 0, 0x9988;\nand.b32 $0, a, m;\n"
                + "cvt.rn.CVT.f32 a, $5, $4;\nprmt.b32 m, g, 0, 0xBBAA;\nand.b32 $1, a, m;\n}")
_WEIGHTS_BF16 = tl.constexpr(_WEIGHTS_ASM.replace("CVT", "bf16x2"))
_WEIGHTS_F16 = tl.constexpr(_WEIGHTS_ASM.replace("CVT", "f16x2"))
#: 15 operands: two outputs, then values, draws, threshold, threshold without top bits
_WEIGHTS_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 2 + ["r"] * 13))


@triton.jit
def _threshold_words(draws, threshold):
    """The threshold in every byte, and the same with each byte's top bit cleared, as
    uint32 tensors of the shape of ``draws``."""
    t = (threshold & 0xFF).to(tl.uint32) * 0x01010101
    zero = tl.zeros(draws.shape, tl.uint32)
    return zero + t, zero + (t & 0x7F7F7F7F)


@triton.jit
def drop_weights(p, draws, threshold, OUT_DTYPE: tl.constexpr, PACKED: tl.constexpr):
    """``tl.where(draws >= threshold, p, 0.0).to(OUT_DTYPE)``: the softmax weights ``p`` [M, N]
    float32 of the value product, with the dropped ones zero, rounded to ``OUT_DTYPE``
    (round to nearest even).  ``PACKED`` (GPU, 16-bit ``OUT_DTYPE``): the same bits through
    inline PTX that tests four draws at once and clears dropped entries after the packed
    conversion; the interpreter and float32 take the plain path."""
    if PACKED:
        t, t7 = _threshold_words(draws, threshold)
        if OUT_DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(_WEIGHTS_BF16.value, _WEIGHTS_CONSTRAINTS.value,
                                             [p, draws.to(tl.uint8), t, t7], dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_WEIGHTS_F16.value, _WEIGHTS_CONSTRAINTS.value,
                                             [p, draws.to(tl.uint8), t, t7], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return tl.where(_kept(draws, threshold), p, 0.0).to(OUT_DTYPE)


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
