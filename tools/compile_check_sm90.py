"""Compile every GPU-only kernel variant for Hopper (sm_90) on a machine without a GPU.

The CPU test suite runs kernels through Triton's interpreter, which never
compiles them; this catches code that only the GPU path sees (TMA descriptors,
paged/varlen pointer arithmetic, constexpr branches) failing to compile.
Needs triton only, and must run without TRITON_INTERPRET:

    python tools/compile_check_sm90.py [--all]
"""
import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src", "bitstable"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.attention_bwd import (attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,  # noqa: E402
                                   attention_bwd_preprocess_kernel)
from kernels.attention_decode import attention_split_combine_kernel, attention_split_partial_kernel  # noqa: E402
from kernels.attention_decode_wgmma import HAVE_GLUON  # noqa: E402
from kernels.attention_fwd import attention_fwd_kernel  # noqa: E402
from kernels.matmul import matmul_kernel  # noqa: E402
from kernels.rowwise import layer_norm_kernel, row_sum_kernel, softmax_kernel  # noqa: E402


def build(fn, const, p16=(), p32=(), pi32=(), floats=(), desc=None, **opts):
    sig, cst = {}, {}
    for name in fn.arg_names:
        if name in const:
            sig[name], cst[name] = "constexpr", const[name]
        elif desc and name in desc:
            sig[name] = desc[name]
        elif name in p16:
            sig[name] = "*bf16"
        elif name in p32:
            sig[name] = "*fp32"
        elif name in pi32:
            sig[name] = "*i32"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return triton.compile(ASTSource(fn, sig, cst), target=GPUTarget("cuda", 90, 32), options=opts)


