"""The batch-invariant matmul with its operands brought in by the copy engine (TMA).

The same sum as :mod:`bitstable.kernels.matmul`: every output element adds K in
ascending order, ``BLOCK_K`` at a time, into one float32 accumulator (``tile_dot``), so
its bits are those of the pointer kernel with the same ``BLOCK_K`` (16-bit inputs; on
sm90 the tensor cores add K in steps of 16 whatever the tile).  What differs is only how
the tiles arrive: host-made tensor descriptors (zero-filled past M, N and K, as the
pointer kernel's masked loads) and, with ``num_programs < tiles``, a persistent grid in
which each program walks tiles ``pid, pid + num_programs, ...``.  Neither changes what
any element sums.

Layouts: A is [M, K] row-major (descriptor over A, boxes [BLOCK_M, BLOCK_K]) or
column-major (``A_T``: the descriptor is over the row-major [K, M] storage, boxes
[BLOCK_K, BLOCK_M], transposed after the load); B is [K, N] row-major or column-major
(``B_T``: descriptor over the [N, K] storage, e.g. a linear layer's weight).  C is
[M, N] row-major, written through its descriptor (stores past M and N are dropped).
"""

import triton
import triton.language as tl

from .attention_core import tile_dot


@triton.jit
def _row_major_tile(x, ROWS: tl.constexpr, COLS: tl.constexpr, ROWWISE: tl.constexpr):
    """``x`` [ROWS, COLS] itself; under the interpreter (``ROWWISE``) a row-major copy: numpy
    keeps a transposed load's memory order, and its sums over K then run in another order
    than the pointer kernel's (a different float32 rounding: not the same bits)."""
    if ROWWISE:
        x = tl.reshape(tl.reshape(x, [ROWS * COLS]), [ROWS, COLS])
    return x


@triton.jit
def matmul_tma_kernel(a_desc, b_desc, c_desc, M, N, K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr,
                      COMPUTE_DTYPE: tl.constexpr, ROWWISE: tl.constexpr, FLATTEN: tl.constexpr = False):
    """Grid: (num_programs,), ``num_programs <= cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)``.
    C = A @ B with a float32 accumulator; tiles visited in groups of GROUP_M row-blocks
    (L2 reuse of B), the grouping and the persistent walk only move work between
    programs."""
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * n_n
    for tile in tl.range(tl.program_id(0), n_m * n_n, tl.num_programs(0), flatten=FLATTEN):
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(n_m - first_m, GROUP_M)
        off_m = (first_m + (tile % per_group) % group_rows) * BLOCK_M
        off_n = ((tile % per_group) // group_rows) * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            if A_T:
                a = _row_major_tile(a_desc.load([off_k, off_m]).T, BLOCK_M, BLOCK_K, ROWWISE)
            else:
                a = a_desc.load([off_m, off_k])
            if B_T:
                b = _row_major_tile(b_desc.load([off_n, off_k]).T, BLOCK_K, BLOCK_N, ROWWISE)
            else:
                b = b_desc.load([off_k, off_n])
            acc = tile_dot(a.to(COMPUTE_DTYPE), b.to(COMPUTE_DTYPE), acc, ROWWISE)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))
