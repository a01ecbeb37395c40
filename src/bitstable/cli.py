"""Command line: ``bitstable verify`` and ``bitstable bench`` (also ``python -m bitstable``)."""

from __future__ import annotations

import argparse
import sys


def _shape(text: str):
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--shape wants B,H,L,D (four ints), got {text!r}")
    return tuple(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bitstable", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="prove the invariance contract here, next to stock PyTorch")
    v.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b = sub.add_parser("bench", help="fwd and fwd+bwd speed vs SDPA flash and cudnn (table, JSON, plot)")
    b.add_argument("--out", default="bench-results", help="folder for bench.json/.md/.png")
    b.add_argument("--shape", type=_shape, action="append", metavar="B,H,L,D",
                   help="a shape to time (repeatable); default: the four standard shapes")
    b.add_argument("--reps", type=int, default=100, help="timing budget (ms on GPU, runs on CPU)")
    b.add_argument("--passes", default="fwd,fwd+bwd,decode", help="comma list of fwd, fwd+bwd, decode")
    b.add_argument("--decode-batches", default="1,8,64", help="decode batch sizes (comma list)")
    b.add_argument("--decode-lengths", default="4096,16384,65536,131072",
                   help="decode KV-cache lengths (comma list)")
    args = ap.parse_args(argv)

    import bitstable  # noqa: F401  (decides GPU vs interpreter before triton loads)

    if args.cmd == "verify":
        from .verify import run_verify

        return run_verify(args.json)
    from .bench import DEFAULT_SHAPES, run_bench

    passes = [p for p in args.passes.split(",") if p]
    bad = [p for p in passes if p not in ("fwd", "fwd+bwd", "decode")]
    if bad:
        ap.error(f"--passes takes fwd, fwd+bwd and/or decode, got {bad}")
    try:
        decode_sizes = dict(batches=[int(x) for x in args.decode_batches.split(",")],
                            lengths=[int(x) for x in args.decode_lengths.split(",")])
    except ValueError:
        ap.error("--decode-batches and --decode-lengths take comma lists of ints")
    run_bench(args.out, shapes=args.shape or DEFAULT_SHAPES, reps=args.reps, passes=passes,
              decode_sizes=decode_sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
