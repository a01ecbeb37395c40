"""A batch-invariant tiled matmul: every output element sums over K in BLOCK_K
chunks in ascending order, with tile shapes fixed per (arch, dtype) (configs.py).

Nothing depends on M: a row of ``A @ B`` has the same bits whether it is computed
alone or inside any batch of rows.  No split-K.
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
                  COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr):
    """Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), batch).  C[b] = A[b] @ B[b], fp32 accumulate."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = A + pid_b * stride_ab + offs_m[:, None].to(tl.int64) * stride_am
    b_base = B + pid_b * stride_bb + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_base + kk[None, :] * stride_ak, mask=(offs_m < M)[:, None] & (kk < K)[None, :],
                    other=0.0).to(COMPUTE_DTYPE)
        b = tl.load(b_base + kk[:, None] * stride_bk, mask=(kk < K)[:, None] & (offs_n < N)[None, :],
                    other=0.0).to(COMPUTE_DTYPE)
        acc = tile_dot(a, b, acc, ROWWISE)
    tl.store(C + pid_b * stride_cb + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(C.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])
