"""Command line: ``bitstable verify``, ``bench``, ``demo`` and ``attention-experiment``
(also ``python -m bitstable``)."""

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
    v.add_argument("--checks", metavar="NAME,...",
                   help="run only these checks (comma list of run-to-run, batch, chunk, layout, "
                        "backward-run-to-run, backward-batch, decode, decode-batch, ops); default: all")
    b = sub.add_parser("bench", help="fwd, fwd+bwd, decode and ops speed vs stock (table, JSON, plot)")
    b.add_argument("--out", default="bench-results", help="folder for bench.json/.md/.png")
    b.add_argument("--shape", type=_shape, action="append", metavar="B,H,L,D",
                   help="a shape to time (repeatable); default: the four standard shapes")
    b.add_argument("--reps", type=int, default=100, help="timing budget (ms on GPU, runs on CPU)")
    b.add_argument("--passes", default="fwd,fwd+bwd,decode,ops",
                   help="comma list of fwd, fwd+bwd, dropout, decode, ops, model (dropout: opt-in, fwd+bwd "
                        "with dropout_p 0.1 next to SDPA's own dropout; model: opt-in, a Llama model's "
                        "training step, generation and host overhead, stock vs bitstable; features: opt-in, what a "
                        "learnable sink, a value head dim below the q/k one and rotary in decode each cost "
                        "over the same call without)")
    b.add_argument("--decode-batches", default="1,8,64", help="decode batch sizes (comma list)")
    b.add_argument("--decode-lengths", default="4096,16384,65536,131072",
                   help="decode KV-cache lengths (comma list)")
    b.add_argument("--mm-shape", type=_ints(3, "M,N,K"), action="append", metavar="M,N,K",
                   help="ops pass: a matmul shape (repeatable); default: decode, prefill and MLP shapes")
    b.add_argument("--row-shape", type=_ints(2, "ROWS,COLS"), action="append", metavar="ROWS,COLS",
                   help="ops pass: a softmax/norm shape (repeatable); default: LLM hidden sizes, a vocabulary")
    b.add_argument("--model-size", choices=["tiny", "1b"], default=None,
                   help="model pass: random-weight Llama size (default 1b on GPU, tiny on CPU)")
    b.add_argument("--model-train", type=_ints(2, "B,L"), action="append", metavar="B,L",
                   help="model pass: a training-step shape (repeatable); default 4,2048 and 16,512 (CPU 2,8)")
    b.add_argument("--model-batches", default=None, help="model pass: generation batch sizes (default 1,8,64; CPU 1,2)")
    b.add_argument("--model-prompt-len", type=int, default=None, help="model pass: prompt tokens (128 GPU / 8 CPU)")
    b.add_argument("--model-new-tokens", type=int, default=None, help="model pass: new tokens (64 GPU / 4 CPU)")
    b.add_argument("--model-runs", type=int, default=None,
                   help="model pass: identical timed runs per case, whose outputs are compared bitwise (3)")
    b.add_argument("--model-parts", default="train,compile,generate,overhead",
                   help="model pass: comma list of train (eager steps), compile (torch.compile steps), generate, "
                        "overhead")
    b.add_argument("--model-compile-mask", choices=["skip", "transformers"], default="skip",
                   help="model pass, compile rows: skip transformers' causal mask as eager does (default; "
                        "torch < 2.14 builds one under torch.compile) or keep the mask transformers builds")
    d = sub.add_parser("demo", help="deterministic generation end to end: unique completions, "
                                     "training = sampling, throughput (stock vs bitstable)")
    d.add_argument("--n", type=int, default=None, help="copies of the prompt (default 1000 on GPU, 8 on CPU)")
    d.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (64 GPU / 6 CPU)")
    d.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (32 GPU / 5 CPU)")
    d.add_argument("--max-batch", type=int, default=None, help="largest running batch (64 GPU / 8 CPU)")
    d.add_argument("--size", choices=["tiny", "1b"], default=None, help="random-weight model size")
    d.add_argument("--model-path", default=None, help="a local transformers checkpoint instead")
    d.add_argument("--implementation", choices=["stock", "bitstable", "both"], default="both")
    d.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    e = sub.add_parser("attention-experiment",
                       help="one sequence's attention output in batches of random others: unique outputs per batch size")
    e.add_argument("--implementation", choices=["standard", "bitstable", "both"], default="both")
    e.add_argument("--seq-len", type=int, default=None)
    e.add_argument("--num-heads", type=int, default=16)
    e.add_argument("--head-dim", type=int, default=64)
    e.add_argument("--num-iterations", type=int, default=10)
    e.add_argument("--batch-size", default=None, help="comma list of batch sizes")
    args = ap.parse_args(argv)

    import bitstable  # noqa: F401  (decides GPU vs interpreter before triton loads)

    if args.cmd == "verify":
        from .verify import CHECKS, run_verify

        checks = None
        if args.checks is not None:
            checks = [c for c in args.checks.split(",") if c]
            bad = [c for c in checks if c not in CHECKS]
            if bad or not checks:
                ap.error(f"--checks takes a comma list of {', '.join(CHECKS)}; got {args.checks!r}")
        return run_verify(args.json, checks=checks)
    from .. import _backend

    gpu = not _backend.interpreting()
    if args.cmd == "demo":
        import json

        from .demo import run_demo

        impls = ("bitstable", "stock") if args.implementation == "both" else (args.implementation,)

        def save(res):
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(device=_backend.describe(), results=res), f, indent=2)
        res = run_demo(n=args.n or (1000 if gpu else 8), new_tokens=args.new_tokens or (64 if gpu else 6),
                       prompt_len=args.prompt_len or (32 if gpu else 5), max_batch=args.max_batch or (64 if gpu else 8),
                       size=args.size or ("1b" if gpu else "tiny"), model_path=args.model_path,
                       implementations=impls, on_result=save)
        ok = "bitstable" not in res or (res["bitstable"]["unique"] == 1
                                         and res["bitstable"]["logprobs_equal"] == res["bitstable"]["sequences"])
        return 0 if ok else 1
    if args.cmd == "attention-experiment":
        from .demo import attention_experiment

        sizes = [int(x) for x in (args.batch_size or ("1,2,4,8,16,32" if gpu else "1,2,3")).split(",")]
        res = attention_experiment(args.implementation, seq_len=args.seq_len or (4096 if gpu else 40),
                                   num_heads=args.num_heads if gpu else min(args.num_heads, 2),
                                   head_dim=args.head_dim, num_iterations=args.num_iterations, batch_sizes=sizes)
        return 0 if all(v == 1 for v in res.get("bitstable", {}).values()) else 1
    from .bench import DEFAULT_SHAPES, run_bench

    passes = [p for p in args.passes.split(",") if p]
    bad = [p for p in passes if p not in ("fwd", "fwd+bwd", "dropout", "decode", "ops", "model", "features")]
    if bad:
        ap.error(f"--passes takes fwd, fwd+bwd, dropout, decode, ops, model and/or features, got {bad}")
    try:
        decode_sizes = dict(batches=[int(x) for x in args.decode_batches.split(",")],
                            lengths=[int(x) for x in args.decode_lengths.split(",")])
    except ValueError:
        ap.error("--decode-batches and --decode-lengths take comma lists of ints")
    ops_sizes = {k: v for k, v in (("matmul_shapes", args.mm_shape), ("row_shapes", args.row_shape)) if v}
    parts = [p for p in args.model_parts.split(",") if p]
    if any(p not in ("train", "compile", "generate", "overhead") for p in parts):
        ap.error(f"--model-parts takes train, compile, generate and/or overhead, got {parts}")
    try:
        batches = [int(x) for x in args.model_batches.split(",")] if args.model_batches else None
    except ValueError:
        ap.error("--model-batches takes a comma list of ints")
    model_sizes = dict(size=args.model_size, train_shapes=args.model_train, gen_batches=batches,
                       prompt_len=args.model_prompt_len, new_tokens=args.model_new_tokens, runs=args.model_runs,
                       parts=parts, compile_causal_mask=args.model_compile_mask)
    # the features pass: --shape's shapes where given (the value-dim rows keep D 192 / Dv 128)
    features_sizes = dict(shapes=args.shape) if args.shape else {}
    run_bench(args.out, shapes=args.shape or DEFAULT_SHAPES, reps=args.reps, passes=passes,
              decode_sizes=decode_sizes, ops_sizes=ops_sizes, model_sizes=model_sizes,
              features_sizes=features_sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
