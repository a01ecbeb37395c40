"""Split-KV attention over a KV cache (decode and chunked prefill), in two kernels.

:func:`attention_split_partial_kernel` runs every key split of DESIGN.md's
reduction order in its own program: it folds the split's key blocks in
ascending order with the shared :func:`fold_block` and writes the split state
``(m, l, acc)`` to a float32 workspace.  :func:`attention_split_combine_kernel`
then merges the split states in ascending split order with the shared
:func:`merge_states` and finalises with :func:`finalize`.  Splits, blocks and
the arithmetic are those of the dense forward kernel, which merges the same
split states in the same order in registers, so a query's output is bitwise
the same whether it came from the full-sequence forward, a chunked prefill or
token-by-token decoding.  Splits a row cannot see hold the empty state, whose
merge is the identity, so the number of splits launched (a grid choice from
the longest cache in the batch) changes no bits.

Cache layouts: contiguous ``[B_cache, L_cache, Hkv, D]`` (row ``b`` of the
batch reads cache row ``BATCH_IDX[b]``), or paged ``[num_pages, page_size,
Hkv, D]`` with ``BLOCK_TABLE[b, p]`` naming the page holding keys
``p * page_size ...``.  Workspace: acc ``[S, B, Hq, Lq, D]`` and (m, l)
``[S, B, Hq, Lq, 2]`` float32, for S splits.  The partial kernel packs the
query heads of a GQA group into one tile (they share K/V tile loads).
"""

import triton
import triton.language as tl

from .attention_core import LOG2E, empty_state, finalize, fold_block, merge_states, tile_key_range
from .cache_checks import cache_row_ok


@triton.jit
def _cache_rows(base, b_cache, pos_k, seqlen_k, BLOCK_TABLE, stride_bt_b, b, page_size,
                stride_page, stride_row, PAGED: tl.constexpr):
    """Pointers [N] to the first element of each key row ``pos_k`` of this sequence."""
    if PAGED:
        page = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_bt_b + pos_k // page_size,
                       mask=pos_k < seqlen_k, other=0)
        return base + page.to(tl.int64) * stride_page + (pos_k % page_size).to(tl.int64) * stride_row
    else:
        return base + b_cache.to(tl.int64) * stride_page + pos_k.to(tl.int64) * stride_row


@triton.jit
def _load_cache_block(base, j, b, b_cache, seqlen_k, BLOCK_TABLE, stride_bt_b, page_size,
                      stride_p, stride_row, offs_n, offs_d, d_ok,
                      MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
                      EVEN_D: tl.constexpr):
    """The [BLOCK_N, HEAD_DIM] tile of cached rows ``j * BLOCK_N ...`` (zeros past the
    sequence's keys and past head_dim).  ``MASKED`` False: a block wholly inside the
    sequence, loaded without bounds.  EVEN_D (head_dim == HEAD_DIM): a mask constant
    along d lets each row load in 16-byte vectors through the asynchronous copy
    pipeline; a d-mask would make every element its own load.  Same values either way."""
    pos_k = j * BLOCK_N + offs_n
    rows = _cache_rows(base, b_cache, pos_k, seqlen_k, BLOCK_TABLE, stride_bt_b, b,
                       page_size, stride_p, stride_row, PAGED)
    if EVEN_D:
        if MASKED:
            return tl.load(rows[:, None] + offs_d[None, :], mask=(pos_k < seqlen_k)[:, None], other=0.0)
        else:
            return tl.load(rows[:, None] + offs_d[None, :])
    else:
        return tl.load(rows[:, None] + offs_d[None, :], mask=(pos_k < seqlen_k)[:, None] & d_ok[None, :],
                       other=0.0)


