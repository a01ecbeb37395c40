"""Time the split-KV decode kernels' launch options on the GPU (offline exploration).

One query token, 32 query heads, 8 KV heads, head dim 128, bf16; CUDA-graph replay
times of the whole call (partial + combine kernels) for each variant, next to
SDPA-flash and the device copy bandwidth, and the two kernels' own times from the
profiler.  Pipeline depth and the load path (``even_d``: 16-byte asynchronous loads
vs. masked scalar loads, copy engine or not, the combine as a programmatic dependent launch or
not) are launch-only (same bits, checked here); the split size is
part of the reduction order (DESIGN.md), shown only to size its cost.

    PYTHONPATH=src python benchmarks/explore_decode.py [tma | splits | wgmma | l2]

``wgmma``: the Gluon one-token kernel (table policy, off, forced at 3 and 4 stages).

``splits``: what the split size costs the prefill forward instead.
"""
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import bitstable
from bitstable.cli.bench import copy_bandwidth_gbs, sdpa_fn

from bitstable import launch_options

CASES = [(1, 4096), (1, 16384), (1, 65536), (1, 131072), (8, 4096), (8, 16384), (64, 4096), (64, 16384)]
# (split, launch options forced over the table's: bitstable.launch_options.LaunchOptions fields)
VARIANTS = [(1024, {}), (1024, {"decode_pdl": False}), (2048, {})]


def kernel_times(fn):
    """{kernel name: mean microseconds} over 20 calls, from the profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and "attention" in e.key:
            out[e.key[:40]] = e.device_time_total / max(e.count, 1)
    return out


def main():
    global VARIANTS
    if sys.argv[1:2] == ["wgmma"]:   # the Gluon one-token kernel against the Triton one
        VARIANTS = [(1024, {}), (1024, {"decode_gluon": False}), (1024, {"decode_gluon": True}),
                    (1024, {"decode_gluon": True, "decode_stages": 3})]
    copy = copy_bandwidth_gbs()
    print(f"device copy bandwidth: {copy:.0f} GB/s")
    print("| B | KV len | split | launch | ms | K+V GB/s | of copy | SDPA-flash ms | vs flash | same bits | kernels |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B, L in CASES:
        kc = torch.randn(B, L, 8, 128, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(B, L, 8, 128, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(B, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        torch.cuda.synchronize()

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        fl = triton.testing.do_bench_cudagraph(flash, return_mode="median")
        kv_bytes = 2 * kc.numel() * kc.element_size()
        refs = {}
        for split, force in VARIANTS:
            def ours():
                return bitstable.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True,
                                                         split_size=split)
            try:
                with launch_options.forced(**force):
                    out = ours()
                    ms = triton.testing.do_bench_cudagraph(ours, return_mode="median")
                    kt_us = kernel_times(ours) if B == 1 else {}
            except Exception as e:  # noqa: BLE001
                print(f"| {B} | {L} | {split} | {force} | failed: {type(e).__name__}: {str(e)[:80]} |")
                continue
            ref = refs.setdefault(split, out)
            same = torch.equal(out, ref)
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            extra = " ".join(f"{k.split('_kernel')[0]}={v:.1f}us" for k, v in kt_us.items())
            print(f"| {B} | {L} | {split} | {force or 'table'} | {ms:.4f} | {gbs:.0f} | {gbs / copy:.0%} "
                  f"| {fl:.4f} | {fl / ms:.2f}x | {same} | {extra}", flush=True)
        del kc, vc, q, qt, kt, vt
        torch.cuda.empty_cache()
    l2_probe()
    return 0


def l2_probe():
    """Batch 1: the same decode step with its keys in memory (a contiguous cache) and in
    L2 (a paged cache whose block table names one 2048-key page throughout).  If the
    step is bound by moving bytes into the SM, L2-resident keys make it much faster; if
    it is bound by the fold's instruction latency, they do not."""
    print("\n| KV len | contiguous (HBM) us | one page (L2) us | L2 / HBM |")
    print("|---|---|---|---|")
    for L in (4096, 16384):
        q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(1, L, 8, 128, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(1, L, 8, 128, device="cuda", dtype=torch.bfloat16)
        kp = torch.randn(1, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
        vp = torch.randn(1, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
        table = torch.zeros(1, L // 2048, dtype=torch.int32, device="cuda")
        lens = torch.full((1,), L, dtype=torch.int32, device="cuda")

        def hbm():
            return bitstable.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)

        def l2():
            return bitstable.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table, causal=True)
        t_hbm = triton.testing.do_bench_cudagraph(hbm, return_mode="median") * 1e3
        t_l2 = triton.testing.do_bench_cudagraph(l2, return_mode="median") * 1e3
        print(f"| {L} | {t_hbm:.1f} | {t_l2:.1f} | {t_l2 / t_hbm:.2f} |", flush=True)


def tma_probe():
    """Copy-engine loads or per-thread copies, contiguous and paged caches (page sizes
    256 and 2048), batch 1 and 8, each timed three times in turn."""
    print("| B | KV len | page | tma | us (3 runs) | SDPA-flash us |")
    print("|---|---|---|---|---|---|")
    for B, L in ((1, 4096), (1, 16384), (8, 4096), (8, 16384)):
        q = torch.randn(B, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(B, L, 8, 128, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(B, L, 8, 128, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        fl = triton.testing.do_bench_cudagraph(flash, return_mode="median") * 1e3
        for page in (None, 256, 2048):
            if page is None:
                args, table = (kc, vc), None
            else:
                n = B * L // page
                perm = torch.randperm(n, device="cuda")
                args = (kc.reshape(n, page, 8, 128)[perm.argsort()], vc.reshape(n, page, 8, 128)[perm.argsort()])
                table = perm.to(torch.int32).reshape(B, L // page)
            for tma in (True, False):
                def ours():
                    return bitstable.flash_attn_with_kvcache(q, *args, cache_seqlens=lens, block_table=table,
                                                             causal=True)
                with launch_options.forced(decode_tma=tma):
                    ts = [triton.testing.do_bench_cudagraph(ours, return_mode="median") * 1e3 for _ in range(3)]
                print(f"| {B} | {L} | {page or 'contiguous'} | {tma} | {' / '.join(f'{t:.1f}' for t in ts)} "
                      f"| {fl:.1f} |", flush=True)


def forward_split_cost():
    """What the split size costs the prefill: the forward (bf16) on the benchmark's shapes
    at split sizes 2048, 1024 and 512, next to SDPA-cudnn, all in one process."""
    from bitstable.cli.bench import DEFAULT_SHAPES, attention_flops
    print("| B | H | L | D | causal | split | ms | TFLOP/s | vs cudnn |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, H, L, D in DEFAULT_SHAPES:
        q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        for causal in (False, True):
            flops = attention_flops(B, H, L, D, causal)
            cud = triton.testing.do_bench(sdpa_fn("cudnn", qt, kt, vt, causal), return_mode="median")
            for split in (2048, 1024, 512):
                with bitstable.set_deterministic_mode(True, split_size=split):
                    ms = triton.testing.do_bench(lambda: bitstable.flash_attn_func(q, k, v, causal=causal),
                                                 return_mode="median")
                print(f"| {B} | {H} | {L} | {D} | {causal} | {split} | {ms:.3f} | {flops / ms / 1e9:.0f} "
                      f"| {cud / ms:.2f}x |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["tma"]:
        sys.exit(tma_probe())
    if sys.argv[1:] == ["splits"]:
        sys.exit(forward_split_cost())
    if sys.argv[1:] == ["l2"]:
        sys.exit(l2_probe())
    sys.exit(main())
