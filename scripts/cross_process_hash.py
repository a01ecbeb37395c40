#!/usr/bin/env python3
"""Cross-process determinism: N fresh Python processes, one fixed workload, one hash.

Each child process (``--child``) builds fixed seeded inputs and runs
  * an attention forward + backward (``flash_attn_func``: out, lse, dq, dk, dv; causal, GQA),
  * the same with dropout 0.1 after ``torch.manual_seed(7)`` (the mask from the generator),
  * a KV-cache step (``flash_attn_with_kvcache``: append + decode over a batch, out and lse),
  * a batch-invariant matmul (``bitstable.ops.mm``, column-major b),
and prints the sha256 of each part's output bytes and of all of them together.  The parent
launches the children (``--jobs`` at a time, each with its own PYTHONHASHSEED), prints the
distinct hashes and exits 1 if there is more than one (or a child failed).

    python scripts/cross_process_hash.py --n 20        # real sizes on a GPU, tiny ones on CPU
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("attention", "dropout", "kvcache", "mm")


def _child() -> None:
    sys.path.insert(0, os.path.join(ROOT, "src"))
    import torch

    import bitstable
    from bitstable import flash_attn_func, flash_attn_with_kvcache, ops
    from bitstable._backend import interpreting, kernel_device_type

    dev = kernel_device_type()
    gpu = torch.cuda.is_available() and not interpreting()
    if gpu:
        B, L, Hq, Hk, D, dt = 4, 2048, 16, 4, 128, torch.bfloat16
        dec_B, dec_L, (M, K, N), split = 8, 4096, (2048, 4096, 4096), 1024
    else:
        B, L, Hq, Hk, D, dt = 1, 20, 2, 1, 16, torch.float16
        dec_B, dec_L, (M, K, N), split = 2, 24, (20, 24, 18), 16
    g = torch.Generator().manual_seed(1234)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dt).to(dev)

    digests = {}

    def digest(name, *tensors):
        h = hashlib.sha256()
        for t in tensors:
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        digests[name] = h.hexdigest()

    with bitstable.set_deterministic_mode(True, split_size=split):
        q = r(B, L, Hq, D).requires_grad_(True)
        k, v = r(B, L, Hk, D).requires_grad_(True), r(B, L, Hk, D).requires_grad_(True)
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), r(B, L, Hq, D))
        digest("attention", out, lse, dq, dk, dv)
        torch.manual_seed(7)
        out = flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
        digest("dropout", out, *torch.autograd.grad(out, (q, k, v), r(B, L, Hq, D)))

        lens = torch.randint(1, dec_L - 1, (dec_B,), generator=g).to(torch.int32)
        kc, vc = r(dec_B, dec_L, Hk, D), r(dec_B, dec_L, Hk, D)
        o, l_ = flash_attn_with_kvcache(r(dec_B, 1, Hq, D), kc, vc, k=r(dec_B, 1, Hk, D), v=r(dec_B, 1, Hk, D),
                                        cache_seqlens=lens.to(dev), causal=True, return_softmax_lse=True)
        digest("kvcache", o, l_, kc, vc)

        a, b = r(M, K), r(N, K).t()
        digest("mm", ops.mm(a, b))
    total = hashlib.sha256("".join(digests[p] for p in PARTS).encode()).hexdigest()
    for p in PARTS:
        print(f"{p} {digests[p]}")
    print(f"total {total}")


def _launch(i: int):
    env = dict(os.environ, PYTHONHASHSEED=str(i + 1),
               PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    lines = dict(ln.split(" ", 1) for ln in p.stdout.splitlines() if ln.count(" ") == 1)
    return i, p.returncode, lines, p.stderr, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="processes (default 20)")
    ap.add_argument("--jobs", type=int, default=0,
                    help="processes at a time (default: min(n, CPU cores), at most 4 with a GPU)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child()
        return 0
    # Default concurrency without importing torch here (seconds of CPU on small machines).
    gpu = os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")
    jobs = args.jobs or max(1, min(args.n, os.cpu_count() or 1, 4 if gpu else 64))
    t0 = time.perf_counter()
    seen, failed = {}, 0
    with ThreadPoolExecutor(jobs) as pool:
        for i, rc, lines, err, secs in pool.map(_launch, range(args.n)):
            if rc != 0 or "total" not in lines:
                failed += 1
                print(f"process {i}: FAILED (exit {rc})\n{err[-3000:]}", file=sys.stderr)
                continue
            key = tuple(lines[p] for p in PARTS + ("total",))
            seen.setdefault(key, []).append(i)
            print(f"process {i}: {lines['total'][:16]}  ({secs:.1f} s)", file=sys.stderr, flush=True)
    print(f"{args.n} processes, {len(seen)} distinct hash{'es' if len(seen) != 1 else ''}, {failed} failed "
          f"({time.perf_counter() - t0:.1f} s)")
    for key, procs in seen.items():
        print(f"  total {key[-1]}  processes {procs}")
        for p, h in zip(PARTS, key):
            print(f"    {p:9s} {h}")
    return 0 if len(seen) == 1 and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
