"""Hopper-only split-KV partial kernel for one-token decode with keys-major tiles, in Gluon.

A one-token decode step has few query rows per KV head (the GQA group, at most 8 here),
but the dense kernel's 64-row query tile makes every thread fold 32 scores per key block:
the softmax of 60 padding rows.  This kernel computes the same arithmetic transposed:

* scores ``S^T = K_j @ Q^T`` [64 keys, 8 query columns] (a wgmma with the key block as the
  64-row operand: 4 scores per thread instead of 32);
* the row max over keys (exact in any order), the rescale factor and the weights
  ``p = exp2(s * scale - m_ref)`` elementwise, as :func:`attention_core.block_update`;
* the row sums ``sum(p)`` in the dense kernel's order: the weights go through shared memory
  and are read back in a layout whose per-row split over threads and registers is the dense
  kernel's wgmma accumulator layout (16 values per thread in (8-key chunk, pair) order over
  the four lanes of a quad), so ``gl.sum`` combines them in the same tree;
* the accumulator transposed, ``acc^T = acc^T * alpha + V_j^T @ P^T`` [head_dim, 8] (a
  wgmma with the value block as the operand of ``head_dim`` rows).

Tensor-core dot products do not depend on which operand is which (measured in the fourth
session: keys-major tiles gave the dense kernel's bits), so the split state
``(m, l, acc)`` is bitwise :func:`attention_decode.attention_split_partial_kernel`'s (tested
on the device: decode = full forward, and this kernel against the Triton one).

Scope (the launcher falls back otherwise): sm_90, 16-bit K/V, one query token, a GQA group
of at most 8 heads, head_dim 64 or 128 (no padding), no softcap/ALiBi/window, contiguous
caches addressed as ``[rows, Hkv * D]``.  Whole key blocks come through the copy engine, the
block the sequence ends inside through pointers (rows past the sequence read as zeros).
Schedule of one program, per key block j: the score product of block j+1 is issued, block
j's softmax runs, both products in flight are waited for, block j-1's stage is refilled,
and block j's value product is issued.
"""

try:  # Gluon ships with triton >= 3.5; the package imports without it.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_init,
                                                                  warpgroup_mma_wait)
    HAVE_GLUON = True
    #: The CTA-wide barrier: ``thread_barrier`` in triton 3.6, ``barrier`` from 3.7 on.
    cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False

#: Query columns of the keys-major tile (the GQA group, padded): the wgmma's N.
QUERY_COLS = 8

