"""Compile every GPU-only kernel variant for Hopper (sm_90) on a machine without a GPU.

The CPU test suite runs kernels through Triton's interpreter, which never
compiles them; this catches code that only the GPU path sees (TMA descriptors,
paged/varlen pointer arithmetic, constexpr branches) failing to compile.
Needs triton only, and must run without TRITON_INTERPRET:

    python tools/compile_check_sm90.py [--all] [--jobs N] [--shard I/N] [--to ptx]

The variants compile in a pool of one process per CPU (``--jobs``); ``--shard`` picks
every N-th of them (the test suite runs the shards as separate tests).  ``--to ptx`` stops
the Triton kernels after Triton's own pipeline (source -> TTIR -> TTGIR -> LLVM IR -> PTX)
and skips ptxas, a third of the time on a cold cache: every failure this check exists for
(a constexpr branch, a layout, a descriptor or pointer type the interpreter never sees)
happens in Triton's pipeline.  The Gluon kernels, whose inline PTX only ptxas reads, are
still assembled.  The default assembles everything (cubin).
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
from kernels.dropout import dropout_mask_kernel  # noqa: E402
from kernels.kv_append import kv_append_kernel, kv_append_rotary_kernel  # noqa: E402
from kernels.matmul import matmul_kernel  # noqa: E402
from kernels.matmul_tma import matmul_tma_kernel  # noqa: E402
from kernels.rotary import rotary_kernel  # noqa: E402
from kernels.rowwise import layer_norm_kernel, row_sum_kernel, softmax_kernel  # noqa: E402


def build(fn, const, p16=(), p32=(), pi32=(), floats=(), desc=None, **opts):
    sig, cst = {}, {}
    # constexprs the job leaves out take their defaults, as a launch that omits them does
    const = dict({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **const)
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
        elif name in floats or name == "drop_scale":
            sig[name] = "fp32"
        elif name == "SEQ_KEYS":
            sig[name] = "*i64"
        elif name == "OUT":
            sig[name] = "*i8"
        elif name in ("drop_lo", "drop_hi", "drop_threshold", "stream_lo", "stream_hi", "threshold"):
            sig[name] = "i64"     # attention/dropout.py sets bit 40: Triton types them int64
        else:
            sig[name] = "i32"
    return triton.compile(ASTSource(fn, sig, cst), target=GPUTarget("cuda", 90, 32), options=opts)


def build_gluon_decode(d: int, batch_idx: bool) -> None:
    """One variant of the Gluon one-token decode kernel (kernels/attention_decode_wgmma.py):
    head dim ``d``, with or without a cache batch index."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from kernels.attention_decode_wgmma import attention_decode_wgmma_kernel as fn

    class _Base:   # what a descriptor's signature needs of its tensor (no GPU here)
        dtype = "torch.bfloat16"

        def data_ptr(self):
            return 0

    layout = gl.NVMMASharedLayout.get_default_for([64, d], gl.bfloat16)
    desc = mangle_type(TensorDescriptor(_Base(), [4096, 8 * d], [8 * d, 1], [64, d], layout))
    const = dict(HEAD_DIM=d, BLOCK_M=64, BLOCK_N=64, SPLIT_BLOCKS=16, HAS_BATCH_IDX=batch_idx,
                 STAGES=3 + batch_idx, USE_PDL=not batch_idx)
    sig = {}
    for name in fn.arg_names:
        sig[name] = ("constexpr" if name in const else desc if name in ("K_DESC", "V_DESC")
                     else "*bf16" if name in ("Q", "K", "V") else "*fp32" if name.startswith("WS_")
                     else "*i32" if name in ("CACHE_SEQLENS", "BATCH_IDX")
                     else "fp32" if name == "qk_scale"
                     else "i32")
    triton.compile(GluonASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


_KERNELS = {fn.__name__: fn for fn in (
    attention_fwd_kernel, attention_bwd_dkdv_kernel, attention_bwd_dq_kernel, attention_bwd_preprocess_kernel,
    attention_split_partial_kernel, attention_split_combine_kernel, matmul_kernel, matmul_tma_kernel, softmax_kernel,
    row_sum_kernel, layer_norm_kernel, dropout_mask_kernel, kv_append_kernel, kv_append_rotary_kernel,
    rotary_kernel)}
_TL = {"bf16": tl.bfloat16, "fp32": tl.float32}


def variants(full: bool):
    """Every variant to compile, as picklable jobs: ("triton", kernel name, constexprs
    (dtypes by name), build args, options) or ("gluon", head dim, batch index)."""
    feats = list(itertools.product([False, True], repeat=3)) if full else [(False, False, False), (True, True, True)]
    jobs = []

    def job(fn, const, p16=(), p32=(), pi32=(), floats=(), desc=None, **opts):
        jobs.append(("triton", fn.__name__, const, (p16, p32, pi32, floats, desc), opts))

    for sc, al, left in feats:
        f = dict(HAS_SOFTCAP=sc, HAS_ALIBI=al, HAS_LEFT=left, HAS_RIGHT=True)
        base = dict(HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, COMPUTE_DTYPE="bf16", ROWWISE=False, **f)
        fwd = dict(base, SPLIT_BLOCKS=32, EVEN_D=True, WRITE_LSE=True, REVERSE_M=True)
        for loop, tma, varlen in [(1, True, False), (0, False, False), (1, False, True)]:
            desc = {k: "tensordesc<bf16[1,64,1,128]>" for k in ("K", "V")} if tma else None
            job(attention_fwd_kernel, dict(fwd, LOOP=loop, USE_TMA=tma, VARLEN=varlen), ("Q", "K", "V", "O"),
                ("LSE", "ALIBI"), ("CU_Q", "CU_K"), ("qk_scale", "softcap_scaled"), desc, num_warps=4, num_stages=3)
        for fn in (attention_bwd_dkdv_kernel, attention_bwd_dq_kernel):
            for varlen in (False, True):
                job(fn, dict(base, VARLEN=varlen, SKIP_FULL_MASKS=True), ("Q", "K", "V", "DO", "DK", "DV", "DQ"),
                    ("LSE", "DELTA", "ALIBI"),
                    ("CU_Q", "CU_K"), ("qk_scale", "softcap_scaled", "grad_scale"), num_warps=4, num_stages=2)
        for paged, even_d, tma in ((False, True, True), (True, True, True), (False, False, False),
                                   (True, True, False)):
            desc = {k: "tensordesc<bf16[1,64,1,128]>" for k in ("K_DESC", "V_DESC")} if tma else None
            job(attention_split_partial_kernel, dict(base, SPLIT_BLOCKS=32, PAGED=paged, HAS_BATCH_IDX=not paged,
                                                     EVEN_D=even_d, USE_TMA=tma, USE_PDL=tma),
                ("Q", "K", "V", "K_DESC", "V_DESC"), ("WS_ACC", "WS_ML", "ALIBI"),
                ("CACHE_SEQLENS", "BATCH_IDX", "BLOCK_TABLE"), ("qk_scale", "softcap_scaled"), desc,
                num_warps=4, num_stages=3)
    # dropout (kernels/dropout.py's mask in the forward and both backward kernels)
    drop = dict(HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, COMPUTE_DTYPE="bf16", ROWWISE=False, HAS_SOFTCAP=False,
                HAS_ALIBI=False, HAS_LEFT=False, HAS_RIGHT=True, DROPOUT=True)
    for loop, tma, varlen, seeds in [(1, True, False, False), (0, False, True, True)]:
        desc = {k: "tensordesc<bf16[1,64,1,128]>" for k in ("K", "V")} if tma else None
        job(attention_fwd_kernel, dict(drop, SPLIT_BLOCKS=32, EVEN_D=True, WRITE_LSE=True, REVERSE_M=True, LOOP=loop,
                                       USE_TMA=tma, VARLEN=varlen, HAS_SEQ_KEYS=seeds),
            ("Q", "K", "V", "O"), ("LSE", "ALIBI"), ("CU_Q", "CU_K"), ("qk_scale", "softcap_scaled"), desc,
            num_warps=4, num_stages=3)
    for fn in (attention_bwd_dkdv_kernel, attention_bwd_dq_kernel):
        job(fn, dict(drop, VARLEN=False, SKIP_FULL_MASKS=True, HAS_SEQ_KEYS=True),
            ("Q", "K", "V", "DO", "DK", "DV", "DQ"), ("LSE", "DELTA", "ALIBI"), ("CU_Q", "CU_K"),
            ("qk_scale", "softcap_scaled", "grad_scale"), num_warps=4, num_stages=2)
    # 16-key tiles: the mask's half-group branch (the float32 configs' key block); the
    # attention variants above take the whole-group one
    job(dropout_mask_kernel, dict(HAS_SEQ_KEYS=True, VARLEN=True, BLOCK_M=32, BLOCK_N=16), pi32=("CU_Q", "CU_K"),
        num_warps=4)
    # kvcache: cache_leftpad (per-row key offsets, pointer loads), a head dim not a multiple of 8, Dv < D
    job(attention_split_partial_kernel, dict(HEAD_DIM=64, BLOCK_M=64, BLOCK_N=64, COMPUTE_DTYPE="bf16",
                                             ROWWISE=False, HAS_SOFTCAP=False, HAS_ALIBI=True, HAS_LEFT=True,
                                             HAS_RIGHT=True, SPLIT_BLOCKS=16, PAGED=False, HAS_BATCH_IDX=True,
                                             EVEN_D=False, USE_TMA=False, USE_PDL=False, HAS_LEFTPAD=True,
                                             SMALLER_V=True),
        ("Q", "K", "V", "K_DESC", "V_DESC"), ("WS_ACC", "WS_ML", "ALIBI"),
        ("CACHE_SEQLENS", "BATCH_IDX", "BLOCK_TABLE", "LEFTPAD"), ("qk_scale", "softcap_scaled"),
        num_warps=4, num_stages=3)
    job(attention_split_combine_kernel, dict(HEAD_DIM=64, BLOCK_M=16, USE_PDL=False, HAS_LEFTPAD=True), ("O",),
        ("WS_ACC", "WS_ML", "LSE"), ("CACHE_SEQLENS", "LEFTPAD"), num_warps=4)
    for block_m, warps, pdl in ((1, 4, True), (16, 4, False)):
        job(attention_split_combine_kernel, dict(HEAD_DIM=128, BLOCK_M=block_m, USE_PDL=pdl), ("O",),
            ("WS_ACC", "WS_ML", "LSE"), ("CACHE_SEQLENS",), num_warps=warps, launch_pdl=pdl)
    job(attention_bwd_preprocess_kernel, dict(HEAD_DIM=128, BLOCK_M=64, HAS_DLSE=True), ("O", "DO"), ("DLSE", "DELTA"),
        num_warps=4)
    # float32 backward: per-head dk/dv sums (PER_HEAD_SUMS), IEEE fp32 dots
    job(attention_bwd_dkdv_kernel, dict(HEAD_DIM=128, BLOCK_M=32, BLOCK_N=16, COMPUTE_DTYPE="fp32",
                                        ROWWISE=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_LEFT=False,
                                        HAS_RIGHT=True, VARLEN=False, PER_HEAD_SUMS=True),
        ("Q", "K", "V", "DO", "DK", "DV", "DQ"), ("LSE", "DELTA", "ALIBI"), ("CU_Q", "CU_K"),
        ("qk_scale", "softcap_scaled", "grad_scale"), num_warps=4, num_stages=1)
    # the sm90 matmul classes of configs.py (decode with masked rows, middle, large), B K-major;
    # the large class with row-major B (masked columns) and column-major A (masked rows)
    for bm, bn, bk, w, s, g, rows, mm_, nn in ((16, 32, 256, 4, 3, 8, True, False, False),
                                                (64, 128, 64, 4, 5, 8, False, False, False),
                                                (256, 128, 64, 8, 3, 8, False, False, False),
                                                (128, 256, 64, 8, 3, 8, False, False, True),
                                                (256, 128, 64, 8, 3, 8, False, True, False)):
        job(matmul_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, COMPUTE_DTYPE="bf16",
                                ROWWISE=False, CHUNK_BLOCKS=0, MASK_ROWS=rows, MASK_M=mm_, MASK_N=nn),
            ("A", "B", "C"), num_warps=w, num_stages=s)
    # the copy-engine matmul (kernels/matmul_tma.py): every operand layout, persistent + flattened
    for a_t, b_t, flat in ((False, True, True), (False, False, False), (True, False, True), (True, True, False)):
        a_box = "[64,128]" if a_t else "[128,64]"
        b_box = "[256,64]" if b_t else "[64,256]"
        job(matmul_tma_kernel, dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, A_T=a_t, B_T=b_t,
                                    COMPUTE_DTYPE="bf16", ROWWISE=False, FLATTEN=flat), (),
            desc={"a_desc": f"tensordesc<bf16{a_box}>", "b_desc": f"tensordesc<bf16{b_box}>",
                  "c_desc": "tensordesc<bf16[128,256]>"}, num_warps=8, num_stages=3)
    job(matmul_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, COMPUTE_DTYPE="fp32",
                            ROWWISE=False, CHUNK_BLOCKS=4, MASK_ROWS=False, MASK_M=False, MASK_N=False),
        ("A", "B", "C"), num_warps=4, num_stages=2)
    job(softmax_kernel, dict(LOG=True, BLOCK=1024), ("X", "Y"), num_warps=4)
    job(row_sum_kernel, dict(BLOCK=1024), ("X", "Y"), floats=("scale",), num_warps=4)
    job(layer_norm_kernel, dict(HAS_W=True, HAS_B=True, RMS=False, BLOCK=1024), ("X", "W", "Bias", "Y"),
        ("MEAN", "RSTD"), floats=("eps",), num_warps=4)
    # the KV-cache append: paged with the device checks; with rotary (keys, and the query in the
    # same launch, at the length; partial rotary dims), FMA contraction off as launched
    cache_ptrs = ("SEQLENS", "BATCH_IDX", "BLOCK_TABLE", "LEFTPAD")
    job(kv_append_kernel, dict(BLOCK_H=8, BLOCK_D=128, PAGED=True, HAS_BATCH_IDX=False, CHECK=True,
                               HAS_LEFTPAD=True, BLOCK_B=8, BLOCK_P=16),
        ("K_NEW", "V_NEW", "K_CACHE", "V_CACHE"), pi32=cache_ptrs, num_warps=4)
    job(kv_append_rotary_kernel, dict(BLOCK_H=8, BLOCK_HQ=32, BLOCK_D=128, BLOCK_HALF=32, PAGED=False,
                                      HAS_BATCH_IDX=True, INTERLEAVED=True, PASS_THROUGH=True, ROTATE_Q=True,
                                      Q_ALONG=False, CHECK=True, BLOCK_B=8),
        ("K_NEW", "V_NEW", "K_CACHE", "V_CACHE", "Q", "Q_OUT"), ("COS", "SIN"), cache_ptrs, num_warps=4,
        enable_fp_fusion=False)
    job(rotary_kernel, dict(BLOCK_H=32, BLOCK_HALF=64, BLOCK_D=128, ALONG=True, INTERLEAVED=False,
                            PASS_THROUGH=False), ("X", "OUT"), ("COS", "SIN"), ("BASE",), num_warps=4,
        enable_fp_fusion=False)
    if HAVE_GLUON:
        jobs += [("gluon", 128, False), ("gluon", 64, True)]
    return jobs