@triton.jit
def _load_cache_block_tma(desc, j, b_cache, h_kv, page, page_size,
                          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGED: tl.constexpr):
    """The [BLOCK_N, HEAD_DIM] tile of cached rows ``j * BLOCK_N ...`` through the copy
    engine (TMA): one bulk copy per tile from a host-made 4-d descriptor over the cache
    ([B_cache, L_cache, Hkv, D], or [pages, page_size, Hkv, D] with page_size a multiple
    of BLOCK_N and ``page`` the block's page, read from the block table one block ahead).
    For blocks wholly inside the sequence only (rows past it would hold stale cache
    entries, not zeros); the same values as the pointer loads."""
    if PAGED:
        tile = desc.load([page, (j * BLOCK_N) % page_size, h_kv, 0])
    else:
        tile = desc.load([b_cache, j * BLOCK_N, h_kv, 0])
    return tile.reshape(BLOCK_N, HEAD_DIM)


@triton.jit
def _block_page(BLOCK_TABLE, b, stride_bt_b, j, page_size, ok, BLOCK_N: tl.constexpr):
    """The page holding key block ``j`` of sequence ``b`` (0 where not ``ok``)."""
    return tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_bt_b + (j * BLOCK_N) // page_size, mask=ok, other=0)


@triton.jit
def _fold_cache_block(j, m_s, l_s, acc_s, q, cache, where, scores, page,
                      MASKED: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                      ROWWISE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PAGED: tl.constexpr,
                      EVEN_D: tl.constexpr, USE_TMA: tl.constexpr = False):
    """Load cached key block ``j`` and fold it into the split state with
    :func:`fold_block`; ``MASKED`` as in the dense kernel (False only for a block
    every row of the tile sees whole).  ``cache`` = (k_base, v_base, b, b_cache,
    seqlen_k, BLOCK_TABLE, stride_bt_b, page_size, stride_kp, stride_kn, stride_vp,
    stride_vn, k_desc, v_desc, h_kv), ``where`` = (offs_n, offs_d, d_ok, dv_ok, pos_q) (``dv_ok``:
    the value head dim's columns),
    ``scores`` = (qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right).
    ``USE_TMA`` (whole blocks only): the tiles come through the copy engine, from
    ``page`` when ``PAGED``."""
    k_base, v_base, b, b_cache, seqlen_k, BLOCK_TABLE, stride_bt_b, page_size, \
        stride_kp, stride_kn, stride_vp, stride_vn, k_desc, v_desc, h_kv = cache
    offs_n, offs_d, d_ok, dv_ok, pos_q = where
    qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right = scores
    if USE_TMA:
        k = _load_cache_block_tma(k_desc, j, b_cache, h_kv, page, page_size, BLOCK_N, offs_d.shape[0], PAGED)
        v = _load_cache_block_tma(v_desc, j, b_cache, h_kv, page, page_size, BLOCK_N, offs_d.shape[0], PAGED)
    else:
        k = _load_cache_block(k_base, j, b, b_cache, seqlen_k, BLOCK_TABLE, stride_bt_b, page_size,
                              stride_kp, stride_kn, offs_n, offs_d, d_ok, MASKED, BLOCK_N, PAGED, EVEN_D)
        v = _load_cache_block(v_base, j, b, b_cache, seqlen_k, BLOCK_TABLE, stride_bt_b, page_size,
                              stride_vp, stride_vn, offs_n, offs_d, dv_ok, MASKED, BLOCK_N, PAGED, EVEN_D)
    return fold_block(m_s, l_s, acc_s, q, k, v, pos_q, j * BLOCK_N + offs_n, seqlen_k,
                      qk_scale, softcap_scaled, alibi_slope_log2, window_left,
                      window_right, MASKED, COMPUTE_DTYPE, ROWWISE, HAS_SOFTCAP,
                      HAS_ALIBI, HAS_LEFT, HAS_RIGHT)


