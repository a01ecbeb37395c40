"""The frozen table of numeric configs for bitstable's kernels.

Every number that can change which floating-point operations a kernel performs
lives here, keyed by ``(arch, dtype, padded head_dim)``.  Nothing in this table
is ever chosen from the batch size, sequence length, or a timing: that is what
makes an output row independent of everything except its own inputs.

* ``block_n`` is the key block: the unit of the online-softmax inner loop.
  Keys are cut into blocks of ``block_n`` tokens starting at key position 0.
* ``block_m`` is the query tile.  On Hopper a row's bits were measured to be the
  same for 64- and 128-row tiles (both take the wgmma path), so kernels that
  must agree (prefill, chunked prefill, decode) use tiles of >= 64 rows there.
* ``num_warps`` / ``num_stages`` are fixed per entry as well, even where they
  were measured not to change bits, so that no launch depends on a heuristic.

``split_size`` (keys per split, merged in ascending order) is a run-time
setting (:func:`bitstable.set_deterministic_mode`) that must be a multiple of
the entry's ``block_n``; its default is :data:`DEFAULT_SPLIT_SIZE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

#: Default number of keys per split.  A multiple of every ``block_n`` below.  Chosen on an
#: H200 (benchmarks/results/2026-11-22-h200-session5/): 1024 keeps the batch-1 decode
#: step at least as fast as SDPA-flash from 4k keys up (2048 left only 16 programs at 4k:
#: 0.68x) for ~1.5% of prefill time (forward -4%..+3% across the benchmark's shapes) and
#: ~3% at batch 8 (more programs than SMs).
DEFAULT_SPLIT_SIZE = 1024

#: Head dims the attention kernels accept: multiples of 8 up to this.
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch parameters for one (arch, dtype, padded head dim)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    #: Forward loop structure without / with a right edge (causal or window):
    #: "branch" (flat loops, merge as a branch) or "nested" (loop over splits).
    #: Launch-only: both compute the same bits (tested); chosen by measurement.
    loop: str = "branch"
    loop_causal: str = "branch"
    #: Load K/V tiles with the Hopper copy engine (TMA) where strides allow;
    #: launch-only: the tiles hold the same values either way (tested).
    tma: bool = False
    #: Pipeline depth of the split-KV decode kernel (0: ``num_stages``); launch-only.
    decode_num_stages: int = 0
    #: Rows per tile and warps of the split-KV decode kernel (0: ``block_m`` / ``num_warps``).
    #: A row's bits must equal the dense kernel's: checked on the device by
    #: tests/test_attention_kvcache.py (decode = full forward) for every entry.
    decode_block_m: int = 0
    decode_num_warps: int = 0
    #: ``(waves, stages)`` pairs, fewest waves first: a one-token decode step in scope whose
    #: partial grid fills at most ``waves`` waves (programs <= waves x SMs) runs the Gluon
    #: partial kernel (kernels/attention_decode_wgmma.py) with ``stages`` pipeline stages;
    #: larger grids (and empty tuples) keep the Triton kernel.  Launch-only (same bits,
    #: tested for head dims 64 and 128); timed at head dim 128 only (benchmarks/results/
    #: NOTES.md, sixth and seventh sessions).
    decode_wgmma_waves: Tuple[Tuple[int, int], ...] = ()

    @property
    def decode_stages(self) -> int:
        """num_stages of the split-KV decode kernel."""
        return self.decode_num_stages or self.num_stages


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the backward kernels for one (arch, dtype, padded head dim).

    ``block_m`` (query rows) and ``block_n`` (keys) are the dk/dv kernel's tiles;
    ``dq_*`` the dq kernel's (0: the same as dk/dv's).  dk/dv sum over query rows and
    dq over keys in ascending order whatever the tiles.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dq_block_m: int = 0
    dq_block_n: int = 0
    dq_num_warps: int = 0
    dq_num_stages: int = 0
    #: Loop over fully visible tiles without mask work (launch-only: same bits, tested).
    skip_full_masks: bool = False

    def dq_tiles(self):
        """(block_m, block_n, num_warps, num_stages) of the dq kernel."""
        return (self.dq_block_m or self.block_m, self.dq_block_n or self.block_n,
                self.dq_num_warps or self.num_warps, self.dq_num_stages or self.num_stages)


@dataclass(frozen=True)
class MatmulConfig:
    """Tiles of the batch-invariant matmul for one (arch, dtype, M class).

    The sum over K runs in ascending order into one float32 accumulator in every
    class.  Where that sum is cut into ``block_k``-long pieces (float32's blocked
    summation, the interpreter's row-wise product) ``block_k`` is part of the order
    and the same in every class; with 16-bit inputs on sm90 the tensor cores add K in
    steps of 16 whatever ``block_k`` is, so it may differ between classes there.  The
    other fields only decide which program computes an element.  Both are proven on
    the device (tests/test_batch_invariant.py sweeps m across every class boundary
    against M=1; benchmarks/explore_matmul_configs.py compares all candidates).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    chunk_blocks: int = 0   # > 0: float32 blocked summation over K (chunks of this many blocks)
    mask_rows: bool = False  # spare rows/columns of a tile masked, not clamped (launch-only)
    # Launch-only as well: operands through the copy engine (kernels/matmul_tma.py, where
    # the tensors allow it, else the pointer kernel with its class's tiles), a persistent grid
    # of at most one program per SM, and the persistent loop flattened with the K loop so
    # the pipeline does not drain between tiles.  Same K order, same bits.
    tma: bool = False
    persistent: bool = False
    flatten: bool = False


# Timed next to cuBLAS (benchmarks/explore_matmul_configs.py; H200 results in
# benchmarks/results/2026-11-22-h200-matmul-explore/, H100 CUDA-graph results with
# 128- and 256-long K blocks in benchmarks/results/2026-11-22-h100-session3/); every
# candidate gave the same bits.  Small M is memory-bound: many narrow column tiles, and
# long K blocks so that each pipeline step moves enough bytes.
_SM90_16BIT_MM = [(16, MatmulConfig(16, 32, 256, 4, 3, mask_rows=True)), (32, MatmulConfig(32, 32, 256, 4, 3)),
                  (128, MatmulConfig(64, 32, 128, 4, 4)), (384, MatmulConfig(64, 128, 64, 4, 5)),
                  (768, MatmulConfig(128, 64, 64, 4, 4)), (None, MatmulConfig(256, 128, 64, 8, 3))]

# The same classes when B is N-major (row-major [K, N]: ``x @ W``, ``p @ v``, the
# backward's dX = dY @ W and dW = dY^T @ X): tiles wider in N load B's rows in longer
# runs.  Launch-only: every candidate gave the same bits in every layout on the H200
# (benchmarks/results/2026-12-02-h200-session8/explore_matmul_layouts.md; M > 768:
# 128x256x64 w8 s3 at 0.94-1.00x cuBLAS where the K-major tiles reached 0.87-0.93x);
# tests/test_matmul_layouts.py proves the bits on the device.  Classes not named keep
# the K-major tiles.
_SM90_16BIT_MM_N_MAJOR_B = {None: MatmulConfig(128, 256, 64, 8, 3)}
_MATMUL_N_MAJOR_B = {("sm90", "bf16"): _SM90_16BIT_MM_N_MAJOR_B,
                     ("sm90", "fp16"): _SM90_16BIT_MM_N_MAJOR_B}

# (arch, dtype) -> [(largest M of the class, config), ...], smallest class first;
# the last class has no upper bound (None).  Small M (decode) is memory-bound and
# wants many narrow column tiles; large M wants big tiles for tensor-core reuse.
_MATMUL = {
    ("sm90", "bf16"): _SM90_16BIT_MM,
    ("sm90", "fp16"): _SM90_16BIT_MM,
    ("sm90", "fp32"): [(None, MatmulConfig(64, 64, 32, 4, 2, 8, 4))],
    ("generic", "bf16"): [(None, MatmulConfig(64, 64, 32, 4, 2))],
    ("generic", "fp16"): [(None, MatmulConfig(64, 64, 32, 4, 2))],
    ("generic", "fp32"): [(None, MatmulConfig(64, 64, 32, 4, 2, 8, 4))],
    # Under the interpreter two classes, so the CPU suite crosses a class boundary.
    ("interpreter", "bf16"): [(16, MatmulConfig(16, 16, 16, 4, 1, mask_rows=True)),
                              (None, MatmulConfig(32, 16, 16, 4, 1, 2))],
    ("interpreter", "fp16"): [(16, MatmulConfig(16, 16, 16, 4, 1, mask_rows=True)),
                              (None, MatmulConfig(32, 16, 16, 4, 1, 2))],
    ("interpreter", "fp32"): [(16, MatmulConfig(16, 16, 16, 4, 1, 8, 2)),
                              (None, MatmulConfig(32, 16, 16, 4, 1, 2, 2))],
}

# Two-d products whose operands the copy engine can take (kernels/matmul_tma.py: 16-byte
# aligned bases and strides, a unit stride in each matrix) run these tiles instead, by the
# same M classes; the others keep the pointer kernel's tiles above.  Launch-only: timed on
# an H200 next to cuBLAS with every candidate giving the bits of the pointer table at that
# M, row 0 = the M=1 product, in the three layouts (benchmarks/explore_matmul_configs.py
# tma, results/2026-12-02-h200-session12/): M 256 0.96-1.13x cuBLAS, 512 0.95-1.06x,
# >= 1024 0.98-1.06x, where the pointer tiles reached 0.72-0.94x.  Classes not named
# (M <= 128, memory-bound) keep the pointer kernel.
_SM90_16BIT_MM_TMA = {384: MatmulConfig(64, 128, 64, 4, 5, tma=True, persistent=True),
                      768: MatmulConfig(128, 128, 64, 8, 4, tma=True, persistent=True),
                      None: MatmulConfig(128, 256, 64, 8, 3, tma=True, persistent=True, flatten=True)}
# Under the interpreter the upper class, so the CPU suite compares the two kernels' bits
# (rows of M > 16 through descriptors against M <= 16 through pointers).
_INTERPRETER_16BIT_MM_TMA = {None: MatmulConfig(32, 16, 16, 4, 1, 2, tma=True, persistent=True)}
_MATMUL_TMA = {("sm90", "bf16"): _SM90_16BIT_MM_TMA, ("sm90", "fp16"): _SM90_16BIT_MM_TMA,
               ("interpreter", "bf16"): _INTERPRETER_16BIT_MM_TMA,
               ("interpreter", "fp16"): _INTERPRETER_16BIT_MM_TMA}

#: (rows per program, warps) of the split-KV combine kernel, per arch.  Launch-only:
#: each row merges its own splits elementwise, so the tile changes no bits (tested).
#: One row per program on GPUs: a decode step has one query row per head, and the
#: kernel keeps sixteen split states in flight per row.  The interpreter takes 16
#: rows per program (fewer programs to simulate).
DECODE_COMBINE_TILE = {"interpreter": (16, 4), "sm90": (1, 4), "generic": (1, 4)}

#: Chunk of the row-wise reductions (softmax, log-softmax, sum, mean).
ROW_BLOCK = {"interpreter": 64, "sm90": 1024, "generic": 1024}


def matmul_classes(arch: str, dtype: torch.dtype):
    """All ``(largest M, MatmulConfig)`` classes of ``(arch, dtype)``, smallest first."""
    return _MATMUL[(arch, _DTYPE_KEYS[dtype])]


def matmul_config(arch: str, dtype: torch.dtype, m: int, b_n_major: bool = False) -> MatmulConfig:
    """The matmul config for ``(arch, dtype)`` and a product with ``m`` rows; ``b_n_major``:
    B's unit stride runs along N (row-major B), which some classes tile differently
    (launch-only: the same sum over K in the same order)."""
    for bound, cfg in matmul_classes(arch, dtype):
        if bound is None or m <= bound:
            if b_n_major:
                return _MATMUL_N_MAJOR_B.get((arch, _DTYPE_KEYS[dtype]), {}).get(bound, cfg)
            return cfg
    raise AssertionError("the last matmul class must be unbounded")


def matmul_tma_config(arch: str, dtype: torch.dtype, m: int):
    """The copy-engine tiles for ``(arch, dtype)`` and a 2-d product with ``m`` rows (the
    class of :func:`matmul_config`), or None where that class keeps the pointer kernel."""
    table = _MATMUL_TMA.get((arch, _DTYPE_KEYS[dtype]), {})
    for bound, _ in matmul_classes(arch, dtype):
        if bound is None or m <= bound:
            return table.get(bound)
    raise AssertionError("the last matmul class must be unbounded")


def padded_head_dim(head_dim: int) -> int:
    """Smallest power of two >= ``head_dim`` (and >= 16): the kernels' D tile."""
    p = 16
    while p < head_dim:
        p *= 2
    return p


_SIXTEEN_BIT = ("bf16", "fp16")

# Hopper (sm_90).  Keys: padded head dim.  Register use and spills of each entry
# were read from ptxas for sm_90a (tools/inspect_kernel.py, triton 3.6); tiles and
# loop structures were timed on an H200 (benchmarks/explore_fwd_configs.py,
# benchmarks/results/NOTES.md).
_SM90_16BIT = {
    16: AttentionConfig(64, 64, num_warps=4, num_stages=3, loop="nested", loop_causal="nested", tma=True),
    32: AttentionConfig(64, 64, num_warps=4, num_stages=3, loop="nested", loop_causal="nested", tma=True),
    64: AttentionConfig(64, 64, num_warps=4, num_stages=3, loop="nested", loop_causal="nested", tma=True),
    128: AttentionConfig(64, 64, num_warps=4, num_stages=3, loop="nested", loop_causal="nested", tma=True,
                         decode_wgmma_waves=((1, 4), (4, 3))),
    256: AttentionConfig(64, 64, num_warps=8, num_stages=2, loop="nested", loop_causal="nested", tma=True),
}
# float32 is computed in IEEE fp32 (no tensor cores): small tiles, no spills.
_SM90_FP32 = {
    16: AttentionConfig(block_m=32, block_n=16, num_warps=8, num_stages=2),
    32: AttentionConfig(block_m=32, block_n=16, num_warps=8, num_stages=2),
    64: AttentionConfig(block_m=32, block_n=16, num_warps=8, num_stages=2),
    128: AttentionConfig(block_m=32, block_n=16, num_warps=8, num_stages=1),
    256: AttentionConfig(block_m=32, block_n=16, num_warps=8, num_stages=1),
}
# Any other CUDA architecture: conservative tiles that fit 100 KB of shared memory.
_GENERIC_16BIT = {
    16: AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    32: AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    64: AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    128: AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    256: AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=1),
}
# Triton's interpreter (CPU): small tiles so that tests at small sizes still
# cover several key blocks, several splits and several query tiles; both loop
# structures are exercised (branch without a right edge, nested with one).
_INTERPRETER = {d: AttentionConfig(16, 16, num_warps=4, num_stages=1, loop="branch", loop_causal="nested")
                for d in (16, 32, 64, 128, 256)}

