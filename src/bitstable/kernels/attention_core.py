"""Attention's shared arithmetic: score transform, block update, split merge, epilogue.

Every attention kernel (dense forward, and the varlen / KV-cache / decode
kernels built on it) calls these ``@triton.jit`` functions, so the compiler sees
one arithmetic everywhere.  Together they define the reduction order of the
invariance contract:

* keys are cut into blocks of ``BLOCK_N`` tokens starting at key position 0;
* blocks are grouped into splits of ``split_size`` tokens, also from position 0;
* inside a split, :func:`block_update` folds blocks in ascending order into a
  split state ``(m, l, acc)`` that starts from :func:`empty_state`;
* split states are folded in ascending split order into the running total by
  :func:`merge_states`;
* :func:`finalize` turns the total into the output and the log-sum-exp.

States are in base 2: ``m`` is a row max of ``log2(e) * score``, ``l`` the sum of
``2**(s - m)`` and ``acc`` the matching weighted sum of values, all float32.

A block that is fully masked for a row leaves that row's state bit-for-bit
unchanged (its max is -inf, its weights are exactly 0, its rescale factor is
exactly 1), and merging an empty split is the identity.  That is why a kernel
may skip, or process, blocks that a row cannot see without changing the row's
bits.  Masks are applied to scores *before* the scale multiply, so the
compiler contracts ``x * scale - m`` into the same FMA on masked and unmasked
code paths: a visible element rounds identically on both.
"""

import triton
import triton.language as tl

from .dropout import drop_weights

