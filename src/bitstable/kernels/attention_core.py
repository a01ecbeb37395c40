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

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


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
    """tanh through exp, identical on every backend (used by softcap)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def score_transform(s, pos_q, pos_k, qk_scale, softcap_scaled, alibi_slope_log2,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, KEYS_MAJOR: tl.constexpr = False):
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
    code paths.  ``KEYS_MAJOR``: ``s`` is the transposed tile [N, M] (and
    ``alibi_slope_log2`` [1, M]); the arithmetic per element is the same.
    """
    if HAS_SOFTCAP:
        s = tanh_f32(s * softcap_scaled)
    if HAS_ALIBI:
        if KEYS_MAJOR:
            dist = tl.abs(pos_q[None, :] - pos_k[:, None]).to(tl.float32)
        else:
            dist = tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32)
        s = s * qk_scale - alibi_slope_log2 * dist
        scale: tl.constexpr = 1.0
        return s, scale
    else:
        return s, qk_scale


@triton.jit
def visibility_mask(pos_q, pos_k, seqlen_k, window_left, window_right,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, KEYS_MAJOR: tl.constexpr = False):
    """[M, N] bool ([N, M] if ``KEYS_MAJOR``): key ``pos_k`` exists and is inside
    query ``pos_q``'s window.

    Causal is ``HAS_RIGHT`` with ``window_right == 0``.
    """
    if KEYS_MAJOR:
        ok = (pos_k < seqlen_k)[:, None] & (pos_k >= 0)[:, None]
        if HAS_RIGHT:
            ok = ok & (pos_k[:, None] <= pos_q[None, :] + window_right)
        if HAS_LEFT:
            ok = ok & (pos_k[:, None] >= pos_q[None, :] - window_left)
    else:
        ok = (pos_k < seqlen_k)[None, :] & (pos_k >= 0)[None, :]
        if HAS_RIGHT:
            ok = ok & (pos_k[None, :] <= pos_q[:, None] + window_right)
        if HAS_LEFT:
            ok = ok & (pos_k[None, :] >= pos_q[:, None] - window_left)
    return ok


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
def empty_state(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The state of a row that has seen no key: (m=-inf, l=0, acc=0)."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    return m, l, acc


@triton.jit
def block_update(m, l, acc, x, v, scale, P_DTYPE: tl.constexpr, ROWWISE: tl.constexpr):
    """Fold one key block into a split state (online softmax, base 2).

    ``x`` [M, N] fp32 scores, -inf where masked, whose base-2 logits are
    ``x * scale`` (``scale`` > 0, so the row max is ``max(x) * scale``
    exactly); ``v`` [N, D] values.  ``P_DTYPE`` is the dtype the weights are
    rounded to before the P @ V product (the value dtype on tensor cores,
    float32 for float32 inputs); ``ROWWISE`` selects the interpreter's
    product (see :func:`tile_dot`).
    """
    m_new = tl.maximum(m, tl.max(x, 1) * scale)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m - m_ref)
    p = tl.math.exp2(x * scale - m_ref[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tile_dot(p.to(P_DTYPE), v, acc, ROWWISE)
    return m_new, l, acc


@triton.jit
def fold_block(m, l, acc, q, k, v, pos_q, pos_k, seqlen_k,
               qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right,
               MASKED: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """The inner-loop step every attention kernel shares: scores of q [M, D]
    against the key block k [N, D] at positions ``pos_k``, masks (``MASKED``),
    and :func:`block_update` with the values v [N, D].

    The dense forward (prefill) and the split-KV decode kernels both fold their
    key blocks through this one function, whatever loaded the tiles.
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
    return block_update(m, l, acc, x, v, scale, COMPUTE_DTYPE, ROWWISE)


@triton.jit
def _column(x, t: tl.constexpr, LOG2_N: tl.constexpr):
    """``x[:, :, t]`` of x [A, B, 2**LOG2_N], by halving splits (data movement only)."""
    for b in tl.static_range(LOG2_N):
        x = tl.reshape(x, [x.shape[0], x.shape[1], x.shape[2] // 2, 2])
        lo, hi = tl.split(x)
        if (t >> b) & 1:
            x = hi
        else:
            x = lo
    return tl.reshape(x, [x.shape[0], x.shape[1]])


@triton.jit
def key_sum_dense_order(p, ROWWISE: tl.constexpr):
    """Sums over keys of p [N, M] (keys-major), bit for bit as the dense kernel's
    ``tl.sum(p^T, 1)`` over its [M, N] tile.

    The order is the one the dense kernel's row sum takes on Hopper (read from its
    PTX for a one-warpgroup wgmma accumulator, BLOCK_M = 16 rows per warp): lane
    ``c`` (c = 0..3) of a row's quad holds keys ``8j + 2c + {0, 1}`` and folds them
    in order (j ascending, then the pair), and the quad combines its four partial
    sums as ``(c0 + c2) + (c1 + c3)``.  The same sequence of float32 additions is
    written out here.  Under the interpreter (``ROWWISE``) the dense kernel's sum is
    numpy's over a contiguous row, so the rows are copied contiguous and summed the
    same way.
    """
    N: tl.constexpr = p.shape[0]
    M: tl.constexpr = p.shape[1]
    if ROWWISE:
        rows = tl.reshape(tl.reshape(tl.trans(p), [N * M]), [M, N])
        return tl.sum(rows, 1)
    else:
        J: tl.constexpr = N // 8
        LOG2_N: tl.constexpr = 1 + (2 * J > 2) + (2 * J > 4) + (2 * J > 8) + (2 * J > 16)
        tl.static_assert(N >= 16 and N <= 128, "key_sum_dense_order: 16 <= BLOCK_N <= 128")
        x = tl.reshape(p, [J, 4, 2, M])            # key = 8j + 2c + pair
        x = tl.permute(x, (3, 1, 0, 2))            # [row, c, j, pair]
        x = tl.reshape(x, [M, 4, 2 * J])           # [row, c, 2j + pair]
        part = _column(x, 0, LOG2_N) + _column(x, 1, LOG2_N)
        for t in tl.static_range(2, 2 * J):
            part = part + _column(x, t, LOG2_N)    # [row, c]
        # (c0 + c2) + (c1 + c3): each of the two inner sums adds one pair and zeros,
        # which is that one addition whatever order the reduction takes.
        c = tl.arange(0, 4)[None, :]
        even = tl.sum(tl.where(c % 2 == 0, part, 0.0), 1)
        odd = tl.sum(tl.where(c % 2 == 1, part, 0.0), 1)
        return even + odd


@triton.jit
def block_update_keys_major(m, l, acc_t, x_t, v, scale, P_DTYPE: tl.constexpr):
    """:func:`block_update` on transposed tiles: scores ``x_t`` [N, M] and the
    state's ``acc_t`` [D, M] (keys and head dim along the MMA's M, query rows along
    its N).  Every element gets the arithmetic of :func:`block_update` (the same
    expressions; the P @ V product is V^T @ P^T on the tensor cores, adding the
    same products in the same 16-key steps), and the row sum of the weights is
    added in the dense kernel's order (:func:`key_sum_dense_order`).  For a few
    query rows (a decode step) this spends 64/M times fewer tensor-core and
    exponential operations than padding the rows to a 64-row tile.  GPU only.
    """
    m_new = tl.maximum(m, tl.max(x_t, 0) * scale)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m - m_ref)
    p = tl.math.exp2(x_t * scale - m_ref[None, :])
    l = l * alpha + key_sum_dense_order(p, False)
    acc_t = acc_t * alpha[None, :]
    acc_t = tile_dot(tl.trans(v), p.to(P_DTYPE), acc_t, False)
    return m_new, l, acc_t


@triton.jit
def _contiguous(x):
    """A C-contiguous copy of x [A, B] under the interpreter (a view stays a view
    through elementwise numpy operations; flattening copies)."""
    return tl.reshape(tl.reshape(x, [x.shape[0] * x.shape[1]]), [x.shape[0], x.shape[1]])


@triton.jit
def fold_block_keys_major(m, l, acc_t, q, k, v, pos_q, pos_k, seqlen_k,
                          qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right,
                          MASKED: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                          HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """:func:`fold_block` with the state's accumulator transposed (``acc_t`` [D, M]):
    scores K @ Q^T [N, M], masks, :func:`block_update_keys_major`.  Same bits as
    :func:`fold_block` for every row (checked on the device against the dense kernel).
    ``alibi_slope_log2`` is [1, M].

    Under the interpreter (``ROWWISE``) numpy's sums depend on memory order, so there
    the row-major :func:`fold_block` runs on contiguous transposed copies: that checks
    this path's indexing against the dense kernel, and the GPU tests its arithmetic.
    """
    if ROWWISE:
        slope = alibi_slope_log2
        if HAS_ALIBI:
            slope = tl.trans(alibi_slope_log2)
        m, l, acc = fold_block(m, l, _contiguous(tl.trans(acc_t)), q, k, v, pos_q, pos_k, seqlen_k,
                               qk_scale, softcap_scaled, slope, window_left,
                               window_right, MASKED, COMPUTE_DTYPE, ROWWISE, HAS_SOFTCAP, HAS_ALIBI,
                               HAS_LEFT, HAS_RIGHT)
        return m, l, _contiguous(tl.trans(acc))
    else:
        k = k.to(COMPUTE_DTYPE)
        v = v.to(COMPUTE_DTYPE)
        s_t = tile_dot(k, tl.trans(q), tl.zeros([k.shape[0], q.shape[0]], tl.float32), False)
        x_t, scale = score_transform(s_t, pos_q, pos_k, qk_scale, softcap_scaled, alibi_slope_log2,
                                     HAS_SOFTCAP, HAS_ALIBI, True)
        if MASKED:
            vis = visibility_mask(pos_q, pos_k, seqlen_k, window_left, window_right,
                                  HAS_LEFT, HAS_RIGHT, True)
            x_t = tl.where(vis, x_t, float("-inf"))
        return block_update_keys_major(m, l, acc_t, x_t, v, scale, COMPUTE_DTYPE)


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
    lse = (m + tl.math.log2(l_safe)) * 0.6931471805599453
    lse = tl.where(empty, float("inf"), lse)
    return out, lse
