"""Time candidate forward configs on the GPU (offline exploration, never used at run time).

The config table is frozen; this script is how entries are chosen: each
candidate is timed next to SDPA's cudnn backend in the same process.  A
candidate with another block_n is another reduction order, so the table
changes only between library versions.

    PYTHONPATH=src python benchmarks/explore_fwd_configs.py
"""
import os
import sys

import torch
import triton

from bitstable.launch_options import LaunchOptions
from bitstable.attention.launch import attention_forward
from bitstable.cli.bench import attention_flops, sdpa_fn
from bitstable.configs import AttentionConfig

CANDIDATES = {
    64: [(64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
}
LOOPS = os.environ.get("LOOPS", "branch,nested").split(",")
TMAS = [x == "1" for x in os.environ.get("TMAS", "0,1").split(",")]
SPLITS = [int(x) for x in os.environ.get("SPLITS", "2048,4096").split(",")]
SHAPES = {64: (8, 32, 4096, 64), 128: (4, 16, 8192, 128)}


def main():
    rows = []
    for d, cands in CANDIDATES.items():
        B, H, L, D = SHAPES[d]
        q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        for causal in (False, True):
            flops = attention_flops(B, H, L, D, causal)
            cud = triton.testing.do_bench(sdpa_fn("cudnn", qt, kt, vt, causal), return_mode="median")
            todo = [(c, lp, SPLITS[0], tma) for c in cands for lp in LOOPS for tma in TMAS]
            todo += [(cands[0], lp, sp, tma) for lp in LOOPS for sp in SPLITS[1:] for tma in TMAS]
            for (bm, bn, w, s), loop, split, tma in todo:
                opts = LaunchOptions(fwd_loop=loop, fwd_tma=tma)
                cfg = AttentionConfig(bm, bn, w, s)
                try:
                    ms = triton.testing.do_bench(
                        lambda: attention_forward(q, k, v, D ** -0.5, -1, 0 if causal else -1, 0.0, None,
                                                  split_size=split, config=cfg, options=opts), return_mode="median")
                except Exception as e:  # out of shared memory etc.
                    print(f"D={D} causal={causal} {cfg}: failed {type(e).__name__}: {str(e)[:100]}")
                    continue
                rows.append((D, causal, loop, int(tma), split, bm, bn, w, s, ms, flops / ms / 1e9, cud / ms))
                print(f"D={D} causal={causal} loop={loop} tma={int(tma)} split={split} BM={bm} BN={bn} w={w} s={s}: {ms:.3f} ms "
                      f"{flops / ms / 1e9:.0f} TFLOP/s, {cud / ms:.2f}x cudnn ({flops / cud / 1e9:.0f})",
                      flush=True)
    print("\nD causal loop tma split BM BN warps stages ms TFLOP/s x-cudnn")
    for r in rows:
        print(" ".join(str(round(x, 3)) if isinstance(x, float) else str(x) for x in r))


if __name__ == "__main__":
    sys.exit(main())
