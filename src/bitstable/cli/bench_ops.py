"""``bitstable bench --passes ops``: the batch-invariant ops next to stock PyTorch, in one process.

Kernel times are CUDA-graph replays (an eager call of a few-microsecond kernel
measures host launch overhead: Triton's Python launcher is slower than cuBLAS's);
the eager ratio is reported next to them.  Matmul (bf16) against ``torch.mm`` (cuBLAS) at decode shapes (M = 1..64) and
prefill/training shapes (M >= 256, and 8192^3); softmax, log-softmax, layer norm
and RMS norm against the stock ATen kernels at LLM shapes.  The stock side runs
outside ``set_batch_invariant_mode`` (plain cuBLAS / ATen).  Ratios > 1 mean
bitstable is faster.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .. import _backend

#: (M, N, K): decode rows, prefill rows, the 8192^3 square, MLP up/down shapes.
MATMUL_SHAPES: List[Tuple[int, int, int]] = (
    [(m, 4096, 4096) for m in (1, 8, 32, 64, 256, 1024, 4096)]
    + [(8192, 8192, 8192), (1, 14336, 4096), (64, 14336, 4096), (4096, 14336, 4096),
       (1, 4096, 14336), (64, 4096, 14336), (4096, 4096, 14336)])
#: Operand layouts of ``a [M, K] @ b [K, N]``: "x@W^T" (b = weight.t(), column-major: a
#: linear layer's forward), "x@W" (b row-major: ``x @ W``, ``p @ v``, dX = dY @ W in a
#: linear layer's backward), "x^T@y" (a column-major, b row-major: dW = dY^T @ X).
MATMUL_LAYOUTS: Tuple[str, ...] = ("x@W^T", "x@W", "x^T@y")


def matmul_operands(layout: str, M: int, N: int, K: int, dtype, device, g):
    """(a [M, K], b [K, N]) in ``layout`` (values random)."""
    a = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    if layout == "x^T@y":
        a = torch.randn(K, M, device=device, dtype=dtype, generator=g).t()
    if layout == "x@W^T":
        b = torch.randn(N, K, device=device, dtype=dtype, generator=g).t()
    else:
        b = torch.randn(K, N, device=device, dtype=dtype, generator=g)
    return a, b


#: (rows, cols) for the row-wise kernels: hidden sizes and a vocabulary.
ROW_SHAPES: List[Tuple[int, int]] = [(4096, 4096), (16384, 8192), (1024, 128256)]


def _time(fn: Callable, reps: int) -> float:
    """Kernel time: CUDA-graph replays on the GPU (no host launch overhead, which for
    kernels of a few microseconds would measure the CPU, not the kernel)."""
    from ..timing import time_graph_ms

    return time_graph_ms(fn, reps)


def _time_eager(fn: Callable, reps: int) -> float:
    from ..timing import time_ms

    return time_ms(fn, reps)


def bench_ops(matmul_shapes: Sequence[Tuple[int, int, int]] = MATMUL_SHAPES,
              row_shapes: Sequence[Tuple[int, int]] = ROW_SHAPES, dtype=torch.bfloat16,
              reps: int = 100, stream=sys.stdout,
              layouts: Sequence[str] = MATMUL_LAYOUTS) -> List[Dict]:
    """Rows of dict(op, shape, bitstable_ms, stock_ms, ratio_vs_stock, tflops or gbs); matmul
    rows once per operand layout (``layout``: see :data:`MATMUL_LAYOUTS`)."""
    from .. import ops

    device = _backend.kernel_device_type()
    g = torch.Generator(device=device).manual_seed(0)
    rows: List[Dict] = []
    t0 = time.time()
    n_cases = len(matmul_shapes) * len(layouts) + 4 * len(row_shapes)
    i = 0
    for M, N, K in matmul_shapes:
        for layout in layouts:
            i += 1
            print(f"[ops {i}/{n_cases}] mm {layout} M={M} N={N} K={K} ({time.time() - t0:.0f}s)",
                  file=stream, flush=True)
            a, b = matmul_operands(layout, M, N, K, dtype, device, g)
            if not _backend.interpreting():
                torch.cuda.synchronize()
            ours = _time(lambda: ops.mm(a, b), reps)
            stock = _time(lambda: torch.mm(a, b), reps)
            ours_eager = _time_eager(lambda: ops.mm(a, b), reps)
            stock_eager = _time_eager(lambda: torch.mm(a, b), reps)
            flops = 2.0 * M * N * K
            byts = (M * K + N * K + M * N) * a.element_size()
            rows.append(dict(op="mm", layout=layout, shape=f"{M}x{N}x{K}", bitstable_ms=ours,
                             stock_ms=stock, ratio_vs_stock=stock / ours,
                             bitstable_tflops=flops / ours / 1e9, stock_tflops=flops / stock / 1e9,
                             bitstable_gbs=byts / ours / 1e6, bitstable_eager_ms=ours_eager,
                             stock_eager_ms=stock_eager, ratio_eager=stock_eager / ours_eager))
            del a, b
    for R, C in row_shapes:
        x = torch.randn(R, C, device=device, dtype=dtype, generator=g)
        w = torch.randn(C, device=device, dtype=dtype, generator=g)
        cases = [
            ("softmax", lambda: ops.softmax(x, -1), lambda: torch.softmax(x, -1)),
            ("log_softmax", lambda: ops.log_softmax(x, -1), lambda: torch.log_softmax(x, -1)),
            ("layer_norm", lambda: ops.layer_norm(x, (C,), w, w),
             lambda: torch.nn.functional.layer_norm(x, (C,), w, w)),
            ("rms_norm", lambda: ops.rms_norm(x, (C,), w), lambda: torch.nn.functional.rms_norm(x, (C,), w)),
        ]
        for name, fn_ours, fn_stock in cases:
            i += 1
            print(f"[ops {i}/{n_cases}] {name} {R}x{C} ({time.time() - t0:.0f}s)", file=stream, flush=True)
            ours = _time(fn_ours, reps)
            stock = _time(fn_stock, reps)
            ours_eager, stock_eager = _time_eager(fn_ours, reps), _time_eager(fn_stock, reps)
            byts = 2 * x.numel() * x.element_size()
            rows.append(dict(op=name, shape=f"{R}x{C}", bitstable_ms=ours, stock_ms=stock,
                             ratio_vs_stock=stock / ours, bitstable_gbs=byts / ours / 1e6,
                             bitstable_eager_ms=ours_eager, stock_eager_ms=stock_eager,
                             ratio_eager=stock_eager / ours_eager))
        del x, w
    return rows


def ops_table(rows: List[Dict]) -> str:
    """Markdown table of ops rows (ratio > 1: bitstable faster than stock).  Kernel times are
    CUDA-graph replays; the eager ratio includes each library's host launch overhead."""
    from ..timing import fmt as _fmt

    lines = ["| op | layout | shape | bitstable ms | stock ms | vs stock | bitstable TFLOP/s | stock TFLOP/s | bitstable GB/s "
             "| eager vs stock |",
             "|" + "|".join(["---"] * 10) + "|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r.get('layout', '')} | {r['shape']} | {_fmt(r['bitstable_ms'], '.4f')} | {_fmt(r['stock_ms'], '.4f')} "
                     f"| {_fmt(r['ratio_vs_stock'], '.2f')}x | {_fmt(r.get('bitstable_tflops'), '.0f')} "
                     f"| {_fmt(r.get('stock_tflops'), '.0f')} | {_fmt(r.get('bitstable_gbs'), '.0f')} "
                     f"| {_fmt(r.get('ratio_eager'), '.2f')}x |")
    return "\n".join(lines)


def plot_ops(rows: List[Dict], ax) -> None:
    """Bars of bitstable's speed as a ratio to stock per op and shape (1.0 = parity)."""
    labels = [f"{r['op']} {r.get('layout', '')}\n{r['shape']}" for r in rows]
    vals = [r["ratio_vs_stock"] or 0.0 for r in rows]
    ax.bar(range(len(rows)), vals, color=["tab:blue" if r["op"] == "mm" else "tab:green" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("speed vs stock (ops)")