#: log2(e) and ln(2), the base changes of the base-2 states; the one definition every
#: kernel (and the host's score scales) uses.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def tile_dot(a, b, acc, ROWWISE: tl.constexpr):
    """``acc + a @ b`` for tiles a [M, K], b [K, N], accumulating in float32.

    On a GPU this is ``tl.dot`` (tensor cores for 16-bit inputs, IEEE fp32 for
    float32, never tf32).  Under Triton's interpreter (``ROWWISE``) it is a broadcast
    multiply and a sum over K instead: numpy's BLAS matmul, which the
    interpreter would use, rounds a row differently depending on where the
    row sits inside the tile, and bfloat16 ``tl.dot`` is wrong there.
    """
    if ROWWISE:
        prod = a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]
        return acc + tl.sum(prod, axis=1)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def tanh_f32(x):
    """tanh in float32, the same arithmetic in every kernel (used by softcap).

    ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` loses the low bits of small arguments to
    the cancellation in ``1 - e`` (relative error up to 0.18 near 0, which softcap's
    ``c * tanh(s / c)`` turns into logit errors several times stock's); below |x| = 0.4
    the odd Taylor series to x^15 (truncation < 1e-10) is used instead: relative error
    <= 1.6e-7 everywhere (measured against float64 on 2e5 points in [-3, 3]).
    """
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    x2 = a * a
    s = x2 * -0.0014558343870513183 + 0.0035921280365724811
    s = s * x2 + -0.0088632355299021966
    s = s * x2 + 0.021869488536155203
    s = s * x2 + -0.053968253968253968
    s = s * x2 + 0.13333333333333333
    s = s * x2 + -0.33333333333333333
    small = a + a * x2 * s
    t = tl.where(a < 0.4, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def score_transform(s, pos_q, pos_k, qk_scale, softcap_scaled, alibi_slope_log2,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Raw q.k scores [M, N] fp32 -> scores ``x`` whose base-2 logits are ``x * scale``.

    Returns ``(x, scale)``.  Without ALiBi, ``x`` is the raw score (through
    ``tanh(s * softmax_scale / c)`` with softcap ``c``) and ``scale`` is
    ``qk_scale`` (``softmax_scale * log2(e)``, or ``c * log2(e)`` with softcap),
    so the scale is applied inside :func:`block_update`, fused with the max
    subtraction.  With ALiBi the bias ``-slope * |pos_q - pos_k| * log2(e)``
    is added here and ``scale`` is 1.  ``pos_q`` [M] are the queries'
    positions aligned to the keys (``i + Lk - Lq``), ``pos_k`` [N] the keys'.

    Masks are applied to ``x`` afterwards (``tl.where`` to -inf), which keeps
    the arithmetic of every visible element identical on masked and unmasked
    code paths.
    """
    if HAS_SOFTCAP:
        s = tanh_f32(s * softcap_scaled)
    if HAS_ALIBI:
        dist = tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32)
        s = s * qk_scale - alibi_slope_log2 * dist
        scale: tl.constexpr = 1.0
        return s, scale
    else:
        return s, qk_scale


@triton.jit
def visibility_mask(pos_q, pos_k, seqlen_k, window_left, window_right,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[M, N] bool: key ``pos_k`` exists and is inside query ``pos_q``'s window.

    Causal is ``HAS_RIGHT`` with ``window_right == 0``.
    """
    ok = (pos_k < seqlen_k)[None, :] & (pos_k >= 0)[None, :]
    if HAS_RIGHT:
        ok = ok & (pos_k[None, :] <= pos_q[:, None] + window_right)
    if HAS_LEFT:
        ok = ok & (pos_k[None, :] >= pos_q[:, None] - window_left)
    return ok


@triton.jit
def sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """Sequence ``b``'s ``(q_start, seqlen_q, k_start, seqlen_k)``: its first row and key in
    the packed tensors and its lengths.  ``VARLEN``: from the cumulative lengths ``CU_Q`` /
    ``CU_K`` [num_seqs + 1] int32; dense: 0, 0 and the call's ``seqlen_q`` / ``seqlen_k``."""
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_start
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def head_offset(b, start, h, stride_b, stride_row, stride_h, VARLEN: tl.constexpr):
    """Element offset (int64) of head ``h``'s first row of sequence ``b``: in a
    [B, L, H, D] tensor ``b * stride_b + h * stride_h``; in a varlen pack [total, H, D]
    (``VARLEN``) ``start * stride_row + h * stride_h``, ``start`` the sequence's first row."""
    if VARLEN:
        off = start.to(tl.int64) * stride_row + h.to(tl.int64) * stride_h
    else:
        off = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    return off


@triton.jit
def tile_key_range(p_lo, p_hi, seqlen_k, window_left, window_right, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Keys a tile of queries at positions ``p_lo .. p_hi`` can see, and the key blocks
    every one of them sees whole.

    Returns ``(key_lo, key_hi, full_lo, full_hi)``: keys ``[key_lo, key_hi)`` are visible
    to some row; blocks ``[full_lo, full_hi)`` (unclamped: callers intersect them with
    their own block range) are visible to every row, so they fold without mask work.
    """
    key_lo = 0
    key_hi = seqlen_k
    full_lo = 0
    full_hi = seqlen_k // BLOCK_N
    if HAS_LEFT:
        key_lo = tl.maximum(p_lo - window_left, 0)
        full_lo = tl.cdiv(tl.maximum(p_hi - window_left, 0), BLOCK_N)
    if HAS_RIGHT:
        key_hi = tl.minimum(tl.maximum(p_hi + window_right + 1, 0), seqlen_k)
        full_hi = tl.minimum(full_hi, tl.maximum(p_lo + window_right + 1, 0) // BLOCK_N)
    return key_lo, key_hi, full_lo, full_hi


@triton.jit
def key_block_query_range(n0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                          VARLEN: tl.constexpr):
    """Query blocks that can see the key block starting at key ``n0`` (positions aligned
    bottom-right), and those whose every (row, key) pair with it is visible: the transpose
    of :func:`tile_key_range`, for the dk/dv kernel.

    Returns ``(m_lo, m_hi, full_lo, full_hi)`` in query blocks of ``BLOCK_M``: blocks
    ``[m_lo, m_hi)`` hold some row that sees a key of the block; blocks ``[full_lo,
    full_hi)`` (unclamped) see all of it, so they fold without mask work.  ``VARLEN``: a
    key block past the sequence's last key is seen by none.
    """
    offset = seqlen_k - seqlen_q
    row_lo = 0
    row_hi = seqlen_q
    if HAS_RIGHT:
        row_lo = tl.maximum(n0 - window_right - offset, 0)
    if HAS_LEFT:
        row_hi = tl.minimum(n0 + BLOCK_N - 1 + window_left - offset + 1, seqlen_q)
    m_lo = row_lo // BLOCK_M
    m_hi = tl.cdiv(tl.maximum(row_hi, 0), BLOCK_M)
    if VARLEN:  # a key block past this sequence's last key does nothing
        m_hi = tl.where(n0 >= seqlen_k, m_lo, m_hi)
    full_lo = m_lo
    full_hi = m_hi
    if HAS_RIGHT:    # key n0+BN-1 <= row position + window_right for the block's first row
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset - window_right, 0), BLOCK_M)
    if HAS_LEFT:     # key n0 >= row position - window_left for the block's last row
        t = n0 + window_left - offset - BLOCK_M + 1
        full_hi = tl.where(t >= 0, t // BLOCK_M + 1, 0)
    full_hi = tl.where(n0 + BLOCK_N <= seqlen_k, full_hi, 0)    # keys past the end need the mask
    return m_lo, m_hi, full_lo, full_hi


@triton.jit
def empty_state(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The state of a row that has seen no key: (m=-inf, l=0, acc=0)."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    return m, l, acc


@triton.jit
def block_update(m, l, acc, x, v, scale, P_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
                 keep=0, DROPOUT: tl.constexpr = False):
    """Fold one key block into a split state (online softmax, base 2).

    ``x`` [M, N] fp32 scores, -inf where masked, whose base-2 logits are
    ``x * scale`` (``scale`` > 0, so the row max is ``max(x) * scale``
    exactly); ``v`` [N, D] values.  ``P_DTYPE`` is the dtype the weights are
    rounded to before the P @ V product (the value dtype on tensor cores,
    float32 for float32 inputs); ``ROWWISE`` selects the interpreter's
    product (see :func:`tile_dot`).

    ``DROPOUT``: ``keep`` = (draws [M, N] uint32, threshold), kernels/dropout.py's
    :func:`dropout_draws` of this tile and the drop threshold; dropped weights still count in
    ``l`` (the softmax denominator) but not in ``acc``; the kept ones are scaled by
    1 / (1 - p) once, on the output (the kernel's epilogue).
    """
    m_new = tl.maximum(m, tl.max(x, 1) * scale)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m - m_ref)
    p = tl.math.exp2(x * scale - m_ref[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        draws, threshold = keep
        pv = drop_weights(p, draws, threshold, P_DTYPE, (not ROWWISE) and P_DTYPE != tl.float32)
    else:
        pv = p.to(P_DTYPE)
    acc = tile_dot(pv, v, acc, ROWWISE)
    return m_new, l, acc


@triton.jit
def fold_block(m, l, acc, q, k, v, pos_q, pos_k, seqlen_k,
               qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right,
               MASKED: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               keep=0, DROPOUT: tl.constexpr = False):
    """The inner-loop step every attention kernel shares: scores of q [M, D]
    against the key block k [N, D] at positions ``pos_k``, masks (``MASKED``),
    and :func:`block_update` with the values v [N, D].

    The dense forward (prefill) and the split-KV decode kernels both fold their
    key blocks through this one function, whatever loaded the tiles.  ``keep`` /
    ``DROPOUT``: the dropout mask of this tile (training forward only), see
    :func:`block_update`.
    """
    k = k.to(COMPUTE_DTYPE)
    v = v.to(COMPUTE_DTYPE)
    s = tile_dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), ROWWISE)
    x, scale = score_transform(s, pos_q, pos_k, qk_scale, softcap_scaled, alibi_slope_log2,
                               HAS_SOFTCAP, HAS_ALIBI)
    if MASKED:
        vis = visibility_mask(pos_q, pos_k, seqlen_k, window_left, window_right,
                              HAS_LEFT, HAS_RIGHT)
        x = tl.where(vis, x, float("-inf"))
    return block_update(m, l, acc, x, v, scale, COMPUTE_DTYPE, ROWWISE, keep, DROPOUT)


@triton.jit
def merge_states(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """Merge state ``b`` (the later split) into ``a`` (everything before it).

    The one merge of the library: the prefill kernel merges splits with it in
    registers, the decode combine kernel merges its workspace with it.
    """
    m = tl.maximum(m_a, m_b)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    a = tl.math.exp2(m_a - m_ref)
    b = tl.math.exp2(m_b - m_ref)
    l = l_a * a + l_b * b
    acc = acc_a * a[:, None] + acc_b * b[:, None]
    return m, l, acc


@triton.jit
def finalize(m, l, acc):
    """Total state -> (out fp32 [M, D], natural-log LSE [M]).

    A row that saw no key gets out = 0 and lse = +inf (FlashAttention's
    convention, so that a backward pass gives it zero weights).
    """
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    lse = (m + tl.math.log2(l_safe)) * LN2
    lse = tl.where(empty, float("inf"), lse)
    return out, lse
