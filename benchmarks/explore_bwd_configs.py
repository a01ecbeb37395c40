"""Time candidate backward tile configs on the GPU (offline exploration, never used at run time).

For each shape the dk/dv kernel's candidates are timed first (dq kernel at the
table's config), then the dq kernel's candidates with the fastest dk/dv tiles.
Every candidate's (dq, dk, dv) must equal the table config's bits (the sums run in
ascending row/key order whatever the tiles).  Times are forward+backward next to
SDPA's cudnn backend in the same process.  Register spills of each candidate were
read from ptxas for sm_90a beforehand (benchmarks/results/NOTES.md).

    PYTHONPATH=src python benchmarks/explore_bwd_configs.py
"""
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import bitstable
from bitstable import launch_options
from bitstable.cli.bench import attention_flops
from bitstable.configs import BackwardConfig, arch_key, backward_config

KV = {64: [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
      128: [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 8, 2), (128, 64, 8, 2)]}
DQ = {64: [(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2)],
      128: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 4, 2)]}
SHAPES = {64: (8, 32, 4096, 64), 128: (4, 16, 8192, 128)}
if len(sys.argv) > 1 and sys.argv[1] == "skip":
    SHAPES = {64: (8, 32, 4096, 64), 128: (4, 16, 8192, 128), 129: (16, 16, 2048, 128)}


def main():
    print("| D | causal | dk/dv tiles | dq tiles | ms fwd+bwd | TFLOP/s | cudnn TFLOP/s | vs cudnn | same bits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for _, (B, H, L, D) in SHAPES.items():
        d = D
        q, k, v, do = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        for causal in (False, True):
            flops = attention_flops(B, H, L, D, causal, backward=True)

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                return torch.autograd.grad(o, (qt, kt, vt), dot)
            cud = triton.testing.do_bench(cudnn, return_mode="median")

            def ours():
                o = bitstable.flash_attn_func(q, k, v, causal=causal)
                return torch.autograd.grad(o, (q, k, v), do)

            base = backward_config(arch_key(q.device), q.dtype, D)
            ref = ours()

            def trial(cfg):
                try:
                    with launch_options.forced(bwd_config=cfg):
                        got = ours()
                        ms = triton.testing.do_bench(ours, return_mode="median")
                except Exception as e:  # noqa: BLE001 - a config that fails is reported, not fatal
                    print(f"| {D} | {causal} | {cfg} | failed: {type(e).__name__}: {str(e)[:80]} |", flush=True)
                    return None
                same = all(torch.equal(a, b) for a, b in zip(got, ref))
                tf = flops / ms / 1e9
                print(f"| {D} | {causal} | {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} "
                      f"| {'x'.join(map(str, cfg.dq_tiles()[:2]))} w{cfg.dq_tiles()[2]} s{cfg.dq_tiles()[3]} "
                      f"| {ms:.3f} | {tf:.0f} | {flops / cud / 1e9:.0f} | {cud / ms:.2f}x | {same} |", flush=True)
                return ms

            if len(sys.argv) > 1 and sys.argv[1] == "skip":   # mask skipping on the table's tiles
                for skip in (False, True):
                    with launch_options.forced(bwd_skip_full_masks=skip):
                        got = ours()
                        ms = triton.testing.do_bench(ours, return_mode="median")
                    same = all(torch.equal(a, b) for a, b in zip(got, ref))
                    print(f"| {D} | {causal} | table, skip_full_masks={skip} | | {ms:.3f} | {flops / ms / 1e9:.0f} "
                          f"| {flops / cud / 1e9:.0f} | {cud / ms:.2f}x | {same} |", flush=True)
                continue
            dq0 = base.dq_tiles()
            best_kv, best_ms = None, float("inf")
            for c in KV[d]:
                ms = trial(BackwardConfig(*c, *dq0))
                if ms is not None and ms < best_ms:
                    best_kv, best_ms = c, ms
            for c in DQ[d]:
                if c != tuple(dq0):
                    trial(BackwardConfig(*best_kv, *c))
        del q, k, v, do, qt, kt, vt, dot
    return 0


if __name__ == "__main__":
    sys.exit(main())
