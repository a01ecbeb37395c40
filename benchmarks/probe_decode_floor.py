"""Probe (offline, Hopper): the floor of a one-wave split-KV decode step, piece by piece.

Batch 1, 8 KV heads, head dim 128, bf16, split 1024 (16 blocks of 64 keys per program):
what a decode step would cost if its fold took no time.  ``stream`` is a Gluon kernel with
the decode partial kernel's grid, copy-engine loads and ring of stages, that waits for each
key block and refills its stage at once (no arithmetic), then writes a split state of the
same size.  Timed as CUDA-graph replays, next to:

* the same kernel followed by bitstable's combine kernel (launched as its programmatic
  dependent, as the decode path does): the floor with the two-kernel step;
* the same kernel with a fused epilogue: every program takes a ticket (one atomic add
  per program) after writing its state, and the last one of a head loads every split state
  and writes the output (the merge's loads and stores, a plain sum for its arithmetic);
* an empty kernel (a graph node's own cost), the combine kernel alone, the Gluon partial
  kernel alone and the whole decode step;
* a read-only pass over a large tensor (``torch.sum``) next to the copy bandwidth.

The ``timeline`` mode (per-program timestamps of the Gluon partial kernel) is gone: it
needed a ``TIMELINE`` switch inside the production kernel.  Its recorded results are in
``results/2026-12-01-h200-session7/probes/``; to run it again, check out commit bdef6fd
(the kernel with the switch, and this script's ``timeline()``).

    PYTHONPATH=src python benchmarks/probe_decode_floor.py
"""
import importlib

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

import bitstable
from bitstable.cli.bench import copy_bandwidth_gbs
from bitstable.configs import DECODE_COMBINE_TILE

kv_launch = importlib.import_module("bitstable.attention.kvcache.launch")
dw_mod = importlib.import_module("bitstable.attention.decode_wgmma")
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def stream_kernel(K_DESC, V_DESC, WS_ACC, WS_ML, OUT, COUNTERS, cache_len,
                  HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_BLOCKS: gl.constexpr,
                  STAGES: gl.constexpr, GROUP: gl.constexpr, NUM_SPLITS: gl.constexpr,
                  USE_PDL: gl.constexpr, FUSED: gl.constexpr, NUM_HEADS_KV: gl.constexpr):
    if USE_PDL:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
    split = gl.program_id(0)
    h_kv = gl.program_id(1)
    num_heads_kv = NUM_HEADS_KV
    KV_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gl.bfloat16)
    TILE_BYTES: gl.constexpr = BLOCK_N * HEAD_DIM * 2
    k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
    v_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    fence_async_shared()
    row0 = split * SPLIT_BLOCKS * BLOCK_N
    col = h_kv * HEAD_DIM
    for s in gl.static_range(STAGES):
        mbarrier.expect(bars.index(s), 2 * TILE_BYTES)
        tma.async_copy_global_to_shared(K_DESC, [row0 + s * BLOCK_N, col], bars.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(V_DESC, [row0 + s * BLOCK_N, col], bars.index(s), v_bufs.index(s))
    for i in range(SPLIT_BLOCKS):
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        refill = i + STAGES < SPLIT_BLOCKS
        r = row0 + (i + STAGES) * BLOCK_N
        mbarrier.expect(bars.index(slot), 2 * TILE_BYTES, pred=refill)
        tma.async_copy_global_to_shared(K_DESC, [r, col], bars.index(slot), k_bufs.index(slot), pred=refill)
        tma.async_copy_global_to_shared(V_DESC, [r, col], bars.index(slot), v_bufs.index(slot), pred=refill)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    # A split state of the decode kernel's size: GROUP rows of HEAD_DIM floats, m and l.
    ST: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
    g = gl.arange(0, GROUP, gl.SliceLayout(1, ST))
    d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, ST))
    vals = gl.full([GROUP, HEAD_DIM], 1.0, gl.float32, ST)
    row = ((split * num_heads_kv + h_kv) * GROUP + g).to(gl.int64)
    gl.store(WS_ACC + row[:, None] * HEAD_DIM + d[None, :], vals)
    gl.store(WS_ML + row * 2, gl.full([GROUP], 0.5, gl.float32, gl.SliceLayout(1, ST)))
    if FUSED:
        cta_barrier()
        ticket = gl.atomic_add(COUNTERS + h_kv, 1, sem="acq_rel", scope="gpu")
        if ticket == NUM_SPLITS - 1:
            L3: gl.constexpr = gl.BlockedLayout([NUM_SPLITS, 1, 4], [1, 1, 32], [1, 4, 1], [2, 1, 0])
            s3 = gl.arange(0, NUM_SPLITS, gl.SliceLayout(1, gl.SliceLayout(2, L3)))
            g3 = gl.arange(0, GROUP, gl.SliceLayout(0, gl.SliceLayout(2, L3)))
            d3 = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, gl.SliceLayout(1, L3)))
            rows3 = (s3[:, None] * num_heads_kv + h_kv) * GROUP + g3[None, :]
            st = gl.load(WS_ACC + rows3.to(gl.int64)[:, :, None] * HEAD_DIM + d3[None, None, :],
                         cache_modifier=".cg")
            total = gl.sum(st, 0)
            OL: gl.constexpr = gl.SliceLayout(0, L3)
            go = gl.arange(0, GROUP, gl.SliceLayout(1, OL))
            do = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, OL))
            gl.store(OUT + ((h_kv * GROUP + go) * HEAD_DIM)[:, None] + do[None, :], total.to(gl.bfloat16))
            gl.atomic_xchg(COUNTERS + h_kv, 0, sem="relaxed", scope="gpu")


