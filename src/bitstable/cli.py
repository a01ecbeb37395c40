"""Command line: ``bitstable verify`` and ``bitstable bench`` (also ``python -m bitstable``)."""

from __future__ import annotations

import argparse
import sys


def _shape(text: str):
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--shape wants B,H,L,D (four ints), got {text!r}")
    return tuple(parts)


def _ints(n: int, what: str):
    def parse(text: str):
        try:
            parts = tuple(int(x) for x in text.split(","))
        except ValueError:
            parts = ()
        if len(parts) != n:
            raise argparse.ArgumentTypeError(f"wants {what} ({n} comma-separated ints), got {text!r}")
        return parts
    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bitstable", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="prove the invariance contract here, next to stock PyTorch")
    v.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b = sub.add_parser("bench", help="fwd, fwd+bwd, decode and ops speed vs stock (table, JSON, plot)")
    b.add_argument("--out", default="bench-results", help="folder for bench.json/.md/.png")
    b.add_argument("--shape", type=_shape, action="append", metavar="B,H,L,D",
                   help="a shape to time (repeatable); default: the four standard shapes")
    b.add_argument("--reps", type=int, default=100, help="timing budget (ms on GPU, runs on CPU)")
    b.add_argument("--passes", default="fwd,fwd+bwd,decode,ops", help="comma list of fwd, fwd+bwd, decode, ops")
    b.add_argument("--decode-batches", default="1,8,64", help="decode batch sizes (comma list)")
    b.add_argument("--decode-lengths", default="4096,16384,65536,131072",
                   help="decode KV-cache lengths (comma list)")
    b.add_argument("--mm-shape", type=_ints(3, "M,N,K"), action="append", metavar="M,N,K",
                   help="ops pass: a matmul shape (repeatable); default: decode, prefill and MLP shapes")
    b.add_argument("--row-shape", type=_ints(2, "ROWS,COLS"), action="append", metavar="ROWS,COLS",
                   help="ops pass: a softmax/norm shape (repeatable); default: LLM hidden sizes, a vocabulary")
    args = ap.parse_args(argv)

    import bitstable  # noqa: F401  (decides GPU vs interpreter before triton loads)

    if args.cmd == "verify":
        from .verify import run_verify

        return run_verify(args.json)
    from .bench import DEFAULT_SHAPES, run_bench

    passes = [p for p in args.passes.split(",") if p]
    bad = [p for p in passes if p not in ("fwd", "fwd+bwd", "decode", "ops")]
    if bad:
        ap.error(f"--passes takes fwd, fwd+bwd, decode and/or ops, got {bad}")
    try:
        decode_sizes = dict(batches=[int(x) for x in args.decode_batches.split(",")],
                            lengths=[int(x) for x in args.decode_lengths.split(",")])
    except ValueError:
        ap.error("--decode-batches and --decode-lengths take comma lists of ints")
    ops_sizes = {k: v for k, v in (("matmul_shapes", args.mm_shape), ("row_shapes", args.row_shape)) if v}
    run_bench(args.out, shapes=args.shape or DEFAULT_SHAPES, reps=args.reps, passes=passes,
              decode_sizes=decode_sizes, ops_sizes=ops_sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
