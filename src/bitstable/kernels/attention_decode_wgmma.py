"""Hopper-only split-KV partial kernel for one-token decode, written in Gluon so that the
tensor-core products of neighbouring key blocks overlap the softmax in between.

The arithmetic is :func:`attention_core.fold_block`'s, operation for operation and in the
same register layouts (the dense kernel's 64-row wgmma tiles), so a split state is
bitwise the one :func:`attention_decode.attention_split_partial_kernel` writes (tested on
the device: decode = full forward, both kernels).  What differs is only the schedule of
one program's serial fold.  Triton issues a key block's score product, waits for it, runs
the softmax, then issues the value product, which the next block's score product queues
behind: with 4 real rows in a 64-row tile the two products take about as long as the
softmax, and the softmax overlaps neither.  Here, for key block j:

1. the score product of block j+1 is issued (asynchronous wgmma);
2. the softmax of block j runs while that product and block j-1's value product execute;
3. wait for both, then refill block j-1's shared-memory stage with block j-1+STAGES
   (copy engine, TMA);
4. the accumulator is rescaled and block j's value product issued (it runs during the
   next step's softmax).

Scope (the launcher falls back to the Triton kernel otherwise): sm_90, 16-bit K/V, one
query token per sequence, a GQA group of at most 64 heads, head_dim 64 or 128 (no padding),
no softcap/ALiBi/window, contiguous caches addressed as a 2-d ``[rows, Hkv * D]`` view
(``BATCH_IDX`` picks the cache row).  Whole key blocks come through the copy engine;
the one block a sequence ends inside is loaded through pointers with the rows past the
sequence read as zeros, exactly as the Triton kernel loads it.
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

if HAVE_GLUON:

    @gluon.jit
    def _softmax_step(s, m, l, scale, P_DTYPE: gl.constexpr, P_LAYOUT: gl.constexpr):
        """:func:`attention_core.block_update` up to the value product: new max, rescale
        factor, weights (rounded to ``P_DTYPE`` in the product's operand layout), row sums."""
        m_new = gl.maximum(m, gl.max(s, 1) * scale)
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m - m_ref)
        p = gl.exp2(s * scale - m_ref[:, None])
        l = l * alpha + gl.sum(p, 1)
        return m_new, l, alpha, gl.convert_layout(p.to(P_DTYPE), P_LAYOUT)

    @gluon.jit
    def _rescale(acc, alpha, ACC_LAYOUT: gl.constexpr):
        """acc * alpha[:, None] (alpha moved to the accumulator's row layout)."""
        a = gl.convert_layout(alpha, gl.SliceLayout(1, ACC_LAYOUT))
        return acc * a[:, None]

    @gluon.jit
    def attention_decode_wgmma_kernel(
        Q, K, V, K_DESC, V_DESC, WS_ACC, WS_ML, CACHE_SEQLENS, BATCH_IDX,
        stride_qb, stride_qh, stride_kp, stride_kn, stride_vp, stride_vn,
        cache_len, num_heads_q, group_size, batch, n_new, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        SPLIT_BLOCKS: gl.constexpr, HAS_BATCH_IDX: gl.constexpr, STAGES: gl.constexpr,
        USE_PDL: gl.constexpr,
    ):
        """Grid: (num_splits, B * Hkv); 4 warps.  One split of the rows ``g < group_size``
        (the GQA group of KV head ``h_kv``, one query token) into the workspace, as
        :func:`attention_decode.attention_split_partial_kernel` lays it out.

        ``K_DESC``/``V_DESC``: 2-d descriptors over the caches viewed as
        ``[B_cache * cache_len, Hkv * HEAD_DIM]`` with ``[BLOCK_N, HEAD_DIM]`` boxes.
        ``STAGES`` (>= 3) key blocks are in shared memory or on their way: block j+1 must
        have been requested before block j's softmax, and block j-1's stage is refilled
        only after it.  ``USE_PDL``: the combine kernel is launched as this kernel's
        programmatic dependent.
        """
        gl.static_assert(STAGES >= 3, "the schedule needs three or more stages")
        DTYPE: gl.constexpr = K.dtype.element_ty
        S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
        LOAD_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        KV_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], DTYPE)
        Q_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], DTYPE)
        TILE_BYTES: gl.constexpr = BLOCK_N * HEAD_DIM * DTYPE.primitive_bitwidth // 8

        if USE_PDL:   # the combine kernel may launch now (it waits for this grid's writes)
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
        split = gl.program_id(0)
        pid_bh = gl.program_id(1)
        num_heads_kv = num_heads_q // group_size
        b = pid_bh // num_heads_kv
        h_kv = pid_bh % num_heads_kv
        # The query rows (heads of the group): loads issued first, stored to shared memory
        # (the wgmma's A operand) once the first key blocks are on their way.
        rows_ld = gl.arange(0, BLOCK_M, gl.SliceLayout(1, LOAD_LAYOUT))
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

        # This split's blocks: whole ones [lo, full_hi) through the copy engine, then at
        # most one block that the sequence ends inside.
        hi = gl.minimum(gl.cdiv(seqlen_k, BLOCK_N), lo + SPLIT_BLOCKS)
        full_hi = gl.maximum(gl.minimum(seqlen_k // BLOCK_N, hi), lo)
        n_full = full_hi - lo

        q_smem = gl.allocate_shared_memory(DTYPE, [BLOCK_M, HEAD_DIM], Q_SMEM, q)
        fence_async_shared()
        cta_barrier()

        m = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT))
        l = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, S_LAYOUT))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, O_LAYOUT)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_LAYOUT)
        acc_tok = warpgroup_mma_init(acc)
        p_prev = gl.zeros([BLOCK_M, BLOCK_N], DTYPE, P_LAYOUT)   # the value product's A operand
        # Scores of the first block.
        mbarrier.wait(bars.index(0), 0, pred=n_full > 0)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(0, deps=[s_tok])
        for i in range(0, n_full):
            slot = i % STAGES
            nxt = (i + 1) % STAGES
            # 1. scores of block i+1 (a wasted product on the last block, never read)
            mbarrier.wait(bars.index(nxt), ((i + 1) // STAGES) & 1, pred=i + 1 < n_full)
            s_tok = warpgroup_mma(q_smem, k_bufs.index(nxt).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            # 2. softmax of block i, overlapping the products in flight
            m, l, alpha, p = _softmax_step(s_cur, m, l, qk_scale, DTYPE, P_LAYOUT)
            # 3. both products done (waiting for one of them only makes ptxas serialise every
            #    wgmma, C7514); block i-1's stage takes block i-1+STAGES.  The wait names block
            #    i-1's weights, the value product's register operand: without that their
            #    registers are free for reuse (block i's softmax temporaries) while the
            #    product still reads them (seen on the device: wrong accumulators at 3 stages)
            acc, s_nxt, p_prev = warpgroup_mma_wait(0, deps=[acc_tok, s_tok, p_prev])
            refill = (i >= 1) & (i - 1 + STAGES < n_full)
            prev = (i + STAGES - 1) % STAGES
            r = (row0 + (i - 1 + STAGES) * BLOCK_N).to(gl.int32)
            mbarrier.expect(bars.index(prev), 2 * TILE_BYTES, pred=refill)
            tma.async_copy_global_to_shared(K_DESC, [r, col], bars.index(prev), k_bufs.index(prev), pred=refill)
            tma.async_copy_global_to_shared(V_DESC, [r, col], bars.index(prev), v_bufs.index(prev), pred=refill)
            # 4. rescale, and block i's value product
            acc = _rescale(acc, alpha, O_LAYOUT)
            acc_tok = warpgroup_mma(p, v_bufs.index(slot), acc, is_async=True)
            s_cur = s_nxt
            p_prev = p
        acc, p_prev = warpgroup_mma_wait(0, deps=[acc_tok, p_prev])
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
            s_edge = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False)
            pos_k = full_hi * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, S_LAYOUT))
            s_edge = gl.where((pos_k < seqlen_k)[None, :], s_edge, float("-inf"))
            m, l, alpha, p = _softmax_step(s_edge, m, l, qk_scale, DTYPE, P_LAYOUT)
            acc = _rescale(acc, alpha, O_LAYOUT)
            acc = warpgroup_mma(p, v_bufs.index(0), acc)

        # The split state of the group's rows (splits past the sequence are never read).
        g_o = gl.arange(0, BLOCK_M, gl.SliceLayout(1, O_LAYOUT))
        d_o = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, O_LAYOUT))
        live_o = (g_o < group_size) & (lo * BLOCK_N < seqlen_k)
        row_o = ((split * batch + b) * num_heads_q + h_kv * group_size + g_o).to(gl.int64)
        gl.store(WS_ACC + row_o[:, None] * HEAD_DIM + d_o[None, :], acc, mask=live_o[:, None])
        g_s = gl.arange(0, BLOCK_M, gl.SliceLayout(1, S_LAYOUT))
        live_s = (g_s < group_size) & (lo * BLOCK_N < seqlen_k)
        row_s = ((split * batch + b) * num_heads_q + h_kv * group_size + g_s).to(gl.int64)
        gl.store(WS_ML + row_s * 2, m, mask=live_s)
        gl.store(WS_ML + row_s * 2 + 1, l, mask=live_s)
