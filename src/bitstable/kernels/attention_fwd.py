"""The dense attention forward kernel (training and prefill).

One program computes one tile of ``BLOCK_M`` query rows of one (batch, query
head).  It walks the key blocks the tile can see in ascending order, folds them
into a split state with :func:`block_update`, and at every split boundary
(``SPLIT_BLOCKS`` blocks, aligned to key position 0) merges the split into the
running total with :func:`merge_states`.  The walk is cut into three loops:
leading blocks that need a mask (sliding window), blocks every row of the tile
sees whole (no mask, the fast path), trailing blocks that need a mask (causal
diagonal, window's right edge, the ragged end of the keys).  A row's bits do
not depend on which loop handled a block (see attention_core).

Layout: q ``[B, Lq, Hq, D]``, k/v ``[B, Lk, Hkv, D]`` with any strides; out like
q; lse ``[B, Hq, Lq]`` float32.  Query head ``h`` reads key/value head
``h // (Hq // Hkv)``.
"""

import triton
import triton.language as tl

from .attention_core import (LOG2E, empty_state, finalize, fold_block, head_offset, merge_states, sequence_bounds,
                             tile_key_range)
from .dropout import dropout_draws, sequence_key


@triton.jit
def _process_block(j, m_s, l_s, acc_s, m_t, l_t, acc_t, q, kv, where, scores, drop,
                   MASKED: tl.constexpr, MERGE_AT_SPLIT_END: tl.constexpr, EVEN_D: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT_BLOCKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, USE_TMA: tl.constexpr,
                   DROPOUT: tl.constexpr):
    """Fold key block ``j`` into the split state; merge into the total at a split end.

    ``kv`` = (k_src, v_src, kv_b, kv_h, stride_kn, stride_vn), ``where`` = (offs_n,
    offs_d, pos_q, seqlen_k, head_dim), ``scores`` = (qk_scale, softcap_scaled,
    alibi_slope_log2, window_left, window_right), ``drop`` = (stream_lo, stream_hi, seq_lo,
    seq_hi, head, rows, threshold): the dropout mask's inputs (``DROPOUT``).

    ``k_src``/``v_src`` are host-made 4-d tensor descriptors over k/v
    [B, Lk, Hkv, D] (``USE_TMA``: the copy engine zero-fills rows past this
    sequence's last key and columns past head_dim, and needs no scratch
    memory) or the (batch, head) base pointers (masked loads).  Both load the
    same values.
    """
    k_src, v_src, kv_b, kv_h, stride_kn, stride_vn = kv
    offs_n, offs_d, pos_q, seqlen_k, head_dim = where
    qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right = scores
    pos_k = j * BLOCK_N + offs_n
    if USE_TMA:
        k = k_src.load([kv_b, j * BLOCK_N, kv_h, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_src.load([kv_b, j * BLOCK_N, kv_h, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif MASKED:
        k_ptrs = k_src + pos_k[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_src + pos_k[:, None] * stride_vn + offs_d[None, :]
        ld_mask = (pos_k < seqlen_k)[:, None] & (offs_d < head_dim)[None, :]
        k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
        v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_src + pos_k[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(v_src + pos_k[:, None] * stride_vn + offs_d[None, :])
    else:
        k_ptrs = k_src + pos_k[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_src + pos_k[:, None] * stride_vn + offs_d[None, :]
        ld_mask = (offs_d < head_dim)[None, :]
        k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
        v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
    keep = 0
    if DROPOUT:
        stream_lo, stream_hi, seq_lo, seq_hi, head, rows, threshold = drop
        keep = (dropout_draws(stream_lo, stream_hi, seq_lo, seq_hi, head, rows, j * BLOCK_N, BLOCK_N), threshold)
    m_s, l_s, acc_s = fold_block(m_s, l_s, acc_s, q, k, v, pos_q, pos_k, seqlen_k,
                                 qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right,
                                 MASKED, COMPUTE_DTYPE, ROWWISE, HAS_SOFTCAP, HAS_ALIBI,
                                 HAS_LEFT, HAS_RIGHT, keep, DROPOUT)
    if MERGE_AT_SPLIT_END:
        if (j + 1) % SPLIT_BLOCKS == 0:
            m_t, l_t, acc_t = merge_states(m_t, l_t, acc_t, m_s, l_s, acc_s)
            m_s = tl.zeros_like(m_s) + float("-inf")
            l_s = tl.zeros_like(l_s)
            acc_s = tl.zeros_like(acc_s)
    return m_s, l_s, acc_s, m_t, l_t, acc_t


@triton.jit
def _fold_bands(lo, a, bb, hi, m_s, l_s, acc_s, m_t, l_t, acc_t, q, kv, where, scores, drop,
                MERGE_AT_SPLIT_END: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_N: tl.constexpr, SPLIT_BLOCKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                ROWWISE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, USE_TMA: tl.constexpr,
                DROPOUT: tl.constexpr):
    """Fold key blocks ``[lo, hi)`` in ascending order as three bands: ``[lo, a)`` masked,
    ``[a, bb)`` whole (no mask work), ``[bb, hi)`` masked (``lo <= a <= bb <= hi``).

    The one block walk of both loop structures; the other arguments are
    :func:`_process_block`'s."""
    for part in tl.static_range(3):
        for j in range(lo if part == 0 else (a if part == 1 else bb),
                       a if part == 0 else (bb if part == 1 else hi)):
            m_s, l_s, acc_s, m_t, l_t, acc_t = _process_block(
                j, m_s, l_s, acc_s, m_t, l_t, acc_t, q, kv, where, scores, drop, part != 1,
                MERGE_AT_SPLIT_END, EVEN_D, HEAD_DIM, BLOCK_N, SPLIT_BLOCKS, COMPUTE_DTYPE, ROWWISE,
                HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, USE_TMA, DROPOUT)
    return m_s, l_s, acc_s, m_t, l_t, acc_t


@triton.jit(do_not_specialize=["drop_lo", "drop_hi"])   # a new stream key per call: one variant
def attention_fwd_kernel(
    Q, K, V, O, LSE, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_alibi_b,
    num_heads_q, group_size, seqlen_q, seqlen_k, head_dim, total_q,
    qk_scale, softcap_scaled, window_left, window_right,
    SEQ_KEYS, drop_lo, drop_hi, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_BLOCKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    EVEN_D: tl.constexpr, WRITE_LSE: tl.constexpr, REVERSE_M: tl.constexpr,
    LOOP: tl.constexpr = 0, USE_TMA: tl.constexpr = False, VARLEN: tl.constexpr = False,
    DROPOUT: tl.constexpr = False, HAS_SEQ_KEYS: tl.constexpr = False,
):
    """Grid: (cdiv(Lq, BLOCK_M), B * Hq).  Last-dim strides are 1 (the launcher ensures it).

    ``LOOP`` picks the loop structure, a launch-only choice (both compute the
    same reduction order, bit for bit; a test checks it): 0 = flat loops with
    the split merge as a branch, 1 = an outer loop over splits with the merge
    after each.  Which is faster depends on the tile config (configs.py).

    ``VARLEN``: q/out are packed [total_q, Hq, D] and k/v [total_k, Hkv, D];
    sequence ``b`` owns rows ``CU_Q[b]:CU_Q[b+1]`` and keys
    ``CU_K[b]:CU_K[b+1]``; the grid is (cdiv(max_seqlen_q, BLOCK_M),
    num_seqs * Hq) and lse is [Hq, total_q].  Tiles, blocks and splits start
    at each sequence's own row and key 0, so a packed sequence computes
    exactly what it computes alone in the dense layout.

    ``DROPOUT``: kernels/dropout.py's keep-mask of (``drop_lo``, ``drop_hi``, the
    sequence's key: ``SEQ_KEYS[b]`` if ``HAS_SEQ_KEYS`` else ``b``, the query head, the
    row and key positions in the sequence) against ``drop_threshold``; dropped weights
    leave the value sum, the output is scaled by ``drop_scale`` = 1 / (1 - p) and the lse
    is the undropped softmax's (flash-attn's convention).
    """
    pid_m = tl.program_id(0)
    if REVERSE_M:  # launch order only: heavy causal tiles first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_q
    h = pid_bh % num_heads_q
    h_kv = h // group_size

    q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    pos_q = offs_m + (seqlen_k - seqlen_q)

    q_base = Q + head_offset(b, q_start, h, stride_qb, stride_qm, stride_qh, VARLEN)
    if USE_TMA and not VARLEN:   # descriptors over the whole k / v
        k_src = K
        v_src = V
    else:
        k_src = K + head_offset(b, k_start, h_kv, stride_kb, stride_kn, stride_kh, VARLEN)
        v_src = V + head_offset(b, k_start, h_kv, stride_vb, stride_vn, stride_vh, VARLEN)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    q = q.to(COMPUTE_DTYPE)

    alibi_slope_log2 = 0.0
    if HAS_ALIBI:
        alibi_slope_log2 = tl.load(ALIBI + b * stride_alibi_b + h).to(tl.float32) * LOG2E

    # Keys the tile can see, and the blocks every row of the tile sees whole.
    p_lo = pid_m * BLOCK_M + (seqlen_k - seqlen_q)
    p_hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seqlen_q) - 1 + (seqlen_k - seqlen_q)
    key_lo, key_hi, full_lo, full_hi = tile_key_range(p_lo, p_hi, seqlen_k, window_left, window_right,
                                                      BLOCK_N, HAS_LEFT, HAS_RIGHT)
    blk_lo = key_lo // BLOCK_N
    blk_hi = tl.maximum(tl.cdiv(key_hi, BLOCK_N), blk_lo)
    if VARLEN:  # a tile past this sequence's last row does nothing
        blk_hi = tl.where(pid_m * BLOCK_M >= seqlen_q, blk_lo, blk_hi)
    mid_lo = tl.minimum(tl.maximum(full_lo, blk_lo), blk_hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), blk_hi)

    m_t, l_t, acc_t = empty_state(BLOCK_M, HEAD_DIM)
    m_s, l_s, acc_s = empty_state(BLOCK_M, HEAD_DIM)
    kv = (k_src, v_src, b, h_kv, stride_kn, stride_vn)
    where = (offs_n, offs_d, pos_q, seqlen_k, head_dim)
    scores = (qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right)
    seq_lo, seq_hi = sequence_key(SEQ_KEYS, b, HAS_SEQ_KEYS and DROPOUT)
    drop = (drop_lo, drop_hi, seq_lo, seq_hi, h, offs_m, drop_threshold)
    if LOOP == 1:
        # Outer loop over splits, inner loops over the split's blocks (masked edge, whole
        # blocks, masked edge); merge after each split.
        for sp in range(blk_lo // SPLIT_BLOCKS, tl.cdiv(blk_hi, SPLIT_BLOCKS)):
            lo = tl.maximum(blk_lo, sp * SPLIT_BLOCKS)
            hi = tl.minimum(blk_hi, sp * SPLIT_BLOCKS + SPLIT_BLOCKS)
            a = tl.minimum(tl.maximum(mid_lo, lo), hi)
            bb = tl.minimum(tl.maximum(mid_hi, a), hi)
            m_s, l_s, acc_s, m_t, l_t, acc_t = _fold_bands(
                lo, a, bb, hi, m_s, l_s, acc_s, m_t, l_t, acc_t, q, kv, where, scores, drop, False,
                EVEN_D, HEAD_DIM, BLOCK_N, SPLIT_BLOCKS, COMPUTE_DTYPE, ROWWISE, HAS_SOFTCAP, HAS_ALIBI,
                HAS_LEFT, HAS_RIGHT, USE_TMA, DROPOUT)
            m_t, l_t, acc_t = merge_states(m_t, l_t, acc_t, m_s, l_s, acc_s)
            m_s = tl.zeros_like(m_s) + float("-inf")
            l_s = tl.zeros_like(l_s)
            acc_s = tl.zeros_like(acc_s)
    else:
        # Flat loops (masked edge, whole blocks, masked edge); the split merge is a branch
        # taken at each split's last block.
        m_s, l_s, acc_s, m_t, l_t, acc_t = _fold_bands(
            blk_lo, mid_lo, mid_hi, blk_hi, m_s, l_s, acc_s, m_t, l_t, acc_t, q, kv, where, scores, drop,
            True, EVEN_D, HEAD_DIM, BLOCK_N, SPLIT_BLOCKS, COMPUTE_DTYPE, ROWWISE, HAS_SOFTCAP, HAS_ALIBI,
            HAS_LEFT, HAS_RIGHT, USE_TMA, DROPOUT)
        # The last, possibly partial, split.  Merging an empty split is the identity.
        m_t, l_t, acc_t = merge_states(m_t, l_t, acc_t, m_s, l_s, acc_s)

    out, lse = finalize(m_t, l_t, acc_t)
    if DROPOUT:
        out = out * drop_scale
    o_base = O + head_offset(b, q_start, h, stride_ob, stride_om, stride_oh, VARLEN)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < head_dim)[None, :])
    if WRITE_LSE:
        if VARLEN:
            lse_ptrs = LSE + h.to(tl.int64) * total_q + q_start + offs_m
        else:
            lse_ptrs = LSE + pid_bh.to(tl.int64) * seqlen_q + offs_m
        tl.store(lse_ptrs, lse, mask=row_ok)
