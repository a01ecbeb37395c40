"""The attention backward kernels: dq, dk, dv with no atomics and a fixed order.

* :func:`attention_bwd_preprocess_kernel`: ``delta = rowsum(dout * out) - dlse``
  per query row (float32), the softmax-gradient term shared by both kernels.
* :func:`attention_bwd_dkdv_kernel`: one program per (batch, kv head, key
  block).  It loops over the query heads of its GQA group in ascending order
  and, for each, over the query blocks that can see the key block in
  ascending order, accumulating dk and dv in registers.
* :func:`attention_bwd_dq_kernel`: one program per (batch, query head, query
  block), looping over the visible key blocks in ascending order.

Probabilities are recomputed from the forward's log-sum-exp with the same
score transform and masks as the forward (attention_core), so every feature
of the forward has its gradient: causal / sliding window, softcap (through
``1 - tanh^2``), ALiBi (a constant bias) and the softmax scale.  Nothing a
program sums depends on other sequences, on the batch size or on timing:
gradients are deterministic and batch-invariant.

Layouts as the forward: q/dout/out/dq [B, Lq, Hq, D], k/v/dk/dv [B, Lk, Hkv, D]
with unit head-dim stride; lse/delta [B, Hq, Lq] float32.
"""

import triton
import triton.language as tl

from .attention_core import (LOG2E, head_offset, key_block_query_range, score_transform, sequence_bounds, tanh_f32, tile_dot, tile_key_range,
                             visibility_mask)
from .dropout import dropout_keep, sequence_key


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    num_heads_q, seqlen_q, head_dim,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Grid: (cdiv(Lq, BLOCK_M), B * Hq).  delta = sum_d(out * dout) - dlse, float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_q
    h = pid_bh % num_heads_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row_ptrs = pid_bh.to(tl.int64) * seqlen_q + offs_m
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + row_ptrs, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + row_ptrs, delta, mask=offs_m < seqlen_q)


@triton.jit
def _probs_and_dscore(q, k, v, do, lse2, delta, pos_q, pos_k, seqlen_k,
                      qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right,
                      grad_scale, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASKED: tl.constexpr = True,
                      keep=0, drop_scale=1.0, DROPOUT: tl.constexpr = False):
    """For a [M, N] tile: the weights ``p`` of the value product and ``ds`` = dLoss/d(raw
    q.k score).

    ``DROPOUT`` (``keep`` [M, N] bool, ``drop_scale`` = 1 / (1 - p)): the forward's output
    is ``(P * keep) @ V * drop_scale``, so ``p`` is ``P * keep`` (the caller scales dv by
    ``drop_scale``) and dP is ``dO @ V^T * keep * drop_scale``; ``ds = P * (dP - delta)``
    with the undropped ``P`` (``delta = rowsum(dO * O)`` still equals ``rowsum(P * dP)``).

    ``MASKED=False`` for tiles every (row, key) pair of which is visible: the mask is
    skipped; the arithmetic of every element is the same as on the masked path.

    ``lse2`` [M] is the forward's log-sum-exp in base 2; ``delta`` [M] the
    preprocess term; ``grad_scale`` is ``softmax_scale`` (the raw score's
    factor in the natural-log logits).
    """
    s = tile_dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), ROWWISE)
    x, scale = score_transform(s, pos_q, pos_k, qk_scale, softcap_scaled, alibi_slope_log2,
                               HAS_SOFTCAP, HAS_ALIBI)
    if MASKED:
        vis = visibility_mask(pos_q, pos_k, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        x = tl.where(vis, x, float("-inf"))
    p = tl.math.exp2(x * scale - lse2[:, None])
    dp = tile_dot(do, tl.trans(v), tl.zeros([q.shape[0], k.shape[0]], tl.float32), ROWWISE)
    if DROPOUT:
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        t = tanh_f32(s * softcap_scaled)     # d(softcap * tanh(u))/du = softcap * (1 - tanh^2)
        ds = ds * (1.0 - t * t)
    ds = ds * grad_scale
    if DROPOUT:
        p = tl.where(keep, p, 0.0)
    return p, ds


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, mb, offs_m0, offs_d, d_ok, offs_n,
                seqlen_q, seqlen_k, offset, stride_qm, stride_dom,
                qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right, grad_scale,
                BLOCK_M: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr, MASKED: tl.constexpr, drop, DROPOUT: tl.constexpr):
    """Fold query block ``mb`` of one head into this key block's dk, dv.  ``drop`` =
    (stream_lo, stream_hi, seq_lo, seq_hi, head, key_start, threshold, scale) when
    ``DROPOUT``."""
    offs_m = mb * BLOCK_M + offs_m0
    m_ok = offs_m < seqlen_q
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok, other=0.0).to(COMPUTE_DTYPE)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok, other=0.0).to(COMPUTE_DTYPE)
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    keep = 0
    drop_scale = 1.0
    if DROPOUT:
        stream_lo, stream_hi, seq_lo, seq_hi, head, key_start, threshold, drop_scale = drop
        keep = dropout_keep(stream_lo, stream_hi, seq_lo, seq_hi, head, offs_m, key_start, threshold,
                            offs_n.shape[0])
    p, ds = _probs_and_dscore(q, k, v, do, lse2, delta, offs_m + offset, offs_n, seqlen_k,
                              qk_scale, softcap_scaled, alibi_slope_log2, window_left,
                              window_right, grad_scale, COMPUTE_DTYPE, ROWWISE,
                              HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASKED,
                              keep, drop_scale, DROPOUT)
    dv = tile_dot(tl.trans(p.to(COMPUTE_DTYPE)), do, dv, ROWWISE)
    dk = tile_dot(tl.trans(ds.to(COMPUTE_DTYPE)), q, dk, ROWWISE)
    return dk, dv


