"""Timing and formatting helpers shared by the benchmark passes (bench, bench_ops,
bench_model): one definition of how a kernel or an eager call is timed.

* :func:`time_ms`: median ms of eager calls (``triton.testing.do_bench`` on a GPU: host
  launch overhead included for kernels of a few microseconds; plain calls under the
  interpreter).
* :func:`time_graph_ms`: median ms of CUDA-graph replays (kernel time, no host overhead).
* :func:`synced_call_us`: median us of one eager call synchronised after each (host time
  plus the kernels; the host-overhead probes).
* :func:`with_backward`: a forward + backward call to time.
"""

from __future__ import annotations

import time
from typing import Callable

from . import _backend


def time_ms(fn: Callable, reps: int) -> float:
    """Median ms per eager call of ``fn`` (``reps``: ms budget on a GPU, runs on CPU)."""
    if _backend.interpreting():
        fn()
        times = []
        for _ in range(max(reps, 1)):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=max(reps, 20), return_mode="median")


def time_graph_ms(fn: Callable, reps: int) -> float:
    """GPU time of ``fn`` replayed from a CUDA graph (how engines run decode steps: no
    host launch overhead); the interpreter times plain calls."""
    if _backend.interpreting():
        return time_ms(fn, reps)
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=max(reps, 20), return_mode="median")


def synced_call_us(fn: Callable, reps: int, warmup: int = 20) -> float:
    """Median us of ``fn()`` followed by a device synchronize (none on the CPU), over
    ``reps`` calls after ``warmup``: a call's host time plus its kernels, one at a time."""
    import statistics

    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def with_backward(fn: Callable, dout, inputs) -> Callable:
    """A call of ``fn``'s forward and backward (``dout`` into its output; the gradients
    land in ``inputs``' ``.grad``, cleared first); returns the output."""
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(dout)
        return out
    return run


def fmt(x, spec):
    """``format(x, spec)``, or "n/a" for None."""
    return "n/a" if x is None else format(x, spec)