_TABLE = {
    ("sm90", "bf16"): _SM90_16BIT,
    ("sm90", "fp16"): _SM90_16BIT,
    ("sm90", "fp32"): _SM90_FP32,
    ("generic", "bf16"): _GENERIC_16BIT,
    ("generic", "fp16"): _GENERIC_16BIT,
    ("generic", "fp32"): _SM90_FP32,
    ("interpreter", "bf16"): _INTERPRETER,
    ("interpreter", "fp16"): _INTERPRETER,
    ("interpreter", "fp32"): _INTERPRETER,
}

_BWD_SM90_16BIT = {16: BackwardConfig(64, 64, 4, 2, skip_full_masks=True),
                   32: BackwardConfig(64, 64, 4, 2, skip_full_masks=True),
                   64: BackwardConfig(64, 64, 4, 2, skip_full_masks=True),
                   128: BackwardConfig(64, 64, 4, 2, skip_full_masks=True),
                   256: BackwardConfig(32, 32, 4, 1, skip_full_masks=True)}
_BWD_FP32 = {d: BackwardConfig(32, 16, 4, 1) for d in (16, 32, 64, 128)}
_BWD_FP32[256] = BackwardConfig(16, 16, 4, 1)
_BWD_INTERPRETER = {d: BackwardConfig(16, 16, 4, 1) for d in (16, 32, 64, 128, 256)}
_BWD_TABLE = {
    ("sm90", "bf16"): _BWD_SM90_16BIT, ("sm90", "fp16"): _BWD_SM90_16BIT, ("sm90", "fp32"): _BWD_FP32,
    ("generic", "bf16"): _BWD_SM90_16BIT, ("generic", "fp16"): _BWD_SM90_16BIT,
    ("generic", "fp32"): _BWD_FP32,
    ("interpreter", "bf16"): _BWD_INTERPRETER, ("interpreter", "fp16"): _BWD_INTERPRETER,
    ("interpreter", "fp32"): _BWD_INTERPRETER,
}

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