if HAVE_GLUON:

    @gluon.jit
    def _keys_softmax(s, m, l, scale, pf_buf, p_buf, ROW_LAYOUT: gl.constexpr, S_LAYOUT: gl.constexpr):
        """:func:`attention_core.block_update` up to the value product on keys-major scores
        ``s`` [BLOCK_N keys, QN]: new max, rescale factor, the weights stored to ``p_buf``
        ([QN, BLOCK_N], the value product's operand, 16-bit) and their row sums added to
        ``l`` in the dense kernel's order (fp32 weights through ``pf_buf``)."""
        m_new = gl.maximum(m, gl.max(s, 0) * scale)
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m - m_ref)
        p = gl.exp2(s * scale - m_ref[None, :])
        pt = gl.permute(p, (1, 0))
        pf_buf.store(pt)
        p_buf.store(pt.to(p_buf.dtype))
        fence_async_shared()
        cta_barrier()
        row_sum = gl.sum(pf_buf.load(ROW_LAYOUT), 1)
        l = l * alpha + gl.convert_layout(row_sum, gl.SliceLayout(0, S_LAYOUT))
        return m_new, l, alpha

    @gluon.jit
    def attention_decode_keys_kernel(
        Q, K, V, K_DESC, V_DESC, WS_ACC, WS_ML, CACHE_SEQLENS, BATCH_IDX,
        stride_qb, stride_qh, stride_kp, stride_kn, stride_vp, stride_vn,
        cache_len, num_heads_q, group_size, batch, n_new, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_BLOCKS: gl.constexpr,
        HAS_BATCH_IDX: gl.constexpr, STAGES: gl.constexpr, USE_PDL: gl.constexpr,
    ):
        """Grid: (num_splits, B * Hkv); 4 warps.  One split of the rows ``g < group_size``
        (<= 8: the GQA group of KV head ``h_kv``, one query token) into the workspace, as
        :func:`attention_decode.attention_split_partial_kernel` lays it out.

        ``K_DESC``/``V_DESC``: 2-d descriptors over the caches viewed as
        ``[B_cache * cache_len, Hkv * HEAD_DIM]`` with ``[BLOCK_N, HEAD_DIM]`` boxes.
        ``STAGES`` (>= 3) key blocks are in shared memory or on their way.  ``USE_PDL``:
        the combine kernel is launched as this kernel's programmatic dependent.
        """
        gl.static_assert(STAGES >= 3, "the schedule needs three or more stages")
        QN: gl.constexpr = 8
        DTYPE: gl.constexpr = K.dtype.element_ty
        # Keys-major scores [BLOCK_N, QN] and the transposed accumulator [HEAD_DIM, QN].
        S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, QN, 16])
        O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, QN, 16])
        # A row's BLOCK_N weights as the dense kernel's accumulator holds them: lanes 0-3 of
        # a quad take pairs of keys 2c, 2c+1 of each 8-key chunk, chunks in registers.
        ROW_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [4, 1], [1, 0])
        LOAD_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        KV_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], DTYPE)
        Q_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([QN, HEAD_DIM], DTYPE)
        P_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([QN, BLOCK_N], DTYPE)
        PF_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        TILE_BYTES: gl.constexpr = BLOCK_N * HEAD_DIM * DTYPE.primitive_bitwidth // 8

        if USE_PDL:   # the combine kernel may launch now (it waits for this grid's writes)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
        split = gl.program_id(0)
        pid_bh = gl.program_id(1)
        num_heads_kv = num_heads_q // group_size
        b = pid_bh // num_heads_kv
        h_kv = pid_bh % num_heads_kv
        rows_ld = gl.arange(0, QN, gl.SliceLayout(1, LOAD_LAYOUT))
        cols_ld = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, LOAD_LAYOUT))
        q = gl.load(Q + b.to(gl.int64) * stride_qb
                    + (h_kv * group_size + rows_ld).to(gl.int64)[:, None] * stride_qh + cols_ld[None, :],
                    mask=(rows_ld < group_size)[:, None], other=0.0)
        seqlen_k = gl.load(CACHE_SEQLENS + b) + n_new
        b_cache = b
        if HAS_BATCH_IDX:
            b_cache = gl.load(BATCH_IDX + b)

        k_bufs = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
        v_bufs = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
        p_bufs = gl.allocate_shared_memory(DTYPE, [2, QN, BLOCK_N], P_SMEM)
        pf_bufs = gl.allocate_shared_memory(gl.float32, [2, QN, BLOCK_N], PF_SMEM)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        fence_async_shared()

        # The split's first STAGES blocks are requested before its length is known (the
        # addresses need only the split and the cache row): every block of the cache's
        # capacity is readable, and those past the sequence are waited for and dropped.
        lo = split * SPLIT_BLOCKS
        row0 = b_cache.to(gl.int64) * cache_len + lo * BLOCK_N
        col = h_kv * HEAD_DIM
        for s in gl.static_range(STAGES):
            ok = (lo + s + 1) * BLOCK_N <= cache_len
            mbarrier.expect(bars.index(s), 2 * TILE_BYTES, pred=ok)
            tma.async_copy_global_to_shared(K_DESC, [(row0 + s * BLOCK_N).to(gl.int32), col], bars.index(s),
                                            k_bufs.index(s), pred=ok)
            tma.async_copy_global_to_shared(V_DESC, [(row0 + s * BLOCK_N).to(gl.int32), col], bars.index(s),
                                            v_bufs.index(s), pred=ok)

        hi = gl.minimum(gl.cdiv(seqlen_k, BLOCK_N), lo + SPLIT_BLOCKS)
        full_hi = gl.maximum(gl.minimum(seqlen_k // BLOCK_N, hi), lo)
        n_full = full_hi - lo

        q_smem = gl.allocate_shared_memory(DTYPE, [QN, HEAD_DIM], Q_SMEM, q)
        fence_async_shared()
        cta_barrier()
        q_t = q_smem.permute((1, 0))    # [HEAD_DIM, QN]: the score product's second operand

        m = gl.full([QN], float("-inf"), gl.float32, gl.SliceLayout(0, S_LAYOUT))
        l = gl.zeros([QN], gl.float32, gl.SliceLayout(0, S_LAYOUT))
        acc = gl.zeros([HEAD_DIM, QN], gl.float32, O_LAYOUT)
        s_zero = gl.zeros([BLOCK_N, QN], gl.float32, S_LAYOUT)
        acc_tok = warpgroup_mma_init(acc)
        mbarrier.wait(bars.index(0), 0, pred=n_full > 0)
        s_tok = warpgroup_mma(k_bufs.index(0), q_t, s_zero, use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(0, deps=[s_tok])
        for i in range(0, n_full):
            slot = i % STAGES
            nxt = (i + 1) % STAGES
            buf = i % 2
            # 1. scores of block i+1 (a wasted product on the last block, never read)
            mbarrier.wait(bars.index(nxt), ((i + 1) // STAGES) & 1, pred=i + 1 < n_full)
            s_tok = warpgroup_mma(k_bufs.index(nxt), q_t, s_zero, use_acc=False, is_async=True)
            # 2. softmax of block i while that product and block i-1's value product run
            m, l, alpha = _keys_softmax(s_cur, m, l, qk_scale, pf_bufs.index(buf), p_bufs.index(buf), ROW_LAYOUT,
                                        S_LAYOUT)
            # 3. both products done; block i-1's stage takes block i-1+STAGES
            acc, s_nxt = warpgroup_mma_wait(0, deps=[acc_tok, s_tok])
            refill = (i >= 1) & (i - 1 + STAGES < n_full)
            prev = (i + STAGES - 1) % STAGES
            r = (row0 + (i - 1 + STAGES) * BLOCK_N).to(gl.int32)
            mbarrier.expect(bars.index(prev), 2 * TILE_BYTES, pred=refill)
            tma.async_copy_global_to_shared(K_DESC, [r, col], bars.index(prev), k_bufs.index(prev), pred=refill)
            tma.async_copy_global_to_shared(V_DESC, [r, col], bars.index(prev), v_bufs.index(prev), pred=refill)
            # 4. rescale, and block i's value product acc^T += V_i^T @ P_i^T
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(0, O_LAYOUT))[None, :]
            acc_tok = warpgroup_mma(v_bufs.index(slot).permute((1, 0)), p_bufs.index(buf).permute((1, 0)), acc,
                                    is_async=True)
            s_cur = s_nxt
        acc = warpgroup_mma_wait(0, deps=[acc_tok])
        for s in gl.static_range(STAGES):   # requested blocks past the sequence: drop them
            mbarrier.wait(bars.index(s), 0, pred=(s >= n_full) & ((lo + s + 1) * BLOCK_N <= cache_len))
            mbarrier.invalidate(bars.index(s))

        # The block the sequence ends inside: pointer loads, zeros past its last key.
        if full_hi < hi:
            pos_ld = full_hi * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, LOAD_LAYOUT))
            ok_ld = (pos_ld < seqlen_k)[:, None]
            k_rows = (b_cache.to(gl.int64) * stride_kp + pos_ld.to(gl.int64) * stride_kn + col)[:, None]
            v_rows = (b_cache.to(gl.int64) * stride_vp + pos_ld.to(gl.int64) * stride_vn + col)[:, None]
            k_edge = gl.load(K + k_rows + cols_ld[None, :], mask=ok_ld, other=0.0)
            v_edge = gl.load(V + v_rows + cols_ld[None, :], mask=ok_ld, other=0.0)
            k_bufs.index(0).store(k_edge)
            v_bufs.index(0).store(v_edge)
            fence_async_shared()
            cta_barrier()
            s_edge = warpgroup_mma(k_bufs.index(0), q_t, s_zero, use_acc=False)
            pos_k = full_hi * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, S_LAYOUT))
            s_edge = gl.where((pos_k < seqlen_k)[:, None], s_edge, float("-inf"))
            buf_e = n_full % 2
            m, l, alpha = _keys_softmax(s_edge, m, l, qk_scale, pf_bufs.index(buf_e), p_bufs.index(buf_e),
                                        ROW_LAYOUT, S_LAYOUT)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(0, O_LAYOUT))[None, :]
            acc = warpgroup_mma(v_bufs.index(0).permute((1, 0)), p_bufs.index(buf_e).permute((1, 0)), acc)

        # The split state of the group's rows (splits past the sequence are never read).
        d_o = gl.arange(0, HEAD_DIM, gl.SliceLayout(1, O_LAYOUT))
        g_o = gl.arange(0, QN, gl.SliceLayout(0, O_LAYOUT))
        live_o = (g_o < group_size) & (lo * BLOCK_N < seqlen_k)
        row_o = ((split * batch + b) * num_heads_q + h_kv * group_size + g_o).to(gl.int64)
        gl.store(WS_ACC + row_o[None, :] * HEAD_DIM + d_o[:, None], acc, mask=live_o[None, :])
        g_s = gl.arange(0, QN, gl.SliceLayout(0, S_LAYOUT))
        live_s = (g_s < group_size) & (lo * BLOCK_N < seqlen_k)
        row_s = ((split * batch + b) * num_heads_q + h_kv * group_size + g_s).to(gl.int64)
        gl.store(WS_ML + row_s * 2, m, mask=live_s)
        gl.store(WS_ML + row_s * 2 + 1, l, mask=live_s)
