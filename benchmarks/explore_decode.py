"""Time the split-KV decode kernel's launch options on the GPU (offline exploration).

One query token, 32 query heads, 8 KV heads, head dim 128, bf16; CUDA-graph replay
times (kernel time) for each pipeline depth and split size, next to SDPA-flash and the
device copy bandwidth.  Pipeline depth is launch-only (same bits); the split size is
part of the reduction order (DESIGN.md), shown here only to size its cost.

    PYTHONPATH=src python benchmarks/explore_decode.py
"""
import importlib
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import bitstable
from bitstable.bench import copy_bandwidth_gbs

kv_mod = importlib.import_module("bitstable.attention.kvcache")
CASES = [(1, 16384), (1, 65536), (1, 131072), (8, 16384), (64, 4096)]


def main():
    copy = copy_bandwidth_gbs()
    print(f"device copy bandwidth: {copy:.0f} GB/s")
    print("| B | KV len | split | stages | ms | K+V GB/s | of copy | SDPA-flash ms | vs flash | same bits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for B, L in CASES:
        kc = torch.randn(B, L, 8, 128, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(B, L, 8, 128, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(B, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        fl = triton.testing.do_bench_cudagraph(flash, return_mode="median")
        kv_bytes = 2 * kc.numel() * kc.element_size()
        ref = None
        for split, tile in ((2048, None), (2048, (16, 1)), (2048, (16, 2)), (2048, (32, 2)), (2048, (64, 8))):
            for stages in (3, 4):
                kv_mod._DECODE_STAGES_OVERRIDE = stages
                kv_mod._DECODE_TILE_OVERRIDE = tile

                def ours():
                    return bitstable.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True,
                                                             split_size=split)
                try:
                    out = ours()
                    ms = triton.testing.do_bench_cudagraph(ours, return_mode="median")
                except Exception as e:  # noqa: BLE001
                    print(f"| {B} | {L} | {split} | {stages} {tile or 'table'} | failed: {type(e).__name__}: {str(e)[:80]} |")
                    continue
                finally:
                    kv_mod._DECODE_STAGES_OVERRIDE = None
                    kv_mod._DECODE_TILE_OVERRIDE = None
                if split == 2048 and ref is None:
                    ref = out
                same = torch.equal(out, ref) if split == 2048 else "n/a (other split)"
                gbs = kv_bytes / (ms * 1e-3) / 1e9
                print(f"| {B} | {L} | {split} | {stages} {tile or 'table'} | {ms:.4f} | {gbs:.0f} | {gbs / copy:.0%} | {fl:.4f} "
                      f"| {fl / ms:.2f}x | {same} |", flush=True)
        del kc, vc, q, qt, kt, vt
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