def compile_variant(job) -> str:
    """Compile one job of :func:`variants`; returns "" or the failure's traceback."""
    import traceback

    try:
        if job[0] == "gluon":
            build_gluon_decode(*job[1:])
        else:
            _, name, const, args, opts = job
            const = {k: _TL[v] if k == "COMPUTE_DTYPE" else v for k, v in const.items()}
            build(_KERNELS[name], const, *args, **opts)
        return ""
    except Exception:
        return f"{job[:2]}: {traceback.format_exc()}"


def _stop_triton_kernels_at_ptx() -> None:
    """Make every later Triton-language compile end at PTX (the cubin stage returns no binary;
    nothing here loads one); Gluon compiles keep every stage.  Through Triton's stage
    inspection hook, whose key keeps these compiles out of the full ones' cache entries."""
    from triton import knobs
    from triton.backends.compiler import Language

    def hook(backend=None, stages=None, options=None, language=None, capability=None):
        if backend is None:                 # compile() asks for the hook's cache key first
            return "ptx-only", "ptx-only"
        if language == Language.TRITON and "cubin" in stages:
            stages["cubin"] = lambda src, metadata: b""
    knobs.runtime.add_stages_inspection_hook = hook


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true", help="every feature combination (slower)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compile in this many processes (default: one per CPU)")
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="compile only every N-th variant from the I-th (0-based; the test suite "
                         "spreads the shards over its workers)")
    ap.add_argument("--to", choices=("cubin", "ptx"), default="cubin",
                    help="the last stage of the Triton kernels (ptx: skip ptxas; Gluon kernels always cubin)")
    args = ap.parse_args()
    if args.to == "ptx":
        _stop_triton_kernels_at_ptx()
    i, n = (int(x) for x in args.shard.split("/"))
    if not 0 <= i < n:
        ap.error(f"--shard wants I/N with 0 <= I < N, got {args.shard!r}")
    jobs = variants(args.all)[i::n]
    workers = max(1, min(args.jobs, len(jobs)))
    if workers == 1:
        errors = [compile_variant(j) for j in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork where there is one: the workers inherit the imports (triton starts no threads)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            errors = list(pool.map(compile_variant, jobs))
    errors = [e for e in errors if e]
    for e in errors:
        print(e, file=sys.stderr)
    shard = f", shard {i}/{n}" if n > 1 else ""
    if errors:
        print(f"{len(errors)} of {len(jobs)} kernel variants FAILED to compile for sm_90{shard}", file=sys.stderr)
        return 1
    print(f"compiled {len(jobs)} kernel variants for sm_90 with triton {triton.__version__} "
          f"({workers} processes{shard}{', Triton kernels to PTX' if args.to == 'ptx' else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
