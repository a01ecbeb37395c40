#!/usr/bin/env python3
"""Probe (CPU, no GPU needed): how many microseconds of bitstable's own Python one eager call
costs, with every Triton kernel launch stubbed out.

Runs under Triton's interpreter with ``InterpretedFunction.run`` replaced by a no-op, so a
call does all its Python (argument checks, dispatch, autograd, plans, allocations) and
launches nothing.  The GPU's host time per call adds Triton's launcher, TMA descriptors and
the CUDA driver on top (``bitstable bench --passes model --model-parts overhead`` measures
that on a GPU); this probe isolates the part bitstable's code controls.

    python benchmarks/probe_host_python.py [--reps 300] [--profile CASE] [--gpu]

``--gpu``: on a GPU with the real kernels and no stubs (fp16 inputs), back-to-back eager calls synchronised after each, so the times are host
time plus the tiny kernels; with ``--profile`` cProfile shows where the host time goes
(Triton's launcher, descriptors, allocations), the question issue 20 leaves open.

Prints the median us per call of each case next to the stock PyTorch call of the same
shape (CPU kernels, not stubbed: a scale reference only).  ``--profile CASE`` prints
cProfile's top functions for that case.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

GPU = "--gpu" in sys.argv
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

if not GPU:
    from triton.runtime import interpreter  # noqa: E402

    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None   # no kernel runs
DEV = "cuda" if GPU else "cpu"

import bitstable  # noqa: E402
from bitstable import ops  # noqa: E402
from bitstable.timing import synced_call_us  # noqa: E402


def _cases():
    g = torch.Generator().manual_seed(0)
    dt = torch.float16
    q, k, v = (torch.randn(1, 16, 2, 64, generator=g, dtype=dt).to(DEV) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn(1, 16, 2, 64, generator=g, dtype=dt).to(DEV)
    kc, vc = torch.zeros(2, 64, 2, 64, dtype=dt, device=DEV), torch.zeros(2, 64, 2, 64, dtype=dt, device=DEV)
    qd, kn = (torch.randn(2, 1, 2, 64, generator=g, dtype=dt).to(DEV) for _ in range(2))
    lens = torch.tensor([10, 20], dtype=torch.int32, device=DEV)
    a, w = (torch.randn(n, 64, generator=g, dtype=dt).to(DEV) for n in (8, 96))
    x = torch.randn(8, 96, generator=g, dtype=dt).to(DEV)

    wt, gamma, beta = w.t(), x[0], x[1]
    F = torch.nn.functional

    def mm_call():
        return a @ wt

    def softmax_call():
        return torch.softmax(x, -1)

    def rms_call():
        return F.rms_norm(x, (96,), gamma)

    def ln_call():
        return F.layer_norm(x, (96,), gamma, beta)

    def fwd_bwd():
        out = bitstable.flash_attn_func(qg, kg, vg, causal=True)
        torch.autograd.grad(out, (qg, kg, vg), dout)

    def sdpa_fwd_bwd():
        out = torch.nn.functional.scaled_dot_product_attention(
            qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), is_causal=True)
        torch.autograd.grad(out, (qg, kg, vg), dout.transpose(1, 2))

    return {
        "attn fwd": (lambda: bitstable.flash_attn_func(q, k, v, causal=True),
                     lambda: torch.nn.functional.scaled_dot_product_attention(
                         q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)),
        "attn fwd+bwd": (fwd_bwd, sdpa_fwd_bwd),
        "kvcache decode": (lambda: bitstable.flash_attn_with_kvcache(qd, kc, vc, kn, kn, cache_seqlens=lens,
                                                                     causal=True), None),
        "ops.mm": (lambda: ops.mm(a, w.t()), lambda: torch.mm(a, w.t())),
        "ops.softmax": (lambda: ops.softmax(x, -1), lambda: torch.softmax(x, -1)),
        "ops.rms_norm": (lambda: ops.rms_norm(x, (96,), x[0]), lambda: torch.rms_norm(x, (96,), x[0])),
        # the same stock call inside set_batch_invariant_mode() (bitstable) and outside (stock)
        "mode x @ w": (mm_call, mm_call),
        "mode softmax": (softmax_call, softmax_call),
        "mode rms_norm": (rms_call, rms_call),
        "mode layer_norm": (ln_call, ln_call),
    }


def _sync():
    if GPU:
        torch.cuda.synchronize()


def _median_us(fn, reps: int) -> float:
    return synced_call_us(fn, reps)



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--profile", default="", help="a case name to run under cProfile")
    ap.add_argument("--gpu", action="store_true", help="real kernels on the GPU, nothing stubbed")
    ap.add_argument("--trace", default="", help="a case name to run under torch.profiler (GPU: kernel times)")
    args = ap.parse_args(argv)
    cases = _cases()
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        fn = cases[args.trace][0]
        for _ in range(20):
            fn()
        _sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if GPU else [])
        with profile(activities=acts) as prof:
            for _ in range(args.reps):
                fn()
                _sync()
        key = "self_cuda_time_total" if GPU else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
        return 0
    if args.profile:
        import cProfile
        import pstats

        fn = cases[args.profile][0]
        ctx = bitstable.set_batch_invariant_mode() if args.profile.startswith("mode ") else contextlib.nullcontext()
        with ctx:
            for _ in range(20):
                fn()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.reps):
                fn()
            prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    print("| call | bitstable (us) | stock (us) |" if GPU else
          "| call | bitstable Python, kernels stubbed (us) | stock CPU call (us) |")
    print("|---|---|---|")
    for name, (ours, stock) in cases.items():
        s = f"{_median_us(stock, args.reps):.1f}" if stock else "-"
        if name.startswith("mode "):       # the mode entered once, around the timed calls
            with bitstable.set_batch_invariant_mode():
                t = _median_us(ours, args.reps)
        else:
            t = _median_us(ours, args.reps)
        print(f"| {name} | {t:.1f} | {s} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
