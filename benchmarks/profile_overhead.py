#!/usr/bin/env python3
"""Where the host time of one eager call goes, for every case of the model pass's host-overhead
table (``bitstable bench --passes model --model-parts overhead``): cProfile of back-to-back calls.

    PYTHONPATH=src python benchmarks/profile_overhead.py [--out DIR] [--calls 300] [--case SUBSTR]

Per case: the median us per call of bitstable and of the stock call (synchronised after each,
tiny shapes, so host time dominates), then cProfile's top functions by own time and by
cumulative time, written to ``DIR/profile_<case>.txt``; the table prints last.  GPU or CPU
(under the interpreter the kernels run, so CPU numbers say little about launch cost).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from bitstable import _backend  # noqa: E402
from bitstable.timing import synced_call_us  # noqa: E402
from bitstable.cli.bench_model import CPU_OVERHEAD_SHAPES, GPU_OVERHEAD_SHAPES, _overhead_cases  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_us(fn, calls: int) -> float:
    return synced_call_us(fn, calls)


def _profile(fn, calls: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    _sync()
    prof.disable()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(40)
    return s.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "profile-out"))
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--case", default="", help="only cases whose name contains this")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    shapes = CPU_OVERHEAD_SHAPES if _backend.interpreting() else GPU_OVERHEAD_SHAPES
    rows = []
    for name, shape, ours, stock, ctx, _note in _overhead_cases(torch.bfloat16 if torch.cuda.is_available()
                                                                 else torch.float16, shapes):
        if args.case and args.case not in name:
            continue
        stock_us = _median_us(stock, args.calls)
        with ctx():
            ours_us = _median_us(ours, args.calls)
            text = _profile(ours, args.calls)
        fname = "profile_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".txt"
        with open(os.path.join(args.out, fname), "w") as f:
            f.write(f"{name} {shape}: bitstable {ours_us:.1f} us, stock {stock_us:.1f} us per call; "
                    f"cProfile of {args.calls} calls\n{text}")
        rows.append((name, shape, ours_us, stock_us))
        print(f"{name}: {ours_us:.1f} us vs {stock_us:.1f}", file=sys.stderr, flush=True)
    print("| case | shape | bitstable us | stock us | ratio |\n|---|---|---|---|---|")
    for name, shape, o, s in rows:
        print(f"| {name} | {shape} | {o:.1f} | {s:.1f} | {o / s:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