@triton.jit
def empty_kernel(X):
    pass


def graph_us(fn):
    return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3


def main():
    copy = copy_bandwidth_gbs()
    big = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)   # 2 GiB
    t_sum = triton.testing.do_bench(lambda: big.sum(), return_mode="median")
    read_bw = big.numel() * 2 / (t_sum * 1e-3) / 1e9
    del big
    torch.cuda.empty_cache()
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s; read-only (torch.sum over 2 GiB): {read_bw:.0f} GB/s")
    x = torch.zeros(1, device="cuda")
    print(f"empty kernel, graph replay: {graph_us(lambda: empty_kernel[(1,)](x)):.2f} us")
    print(f"two empty kernels, graph replay: {graph_us(lambda: (empty_kernel[(1,)](x), empty_kernel[(1,)](x))):.2f} us")
    print("\n| KV len | variant | us | K+V GB/s | of copy |")
    print("|---|---|---|---|---|")
    H, D, BN, SPLIT = 8, 128, 64, 1024
    for L in (4096, 16384, 65536):
        ns = L // SPLIT
        kc = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(1, 1, 32, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((1,), L, dtype=torch.int32, device="cuda")
        layout = gl.NVMMASharedLayout.get_default_for([BN, D], gl.bfloat16)
        kd = TensorDescriptor(kc.view(L, H * D), [L, H * D], [H * D, 1], [BN, D], layout)
        vd = TensorDescriptor(vc.view(L, H * D), [L, H * D], [H * D, 1], [BN, D], layout)
        ws_acc = torch.empty(ns, 1, 32, 1, D, device="cuda", dtype=torch.float32)
        ws_ml = torch.empty(ns, 1, 32, 1, 2, device="cuda", dtype=torch.float32)
        out = torch.empty(1, 1, 32, D, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(1, 32, 1, device="cuda", dtype=torch.float32)
        counters = torch.zeros(H, device="cuda", dtype=torch.int32)
        kv_bytes = 2 * kc.numel() * 2

        def stream(stages, pdl=False, fused=False):
            stream_kernel[(ns, H)](kd, vd, ws_acc, ws_ml, out, counters, L, HEAD_DIM=D, BLOCK_N=BN,
                                   SPLIT_BLOCKS=SPLIT // BN, STAGES=stages, GROUP=4, NUM_SPLITS=ns,
                                   USE_PDL=pdl, FUSED=fused, NUM_HEADS_KV=H, num_warps=4)

        def combine(pdl=True):
            kv_launch.launch_combine(ws_acc, ws_ml, out, lse, lens, SPLIT, 0, D, DECODE_COMBINE_TILE["sm90"], pdl=pdl)

        def step():
            return bitstable.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)

        def partial_only():
            dw_mod.launch_partial_wgmma(q, kc, vc, ws_acc, ws_ml, lens, None, num_splits=ns,
                                        split_blocks=SPLIT // BN, block_m=64, block_n=BN, stages=4,
                                        n_new=0, qk_scale=0.1275, pdl=False)

        variants = [("stream, 4 stages", lambda: stream(4)), ("stream, 6 stages", lambda: stream(6)),
                    ("stream, 4 stages + combine (PDL)", lambda: (stream(4, pdl=True), combine())),
                    ("stream, 4 stages + combine (no PDL)", lambda: (stream(4), combine(pdl=False))),
                    ("combine alone", lambda: combine(pdl=False)),
                    ("Gluon partial alone", partial_only), ("decode step (table)", step)]
        if ns * H <= torch.cuda.get_device_properties(0).multi_processor_count and ns <= 64:
            variants.insert(3, ("stream, 4 stages, fused ticket epilogue", lambda: stream(4, fused=True)))
            variants.insert(4, ("stream, 6 stages, fused ticket epilogue", lambda: stream(6, fused=True)))
        for name, fn in variants:
            try:
                fn()
                torch.cuda.synchronize()
                us = graph_us(fn)
            except Exception as e:  # noqa: BLE001
                print(f"| {L} | {name} | failed: {type(e).__name__}: {str(e)[:120]} | | |", flush=True)
                continue
            gbs = kv_bytes / (us * 1e-6) / 1e9
            print(f"| {L} | {name} | {us:.1f} | {gbs:.0f} | {gbs / copy:.0%} |", flush=True)
        if ns * H <= 132:
            stream(4, fused=True)
            torch.cuda.synchronize()
            print(f"| {L} | fused: counters back to 0 | {bool((counters == 0).all())} | | |")
        del kc, vc
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