def build_gluon_decode() -> int:
    """The Gluon one-token decode kernel (kernels/attention_decode_wgmma.py), head dims 64
    and 128, with and without a cache batch index, and its timeline probe; returns the number
    of variants."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from kernels.attention_decode_wgmma import attention_decode_wgmma_kernel as fn

    class _Base:   # what a descriptor's signature needs of its tensor (no GPU here)
        dtype = "torch.bfloat16"

        def data_ptr(self):
            return 0

    n = 0
    for d, batch_idx, timeline in ((128, False, False), (64, True, False), (128, False, True)):
        layout = gl.NVMMASharedLayout.get_default_for([64, d], gl.bfloat16)
        desc = mangle_type(TensorDescriptor(_Base(), [4096, 8 * d], [8 * d, 1], [64, d], layout))
        const = dict(HEAD_DIM=d, BLOCK_M=64, BLOCK_N=64, SPLIT_BLOCKS=16, HAS_BATCH_IDX=batch_idx,
                     STAGES=3 + batch_idx, USE_PDL=not batch_idx, TIMELINE=timeline)
        sig = {}
        for name in fn.arg_names:
            sig[name] = ("constexpr" if name in const else desc if name in ("K_DESC", "V_DESC")
                         else "*bf16" if name in ("Q", "K", "V") else "*fp32" if name.startswith("WS_")
                         else "*i32" if name in ("CACHE_SEQLENS", "BATCH_IDX") else "*i64" if name == "TIMES"
                         else "fp32" if name == "qk_scale"
                         else "i32")
        triton.compile(GluonASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true", help="every feature combination (slower)")
    full = ap.parse_args().all
    feats = list(itertools.product([False, True], repeat=3)) if full else [(False, False, False), (True, True, True)]
    n = 0
    for sc, al, left in feats:
        f = dict(HAS_SOFTCAP=sc, HAS_ALIBI=al, HAS_LEFT=left, HAS_RIGHT=True)
        base = dict(HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, COMPUTE_DTYPE=tl.bfloat16, ROWWISE=False, **f)
        fwd = dict(base, SPLIT_BLOCKS=32, EVEN_D=True, WRITE_LSE=True, REVERSE_M=True)
        for loop, tma, varlen in [(1, True, False), (0, False, False), (1, False, True)]:
            desc = {k: "tensordesc<bf16[1,64,1,128]>" for k in ("K", "V")} if tma else None
            build(attention_fwd_kernel, dict(fwd, LOOP=loop, USE_TMA=tma, VARLEN=varlen), ("Q", "K", "V", "O"),
                  ("LSE", "ALIBI"), ("CU_Q", "CU_K"), ("qk_scale", "softcap_scaled"), desc, num_warps=4, num_stages=3)
            n += 1
        for fn in (attention_bwd_dkdv_kernel, attention_bwd_dq_kernel):
            for varlen in (False, True):
                build(fn, dict(base, VARLEN=varlen, SKIP_FULL_MASKS=True), ("Q", "K", "V", "DO", "DK", "DV", "DQ"),
                      ("LSE", "DELTA", "ALIBI"),
                      ("CU_Q", "CU_K"), ("qk_scale", "softcap_scaled", "grad_scale"), num_warps=4, num_stages=2)
                n += 1
        for paged, even_d, tma in ((False, True, True), (True, True, True), (False, False, False),
                                   (True, True, False)):
            desc = {k: "tensordesc<bf16[1,64,1,128]>" for k in ("K_DESC", "V_DESC")} if tma else None
            build(attention_split_partial_kernel, dict(base, SPLIT_BLOCKS=32, PAGED=paged, HAS_BATCH_IDX=not paged,
                                                       EVEN_D=even_d, USE_TMA=tma, USE_PDL=tma),
                  ("Q", "K", "V", "K_DESC", "V_DESC"), ("WS_ACC", "WS_ML", "ALIBI"),
                  ("CACHE_SEQLENS", "BATCH_IDX", "BLOCK_TABLE"), ("qk_scale", "softcap_scaled"), desc,
                  num_warps=4, num_stages=3)
            n += 1
    for block_m, warps, pdl in ((1, 4, True), (16, 4, False)):
        build(attention_split_combine_kernel, dict(HEAD_DIM=128, BLOCK_M=block_m, USE_PDL=pdl), ("O",),
              ("WS_ACC", "WS_ML", "LSE"), ("CACHE_SEQLENS",), num_warps=warps, launch_pdl=pdl)
    build(attention_bwd_preprocess_kernel, dict(HEAD_DIM=128, BLOCK_M=64, HAS_DLSE=True), ("O", "DO"), ("DLSE", "DELTA"),
          num_warps=4)
    # float32 backward: per-head dk/dv sums (PER_HEAD_SUMS), IEEE fp32 dots
    build(attention_bwd_dkdv_kernel, dict(HEAD_DIM=128, BLOCK_M=32, BLOCK_N=16, COMPUTE_DTYPE=tl.float32,
                                          ROWWISE=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_LEFT=False,
                                          HAS_RIGHT=True, VARLEN=False, PER_HEAD_SUMS=True),
          ("Q", "K", "V", "DO", "DK", "DV", "DQ"), ("LSE", "DELTA", "ALIBI"), ("CU_Q", "CU_K"),
          ("qk_scale", "softcap_scaled", "grad_scale"), num_warps=4, num_stages=1)
    n += 1
    # the sm90 matmul classes of configs.py (decode, middle, large)
    for bm, bn, bk, w, s, g in ((64, 32, 64, 4, 6, 8), (64, 128, 64, 4, 4, 8), (128, 256, 64, 8, 3, 8)):
        build(matmul_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, COMPUTE_DTYPE=tl.bfloat16,
                                  ROWWISE=False), ("A", "B", "C"), num_warps=w, num_stages=s)
    build(matmul_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, COMPUTE_DTYPE=tl.float32,
                              ROWWISE=False, CHUNK_BLOCKS=4), ("A", "B", "C"), num_warps=4, num_stages=2)
    n += 3
    build(softmax_kernel, dict(LOG=True, BLOCK=1024), ("X", "Y"), num_warps=4)
    build(row_sum_kernel, dict(BLOCK=1024), ("X", "Y"), floats=("scale",), num_warps=4)
    build(layer_norm_kernel, dict(HAS_W=True, HAS_B=True, RMS=False, BLOCK=1024), ("X", "W", "Bias", "Y"),
          ("MEAN", "RSTD"), floats=("eps",), num_warps=4)
    n += 6
    if HAVE_GLUON:
        n += build_gluon_decode()
    print(f"compiled {n} kernel variants for sm_90 with triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