@triton.jit
def attention_split_partial_kernel(
    Q, K, V, K_DESC, V_DESC, WS_ACC, WS_ML, CACHE_SEQLENS, BATCH_IDX, BLOCK_TABLE, ALIBI,
    stride_qb, stride_qm, stride_qh,
    stride_kp, stride_kn, stride_kh,
    stride_vp, stride_vn, stride_vh,
    stride_bt_b, page_size, stride_alibi_b,
    num_heads_q, group_size, batch, seqlen_q, head_dim, num_m_tiles, n_new,
    qk_scale, softcap_scaled, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_BLOCKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, EVEN_D: tl.constexpr,
    USE_TMA: tl.constexpr, USE_PDL: tl.constexpr,
    LEFTPAD=None, HAS_LEFTPAD: tl.constexpr = False,
    head_dim_v=0, SMALLER_V: tl.constexpr = False,
    max_before=0, num_rows=0, max_pages=0, CHECK: tl.constexpr = False,
    BLOCK_B: tl.constexpr = 1, BLOCK_P: tl.constexpr = 1,
):
    """Grid: (num_splits * num_m_tiles, B * Hkv).  One split of one tile of packed rows.

    A tile's rows are (query token, head of the GQA group) pairs, ``row = t *
    group_size + g`` for query head ``h_kv * group_size + g``: the group's heads
    share each K/V tile load, and a decode step (one token) fills ``group_size``
    rows instead of one.  A row's bits do not depend on which rows share its
    tile (the same fold as the dense kernel, row by row).

    ``USE_TMA``: ``K_DESC``/``V_DESC`` are 4-d tensor descriptors over the caches and
    the blocks every row sees whole load through the copy engine, which takes the
    per-thread copy instructions out of each step of the serial fold (a decode step with
    few programs is bound by that fold, not by memory); the partial blocks at the edges
    load through pointers.  Launch-only: the same values reach the same arithmetic.

    Sequence ``b`` holds ``CACHE_SEQLENS[b] + n_new`` keys (the cached ones and the
    ``n_new`` just appended); with ``HAS_LEFTPAD`` (contiguous caches, no copy engine) the
    first ``LEFTPAD[b]`` cache rows are padding: the sequence's keys are cache rows
    ``LEFTPAD[b] ..``, key position 0 at the first of them, so blocks and splits start
    there (the bits of the unpadded sequence).  ``SMALLER_V``: v's head dim ``head_dim_v`` is
    below q/k's; v's columns past it load as zeros.  ``USE_PDL``: the combine kernel is launched as this
    kernel's programmatic dependent and may start (and wait) as soon as every program
    here has begun.  ``CHECK``: the row's values were not checked on the host
    (kernels/cache_checks.py; ``max_before``, ``num_rows`` = the cache's rows or pages,
    ``max_pages``, ``BLOCK_B``, ``BLOCK_P``): a failing row reads no key and writes nothing.
    """
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    split = tl.program_id(0) // num_m_tiles
    pid_m = tl.program_id(0) % num_m_tiles
    pid_bh = tl.program_id(1)
    num_heads_kv = num_heads_q // group_size
    b = pid_bh // num_heads_kv
    h_kv = pid_bh % num_heads_kv
    seqlen_k = tl.load(CACHE_SEQLENS + b) + n_new
    lp = 0
    if HAS_LEFTPAD:
        lp = tl.load(LEFTPAD + b)
        seqlen_k = seqlen_k - lp
    b_cache = b
    if HAS_BATCH_IDX:
        b_cache = tl.load(BATCH_IDX + b)
    if CHECK:
        valid = cache_row_ok(CACHE_SEQLENS, b, n_new, max_before, BATCH_IDX, num_rows, batch, LEFTPAD,
                             BLOCK_TABLE, stride_bt_b, page_size, max_pages,
                             HAS_BATCH_IDX, HAS_LEFTPAD, PAGED, BLOCK_B, BLOCK_P)
        seqlen_k = tl.where(valid, seqlen_k, 0)
        b_cache = tl.where(valid, b_cache, 0)
        lp = tl.where(valid, lp, 0)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // group_size
    h = h_kv * group_size + rows % group_size
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = t < seqlen_q
    d_ok = offs_d < head_dim
    dv_ok = d_ok
    if SMALLER_V:
        dv_ok = offs_d < head_dim_v     # v's columns (head_dim_v < head_dim); the rest load as 0
    pos_q = t + (seqlen_k - seqlen_q)
    q_ok = row_ok[:, None] if EVEN_D else row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64)[:, None] * stride_qh
                + t.to(tl.int64)[:, None] * stride_qm + offs_d[None, :],
                mask=q_ok, other=0.0).to(COMPUTE_DTYPE)
    alibi_slope_log2 = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_alibi_b + h, mask=row_ok, other=0.0).to(tl.float32)
        alibi_slope_log2 = (slope * LOG2E)[:, None]

    # The tile's visible keys (as in the dense kernel), cut to this split's blocks.
    p_lo = (pid_m * BLOCK_M) // group_size + (seqlen_k - seqlen_q)
    p_hi = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, seqlen_q * group_size) - 1) // group_size \
        + (seqlen_k - seqlen_q)
    key_lo, key_hi, full_lo, full_hi = tile_key_range(p_lo, p_hi, seqlen_k, window_left, window_right,
                                                      BLOCK_N, HAS_LEFT, HAS_RIGHT)
    lo = tl.maximum(key_lo // BLOCK_N, split * SPLIT_BLOCKS)
    hi = tl.minimum(tl.cdiv(key_hi, BLOCK_N), split * SPLIT_BLOCKS + SPLIT_BLOCKS)
    hi = tl.where(pid_m * BLOCK_M >= seqlen_q * group_size, lo, hi)

    # Blocks every row of the tile sees whole fold without mask work (the dense
    # kernel's rule; masked and unmasked folds round a visible element alike).
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), tl.maximum(hi, mid_lo))

    k_base = K + h_kv.to(tl.int64) * stride_kh
    v_base = V + h_kv.to(tl.int64) * stride_vh
    if HAS_LEFTPAD:
        k_base += lp.to(tl.int64) * stride_kn
        v_base += lp.to(tl.int64) * stride_vn
    cache = (k_base, v_base, b, b_cache, seqlen_k, BLOCK_TABLE, stride_bt_b, page_size,
             stride_kp, stride_kn, stride_vp, stride_vn, K_DESC, V_DESC, h_kv)
    where = (offs_n, offs_d, d_ok, dv_ok, pos_q)
    scores = (qk_scale, softcap_scaled, alibi_slope_log2, window_left, window_right)
    m_s, l_s, acc_s = empty_state(BLOCK_M, HEAD_DIM)
    for j in range(lo, mid_lo):      # masked: left window edge
        m_s, l_s, acc_s = _fold_cache_block(j, m_s, l_s, acc_s, q, cache, where, scores, 0, True, BLOCK_N,
                                            COMPUTE_DTYPE, ROWWISE, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT,
                                            HAS_RIGHT, PAGED, EVEN_D)
    # A paged copy-engine load needs its page first: read the block table one block ahead.
    page = 0
    if USE_TMA and PAGED:
        page = _block_page(BLOCK_TABLE, b, stride_bt_b, mid_lo, page_size, mid_lo < mid_hi, BLOCK_N)
    for j in range(mid_lo, mid_hi):  # seen whole by every row
        page_next = page
        if USE_TMA and PAGED:
            page_next = _block_page(BLOCK_TABLE, b, stride_bt_b, j + 1, page_size, j + 1 < mid_hi, BLOCK_N)
        m_s, l_s, acc_s = _fold_cache_block(j, m_s, l_s, acc_s, q, cache, where, scores, page, False, BLOCK_N,
                                            COMPUTE_DTYPE, ROWWISE, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT,
                                            HAS_RIGHT, PAGED, EVEN_D, USE_TMA)
        page = page_next
    for j in range(tl.maximum(mid_hi, lo), hi):   # masked: causal / right edge, last keys
        m_s, l_s, acc_s = _fold_cache_block(j, m_s, l_s, acc_s, q, cache, where, scores, 0, True, BLOCK_N,
                                            COMPUTE_DTYPE, ROWWISE, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT,
                                            HAS_RIGHT, PAGED, EVEN_D)

    # Splits past this sequence's keys are never read by the combine: nothing to write.
    live = row_ok & (split * SPLIT_BLOCKS * BLOCK_N < seqlen_k)
    row = ((split * batch + b) * num_heads_q + h).to(tl.int64) * seqlen_q + t
    tl.store(WS_ACC + row[:, None] * HEAD_DIM + offs_d[None, :], acc_s, mask=live[:, None])
    tl.store(WS_ML + row * 2, m_s, mask=live)
    tl.store(WS_ML + row * 2 + 1, l_s, mask=live)


