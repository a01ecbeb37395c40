"""Compile the attention forward kernel for Hopper on this (GPU-less) machine and
report registers, spills and the matrix instructions in its SASS.

Needs only triton (no torch, no GPU):
    python tools/inspect_kernel.py --dtype bf16 --head-dim 128 [--block-m 128 --block-n 64 --warps 8 --stages 3]
Defaults come from the config table's sm90 entry when torch is importable.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src", "bitstable"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.attention_fwd import attention_fwd_kernel  # noqa: E402

TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


LOOPSTYLE = int(os.environ.get('LOOP', '0'))


def build(dtype, head_dim, block_m, block_n, warps, stages, causal, split_blocks):
    fn = attention_fwd_kernel
    ptr = "*" + dtype
    sig, const, attrs = {}, {}, {}
    ints_div16 = {"stride_qb", "stride_qm", "stride_qh", "stride_kb", "stride_kn", "stride_kh",
                  "stride_vb", "stride_vn", "stride_vh", "stride_ob", "stride_om", "stride_oh"}
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_BLOCKS=split_blocks,
                      COMPUTE_DTYPE=TL[dtype], ROWWISE=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_LEFT=False,
                      HAS_RIGHT=causal, EVEN_D=True, LOOP=LOOPSTYLE, USE_TMA=os.environ.get('TMA', '0') == '1', VARLEN=False, WRITE_LSE=True, REVERSE_M=causal)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            const[name] = constexprs[name]
        elif name in ("K", "V") and os.environ.get('TMA', '0') == '1':
            sig[name] = f"tensordesc<{dtype}[1,{block_n},1,{head_dim}]>"
        elif name in ("Q", "K", "V", "O"):
            sig[name] = ptr
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("CU_Q", "CU_K"):
            sig[name] = "*i32"
        elif name in ("LSE", "ALIBI"):
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "softcap_scaled"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in ints_div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-m", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--split-blocks", type=int, default=16)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--sass", action="store_true", help="print the SASS")
    a = ap.parse_args()
    k = build(a.dtype, a.head_dim, a.block_m, a.block_n, a.warps, a.stages, a.causal, a.split_blocks)
    md = k.metadata
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name],
                          capture_output=True, text=True).stdout
    ptxas = subprocess.run([os.path.join(bindir, "ptxas"), "-arch=sm_90a", "-v", "-o", os.devnull, "-"],
                           input=k.asm["ptx"], capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", ptxas)
    REGS = regs[-1] if regs else "?"
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    print(f"triton {triton.__version__} {a.dtype} d={a.head_dim} BM={a.block_m} BN={a.block_n} "
          f"warps={a.warps} stages={a.stages} causal={a.causal}: regs={REGS} "
          f"spills(ptxas)={spill} shared={md.shared} "
          f"HGMMA={sass.count('HGMMA')} HMMA={sass.count('HMMA')} LDL={sass.count('LDL')} STL={sass.count('STL')}")
    if a.sass:
        print(sass)


if __name__ == "__main__":
    main()
