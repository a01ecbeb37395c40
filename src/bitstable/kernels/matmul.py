"""A batch-invariant tiled matmul: every output element sums over K in ascending
order into one float32 accumulator (no split-K; float32 inputs sum fixed chunks of
blocks from zero and add the chunks in order).

Tile shapes (BLOCK_M, BLOCK_N, warps, stages, GROUP_M) may differ between shape
classes (configs.py): they change which program computes an element, not the
order of its sum over K.  With 16-bit inputs on Hopper the tensor cores add K in
steps of 16 whatever BLOCK_K is, so BLOCK_K may differ there too (measured: 64, 128
and 256 gave identical bits); float32 and the interpreter sum BLOCK_K-long pieces,
so there it is fixed.  That a row's bits do not depend on them is proven on the
device by tests/test_batch_invariant.py (rows of every M class against M=1) and
by benchmarks/explore_matmul_configs.py (every candidate config, same bits).
"""

import triton
import triton.language as tl

from .attention_core import tile_dot


@triton.jit
def matmul_kernel(A, B, C, M, N, K,
                  stride_ab, stride_am, stride_ak,
                  stride_bb, stride_bk, stride_bn,
                  stride_cb, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr,
                  CHUNK_BLOCKS: tl.constexpr = 0, MASK_ROWS: tl.constexpr = False,
                  MASK_M: tl.constexpr = False, MASK_N: tl.constexpr = False):
    """Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), batch).  C[b] = A[b] @ B[b], fp32 accumulate.

    Tiles are visited in groups of GROUP_M row-blocks (L2 reuse of B); the
    grouping only moves work between programs.  ``CHUNK_BLOCKS`` > 0 (float32):
    blocked summation over K, a shorter fp32 rounding chain in the same fixed order.
    """
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past M/N are never stored and no other row's sum sees them.  Along a
    # dimension that is not an operand's unit-stride one they are clamped onto row/column
    # 0 (free for mostly-full tiles); along the unit-stride one (MASK_M: A column-major;
    # MASK_N: B row-major) they are masked (zero-filled, not read), which keeps the index
    # contiguous so those loads stay 16-byte vectors: a clamp there (``where(ok, offs,
    # 0)``) made row-major B and column-major A load element by element (0.11x cuBLAS on
    # an H200), and a wrap (``offs % M``) with contiguity hints misaligned the vectors
    # when M was not a multiple of the vector width.  MASK_ROWS masks both (clamping made
    # every spare row of a 16-row tile load the same address, 2x slower at M=1 on an H100).
    m_ok = offs_m < M
    n_ok = offs_n < N
    if MASK_ROWS or MASK_M:
        rows = offs_m.to(tl.int64)
        a_mask = m_ok[:, None]
    else:
        rows = tl.where(m_ok, offs_m, 0).to(tl.int64)
        a_mask = tl.full([BLOCK_M, 1], 1, tl.int1)   # constant true: folded away
    if MASK_ROWS or MASK_N:
        cols = offs_n.to(tl.int64)
        b_mask = n_ok[None, :]
    else:
        cols = tl.where(n_ok, offs_n, 0).to(tl.int64)
        b_mask = tl.full([1, BLOCK_N], 1, tl.int1)
    a_ptr = A + pid_b * stride_ab + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptr = B + pid_b * stride_bb + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if CHUNK_BLOCKS == 0:    # one running sum over K (tensor-core inputs)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr, mask=a_mask & (k0 + offs_k < K)[None, :], other=0.0)
            b = tl.load(b_ptr, mask=(k0 + offs_k < K)[:, None] & b_mask, other=0.0)
            acc = tile_dot(a.to(COMPUTE_DTYPE), b.to(COMPUTE_DTYPE), acc, ROWWISE)
            a_ptr += BLOCK_K * stride_ak
            b_ptr += BLOCK_K * stride_bk
    else:   # float32: each chunk of CHUNK_BLOCKS blocks summed from zero, chunks added in order
        for c0 in range(0, K, CHUNK_BLOCKS * BLOCK_K):
            part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(c0, tl.minimum(c0 + CHUNK_BLOCKS * BLOCK_K, K), BLOCK_K):
                a = tl.load(a_ptr, mask=a_mask & (k0 + offs_k < K)[None, :], other=0.0)
                b = tl.load(b_ptr, mask=(k0 + offs_k < K)[:, None] & b_mask, other=0.0)
                part = tile_dot(a.to(COMPUTE_DTYPE), b.to(COMPUTE_DTYPE), part, ROWWISE)
                a_ptr += BLOCK_K * stride_ak
                b_ptr += BLOCK_K * stride_bk
            acc += part
    tl.store(C + pid_b * stride_cb + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