_ARCH_CACHE: dict = {}


def arch_key(device: torch.device) -> str:
    """Name of the config family for ``device``: 'interpreter', 'sm90' or 'generic'.
    Looked up once per device (a capability query costs microseconds per call)."""
    key = (device.type, device.index)
    arch = _ARCH_CACHE.get(key)
    if arch is None:
        from ._backend import interpreting

        if interpreting():
            arch = "interpreter"
        else:
            major, minor = torch.cuda.get_device_capability(device)
            arch = "sm90" if (major, minor) == (9, 0) else "generic"
        if device.index is not None or interpreting():
            _ARCH_CACHE[key] = arch
    return arch


def attention_config(arch: str, dtype: torch.dtype, head_dim: int) -> AttentionConfig:
    """The fixed attention config for ``(arch, dtype, head_dim)``."""
    return _TABLE[(arch, _DTYPE_KEYS[dtype])][padded_head_dim(head_dim)]


def backward_config(arch: str, dtype: torch.dtype, head_dim: int) -> BackwardConfig:
    """The fixed backward config for ``(arch, dtype, head_dim)``."""
    return _BWD_TABLE[(arch, _DTYPE_KEYS[dtype])][padded_head_dim(head_dim)]


def all_block_n() -> set[int]:
    """Every ``block_n`` in the table (the default split size is a multiple of each)."""
    return {c.block_n for fam in _TABLE.values() for c in fam.values()}


assert all(DEFAULT_SPLIT_SIZE % bn == 0 for bn in all_block_n())