@triton.jit
def _load_split_state(WS_ACC, WS_ML, split, num_splits, b, h, batch, num_heads_q, seqlen_q,
                      offs_m, offs_d, row_ok, HEAD_DIM: tl.constexpr):
    """Split ``split``'s state (m [M], l [M], acc [M, D]) of rows ``offs_m`` of head ``h``;
    the empty state for a split at or past ``num_splits`` (nothing is read)."""
    ok = row_ok & (split < num_splits)
    row = ((split * batch + b) * num_heads_q + h).to(tl.int64) * seqlen_q + offs_m
    acc = tl.load(WS_ACC + row[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    m = tl.load(WS_ML + row * 2, mask=ok, other=float("-inf"))
    l = tl.load(WS_ML + row * 2 + 1, mask=ok, other=0.0)
    return m, l, acc


@triton.jit
def _load_four(WS_ACC, WS_ML, s0, num_splits, b, h, batch, num_heads_q, seqlen_q,
               offs_m, offs_d, row_ok, HEAD_DIM: tl.constexpr):
    """The states of splits s0 .. s0+3 (independent loads, all in flight at once)."""
    return (_load_split_state(WS_ACC, WS_ML, s0, num_splits, b, h, batch, num_heads_q, seqlen_q,
                              offs_m, offs_d, row_ok, HEAD_DIM),
            _load_split_state(WS_ACC, WS_ML, s0 + 1, num_splits, b, h, batch, num_heads_q, seqlen_q,
                              offs_m, offs_d, row_ok, HEAD_DIM),
            _load_split_state(WS_ACC, WS_ML, s0 + 2, num_splits, b, h, batch, num_heads_q, seqlen_q,
                              offs_m, offs_d, row_ok, HEAD_DIM),
            _load_split_state(WS_ACC, WS_ML, s0 + 3, num_splits, b, h, batch, num_heads_q, seqlen_q,
                              offs_m, offs_d, row_ok, HEAD_DIM))


@triton.jit
def _merge_live(m_t, l_t, acc_t, st, live):
    """:func:`merge_states` of split state ``st`` = (m, l, acc) into the total if ``live``
    (a scalar), else the total unchanged (bit for bit, not through an empty merge)."""
    m, l, acc = merge_states(m_t, l_t, acc_t, st[0], st[1], st[2])
    return tl.where(live, m, m_t), tl.where(live, l, l_t), tl.where(live, acc, acc_t)


@triton.jit
def _merge_four(m_t, l_t, acc_t, four, s0, num_splits):
    """Merge the states of splits s0 .. s0+3 (from :func:`_load_four`) in ascending order,
    those below ``num_splits`` only."""
    m_t, l_t, acc_t = _merge_live(m_t, l_t, acc_t, four[0], s0 < num_splits)
    m_t, l_t, acc_t = _merge_live(m_t, l_t, acc_t, four[1], s0 + 1 < num_splits)
    m_t, l_t, acc_t = _merge_live(m_t, l_t, acc_t, four[2], s0 + 2 < num_splits)
    m_t, l_t, acc_t = _merge_live(m_t, l_t, acc_t, four[3], s0 + 3 < num_splits)
    return m_t, l_t, acc_t


@triton.jit
def attention_split_combine_kernel(
    WS_ACC, WS_ML, O, LSE, CACHE_SEQLENS,
    stride_ob, stride_om, stride_oh,
    num_heads_q, batch, seqlen_q, head_dim, split_size, n_new,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, USE_PDL: tl.constexpr,
    LEFTPAD=None, HAS_LEFTPAD: tl.constexpr = False,
    max_before=0, BATCH_IDX=None, num_rows=0, BLOCK_TABLE=None, stride_bt=0, page_size=1, max_pages=0,
    CHECK: tl.constexpr = False, HAS_BATCH_IDX: tl.constexpr = False, PAGED: tl.constexpr = False,
    BLOCK_B: tl.constexpr = 1, BLOCK_P: tl.constexpr = 1,
):
    """Grid: (cdiv(Lq, BLOCK_M), B * Hq).  Merge the splits that hold keys of this
    sequence (``cdiv(CACHE_SEQLENS[b] + n_new - LEFTPAD[b], split_size)``) in ascending order and
    finalise.  ``USE_PDL``: launched as the partial kernel's programmatic dependent, it
    waits for that kernel's writes (``griddepcontrol.wait``) before reading the
    workspace; its launch and set-up overlap the partial kernel's last programs.

    The merges are a serial chain, the loads need not be: each step reads sixteen
    splits at once and then merges them in order, so a long cache costs one load
    latency per sixteen splits instead of one per split (loading the next sixteen during
    the merges was measured to change nothing: the time is the merge chain).  The merge
    order and arithmetic are the dense kernel's; rows are independent, so BLOCK_M changes
    no bits.

    ``CHECK``: the row's values were not checked on the host (kernels/cache_checks.py): a
    failing row merges nothing and its outputs and lse are NaN.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads_q
    h = pid_bh % num_heads_q
    seqlen_k = tl.load(CACHE_SEQLENS + b) + n_new
    if HAS_LEFTPAD:
        seqlen_k = seqlen_k - tl.load(LEFTPAD + b)
    num_splits = tl.cdiv(seqlen_k, split_size)
    valid = True
    if CHECK:
        valid = cache_row_ok(CACHE_SEQLENS, b, n_new, max_before, BATCH_IDX, num_rows, batch, LEFTPAD,
                             BLOCK_TABLE, stride_bt, page_size, max_pages,
                             HAS_BATCH_IDX, HAS_LEFTPAD, PAGED, BLOCK_B, BLOCK_P)
        num_splits = tl.where(valid, num_splits, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    m_t, l_t, acc_t = empty_state(BLOCK_M, HEAD_DIM)
    for s0 in range(0, num_splits, 16):
        f0 = _load_four(WS_ACC, WS_ML, s0, num_splits, b, h, batch, num_heads_q, seqlen_q,
                        offs_m, offs_d, row_ok, HEAD_DIM)
        f1 = _load_four(WS_ACC, WS_ML, s0 + 4, num_splits, b, h, batch, num_heads_q, seqlen_q,
                        offs_m, offs_d, row_ok, HEAD_DIM)
        f2 = _load_four(WS_ACC, WS_ML, s0 + 8, num_splits, b, h, batch, num_heads_q, seqlen_q,
                        offs_m, offs_d, row_ok, HEAD_DIM)
        f3 = _load_four(WS_ACC, WS_ML, s0 + 12, num_splits, b, h, batch, num_heads_q, seqlen_q,
                        offs_m, offs_d, row_ok, HEAD_DIM)
        m_t, l_t, acc_t = _merge_four(m_t, l_t, acc_t, f0, s0, num_splits)
        m_t, l_t, acc_t = _merge_four(m_t, l_t, acc_t, f1, s0 + 4, num_splits)
        m_t, l_t, acc_t = _merge_four(m_t, l_t, acc_t, f2, s0 + 8, num_splits)
        m_t, l_t, acc_t = _merge_four(m_t, l_t, acc_t, f3, s0 + 12, num_splits)
    out, lse = finalize(m_t, l_t, acc_t)
    if CHECK:
        out = tl.where(valid, out, float("nan"))
        lse = tl.where(valid, lse, float("nan"))
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
             + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < head_dim)[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=row_ok)