@triton.jit(do_not_specialize=["drop_lo", "drop_hi"])   # a new stream key per call: one variant
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_alibi_b,
    num_heads_q, num_heads_kv, group_size, seqlen_q, seqlen_k, head_dim, total_q,
    qk_scale, softcap_scaled, grad_scale, window_left, window_right,
    SEQ_KEYS, drop_lo, drop_hi, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, VARLEN: tl.constexpr = False,
    PER_HEAD_SUMS: tl.constexpr = False, SKIP_FULL_MASKS: tl.constexpr = False,
    DROPOUT: tl.constexpr = False, HAS_SEQ_KEYS: tl.constexpr = False,
):
    """Grid: (cdiv(Lk, BLOCK_N), B * Hkv); varlen: (cdiv(max_seqlen_k, BLOCK_N), num_seqs * Hkv)
    over packed [total, H, D] tensors (lse/delta [Hq, total_q]).

    ``PER_HEAD_SUMS`` (float32 inputs): dk/dv of each query head of the GQA group
    are summed over its query blocks from zero and the heads' sums are then added
    in order, instead of one running sum over heads x rows: a shorter fp32
    rounding chain (MQA with long sequences), same order on every call.

    ``DROPOUT``: the forward's keep-mask (``SEQ_KEYS``, ``drop_*``: as the forward kernel's
    arguments), recomputed here from the same positions."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_kv
    h_kv = pid_bh % num_heads_kv
    q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    kv_off = head_offset(b, k_start, h_kv, stride_kb, stride_kn, stride_kh, VARLEN)
    v_off = head_offset(b, k_start, h_kv, stride_vb, stride_vn, stride_vh, VARLEN)
    dk_off = head_offset(b, k_start, h_kv, stride_dkb, stride_dkn, stride_dkh, VARLEN)
    dv_off = head_offset(b, k_start, h_kv, stride_dvb, stride_dvn, stride_dvh, VARLEN)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = (offs_d < head_dim)[None, :]
    n_ok = (offs_n < seqlen_k)[:, None] & d_ok
    k = tl.load(K + kv_off + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=n_ok, other=0.0).to(COMPUTE_DTYPE)
    v = tl.load(V + v_off + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=n_ok, other=0.0).to(COMPUTE_DTYPE)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # Query blocks that can see this key block, and those that see it whole.
    offset = seqlen_k - seqlen_q
    m_lo, m_hi, full_lo, full_hi = key_block_query_range(pid_n * BLOCK_N, seqlen_q, seqlen_k, window_left,
                                                         window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                                         VARLEN)
    full_lo = tl.minimum(tl.maximum(full_lo, m_lo), m_hi)
    full_hi = tl.maximum(tl.minimum(full_hi, m_hi), full_lo)

    seq_lo, seq_hi = sequence_key(SEQ_KEYS, b, HAS_SEQ_KEYS and DROPOUT)
    for g in range(0, group_size):
        h = h_kv * group_size + g
        drop = (drop_lo, drop_hi, seq_lo, seq_hi, h, pid_n * BLOCK_N, drop_threshold, drop_scale)
        alibi_slope_log2 = 0.0
        if HAS_ALIBI:
            alibi_slope_log2 = tl.load(ALIBI + b * stride_alibi_b + h).to(tl.float32) * LOG2E
        q_base = Q + head_offset(b, q_start, h, stride_qb, stride_qm, stride_qh, VARLEN)
        do_base = DO + head_offset(b, q_start, h, stride_dob, stride_dom, stride_doh, VARLEN)
        if VARLEN:
            row_base = h.to(tl.int64) * total_q + q_start
        else:
            row_base = (b * num_heads_q + h).to(tl.int64) * seqlen_q
        if PER_HEAD_SUMS:   # each head's sum starts at zero; heads are added in order after
            dk_h = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
            dv_h = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        else:
            dk_h = dk
            dv_h = dv
        # Query blocks in ascending order.  SKIP_FULL_MASKS: masked ones at the edges of the
        # visible band, fully visible ones (no mask work, the same arithmetic) in between;
        # else every block masked.
        for part in tl.static_range(3 if SKIP_FULL_MASKS else 1):
            lo = m_lo if part == 0 else (full_lo if part == 1 else full_hi)
            hi = (full_lo if part == 0 else (full_hi if part == 1 else m_hi)) if SKIP_FULL_MASKS else m_hi
            for mb in range(lo, hi):
                dk_h, dv_h = _dkdv_block(dk_h, dv_h, k, v, q_base, do_base, LSE, DELTA, row_base, mb, offs_m0,
                                         offs_d, d_ok, offs_n, seqlen_q, seqlen_k, offset, stride_qm, stride_dom,
                                         qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right,
                                         grad_scale, BLOCK_M, COMPUTE_DTYPE, ROWWISE, HAS_SOFTCAP, HAS_ALIBI,
                                         HAS_LEFT, HAS_RIGHT, part != 1, drop, DROPOUT)
        if PER_HEAD_SUMS:
            dk += dk_h
            dv += dv_h
        else:
            dk = dk_h
            dv = dv_h

    if DROPOUT:
        dv = dv * drop_scale
    tl.store(DK + dk_off + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok)
    tl.store(DV + dv_off + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, nb, offs_n0, offs_d, d_ok, offs_m, offset, seqlen_k,
              stride_kn, stride_vn, qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right,
              grad_scale, BLOCK_N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, MASKED: tl.constexpr, drop, DROPOUT: tl.constexpr):
    """Fold key block ``nb`` into this query block's dq.  ``drop`` = (stream_lo, stream_hi,
    seq_lo, seq_hi, head, threshold, scale) when ``DROPOUT``."""
    offs_n = nb * BLOCK_N + offs_n0
    n_ok = (offs_n < seqlen_k)[:, None] & d_ok
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_ok, other=0.0).to(COMPUTE_DTYPE)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_ok, other=0.0).to(COMPUTE_DTYPE)
    keep = 0
    drop_scale = 1.0
    if DROPOUT:
        stream_lo, stream_hi, seq_lo, seq_hi, head, threshold, drop_scale = drop
        keep = dropout_keep(stream_lo, stream_hi, seq_lo, seq_hi, head, offs_m, nb * BLOCK_N, threshold,
                            BLOCK_N)
    p, ds = _probs_and_dscore(q, k, v, do, lse2, delta, offs_m + offset, offs_n, seqlen_k,
                              qk_scale, softcap_scaled, alibi_slope_log2, window_left,
                              window_right, grad_scale, COMPUTE_DTYPE, ROWWISE,
                              HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, MASKED,
                              keep, drop_scale, DROPOUT)
    return tile_dot(ds.to(COMPUTE_DTYPE), k, dq, ROWWISE)


@triton.jit(do_not_specialize=["drop_lo", "drop_hi"])   # a new stream key per call: one variant
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_alibi_b,
    num_heads_q, group_size, seqlen_q, seqlen_k, head_dim, total_q,
    qk_scale, softcap_scaled, grad_scale, window_left, window_right,
    SEQ_KEYS, drop_lo, drop_hi, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, VARLEN: tl.constexpr = False,
    SKIP_FULL_MASKS: tl.constexpr = False,
    DROPOUT: tl.constexpr = False, HAS_SEQ_KEYS: tl.constexpr = False,
):
    """Grid: (cdiv(Lq, BLOCK_M), B * Hq); varlen: (cdiv(max_seqlen_q, BLOCK_M), num_seqs * Hq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_q
    h = pid_bh % num_heads_q
    h_kv = h // group_size
    q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    q_off = head_offset(b, q_start, h, stride_qb, stride_qm, stride_qh, VARLEN)
    do_off = head_offset(b, q_start, h, stride_dob, stride_dom, stride_doh, VARLEN)
    dq_off = head_offset(b, q_start, h, stride_dqb, stride_dqm, stride_dqh, VARLEN)
    k_off = head_offset(b, k_start, h_kv, stride_kb, stride_kn, stride_kh, VARLEN)
    v_off = head_offset(b, k_start, h_kv, stride_vb, stride_vn, stride_vh, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = (offs_d < head_dim)[None, :]
    m_ok = offs_m < seqlen_q
    q = tl.load(Q + q_off + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok, other=0.0).to(COMPUTE_DTYPE)
    do = tl.load(DO + do_off + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok, other=0.0).to(COMPUTE_DTYPE)
    if VARLEN:
        row_ptrs = h.to(tl.int64) * total_q + q_start + offs_m
    else:
        row_ptrs = pid_bh.to(tl.int64) * seqlen_q + offs_m
    lse2 = tl.load(LSE + row_ptrs, mask=m_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row_ptrs, mask=m_ok, other=0.0)
    alibi_slope_log2 = 0.0
    if HAS_ALIBI:
        alibi_slope_log2 = tl.load(ALIBI + b * stride_alibi_b + h).to(tl.float32) * LOG2E

    offset = seqlen_k - seqlen_q
    p_lo = pid_m * BLOCK_M + offset
    p_hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seqlen_q) - 1 + offset
    key_lo, key_hi, full_lo, full_hi = tile_key_range(p_lo, p_hi, seqlen_k, window_left, window_right,
                                                      BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if VARLEN:  # a tile past this sequence's last row does nothing
        key_hi = tl.where(pid_m * BLOCK_M >= seqlen_q, 0, key_hi)
        if HAS_LEFT:    # else key_lo is 0 <= key_hi, and stays a constant
            key_lo = tl.minimum(key_lo, key_hi)
    k_base = K + k_off
    v_base = V + v_off
    seq_lo, seq_hi = sequence_key(SEQ_KEYS, b, HAS_SEQ_KEYS and DROPOUT)
    drop = (drop_lo, drop_hi, seq_lo, seq_hi, h, drop_threshold, drop_scale)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_lo = key_lo // BLOCK_N
    n_hi = tl.cdiv(key_hi, BLOCK_N)
    # Key blocks whose every (row, key) pair with this query block is visible: the forward's.
    full_lo = tl.minimum(tl.maximum(full_lo, n_lo), n_hi)
    full_hi = tl.maximum(tl.minimum(full_hi, n_hi), full_lo)
    # Key blocks in ascending order, masked / whole / masked as the dk/dv kernel's rows.
    for part in tl.static_range(3 if SKIP_FULL_MASKS else 1):
        lo = n_lo if part == 0 else (full_lo if part == 1 else full_hi)
        hi = (full_lo if part == 0 else (full_hi if part == 1 else n_hi)) if SKIP_FULL_MASKS else n_hi
        for nb in range(lo, hi):
            dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, nb, offs_n0, offs_d, d_ok, offs_m, offset,
                           seqlen_k, stride_kn, stride_vn, qk_scale, softcap_scaled, alibi_slope_log2,
                           window_left, window_right, grad_scale, BLOCK_N, COMPUTE_DTYPE, ROWWISE,
                           HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, part != 1, drop, DROPOUT)
    tl.store(DQ + dq_off + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok)
