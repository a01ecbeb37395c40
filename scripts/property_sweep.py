#!/usr/bin/env python3
"""Run N random configurations of every invariance property, count violations.

The properties (drawing and checking) are those of ``tests/test_properties.py``; here
configurations are drawn from a seeded ``random.Random`` instead of hypothesis, so
every configuration is reproducible from (seed, property, index) and from the config
dict stored with each failure.  Sizes: the GPU profile on a GPU, the CPU profile under
Triton's interpreter (``--profile`` forces one).

    python scripts/property_sweep.py --n 1000 --out sweep.json
    python scripts/property_sweep.py --n 50 --properties varlen,prefill_decode --jobs 4
    python scripts/property_sweep.py --replay '{"property": "varlen", "config": {...}}'

Progress goes to stderr; the table to stdout; JSON (rewritten as the sweep goes) to
``--out``.  Exit status: 0 if every configuration held, 1 on a violation or a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "src"), os.path.join(ROOT, "tests")]


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="configurations per property (default 100)")
    ap.add_argument("--total", type=int, default=0,
                    help="configurations in all, split evenly over the properties (overrides --n)")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="stop starting new configurations after this many seconds (0: none); "
                         "configurations run round-robin over the properties, so a cut run stays balanced")
    ap.add_argument("--seed", type=int, default=0, help="sweep seed (default 0)")
    ap.add_argument("--properties", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--profile", choices=("cpu", "gpu"), default=None,
                    help="size profile (default: gpu on a GPU, else cpu)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes (CPU sweeps; keep 1 on one GPU)")
    ap.add_argument("--out", default="", help="write results as JSON here")
    ap.add_argument("--max-failures", type=int, default=50,
                    help="failing configs kept per property in the JSON (default 50)")
    ap.add_argument("--replay", default="",
                    help='run one config: JSON {"property": name, "config": {...}} (or @file)')
    ap.add_argument("--list", action="store_true", help="list the properties and exit")
    return ap.parse_args(argv)


def _load(profile):
    if profile:
        os.environ["BITSTABLE_PROPERTY_PROFILE"] = profile
    import test_properties as tp  # noqa: E402  (after sys.path and the profile variable)

    return tp


def _config(tp, name: str, seed: int, i: int) -> dict:
    rng = random.Random(f"{seed}:{name}:{i}")
    return tp.PROPERTIES[name].draw(tp.RandomDraw(rng), tp.PROFILE)


def _run_one(tp, name: str, cfg: dict):
    """('ok' | 'violation' | 'error', message, seconds)."""
    t0 = time.perf_counter()
    try:
        tp.run_property(name, cfg)
        status, msg = "ok", ""
    except AssertionError as e:
        status, msg = "violation", str(e)
    except Exception as e:  # a crash is a finding too: keep going
        status, msg = "error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}\nconfig={cfg!r}"
    return status, msg, time.perf_counter() - t0


# --- worker processes (--jobs > 1) ---------------------------------------------------

_TP = None


def _worker_init(profile):
    global _TP
    _TP = _load(profile)


def _worker_task(task):
    name, seed, i = task
    cfg = _config(_TP, name, seed, i)
    status, msg, secs = _run_one(_TP, name, cfg)
    return name, i, cfg, status, msg, secs


def _table(results, names) -> str:
    rows = [("property", "configs", "violations", "errors", "seconds", "s/config")]
    for name in names:
        r = results[name]
        n = r["configs"]
        rows.append((name, str(n), str(r["violations"]), str(r["errors"]), f"{r['seconds']:.1f}",
                     f"{r['seconds'] / n:.2f}" if n else "-"))
    tot = [sum(results[n][k] for n in names) for k in ("configs", "violations", "errors", "seconds")]
    rows.append(("TOTAL", str(tot[0]), str(tot[1]), str(tot[2]), f"{tot[3]:.1f}",
                 f"{tot[3] / tot[0]:.2f}" if tot[0] else "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]

    def fmt(row):
        return "  ".join(x.ljust(w) if c == 0 else x.rjust(w) for c, (x, w) in enumerate(zip(row, widths)))

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:-1]]
    return "\n".join(lines + ["  ".join("-" * w for w in widths), fmt(rows[-1])])


def main(argv=None) -> int:
    args = _args(argv)
    tp = _load(args.profile)
    if args.list:
        for name, p in tp.PROPERTIES.items():
            print(f"{name}: {(p.check.__doc__ or '').split(chr(10))[0]}")
        return 0
    if args.replay:
        spec = args.replay
        if spec.startswith("@"):
            with open(spec[1:]) as f:
                spec = f.read()
        spec = json.loads(spec)
        status, msg, secs = _run_one(tp, spec["property"], spec["config"])
        print(f"{spec['property']}: {status} ({secs:.1f} s)")
        if msg:
            print(msg)
        return 0 if status == "ok" else 1

    names = [n for n in (args.properties.split(",") if args.properties else tp.PROPERTIES) if n]
    unknown = [n for n in names if n not in tp.PROPERTIES]
    if unknown:
        print(f"unknown properties {unknown}; known: {list(tp.PROPERTIES)}", file=sys.stderr)
        return 2
    if args.total:
        args.n = -(-args.total // len(names))
    from bitstable._backend import describe

    meta = {"device": describe(), "profile": tp.PROFILE.name, "sizes": dataclasses.asdict(tp.PROFILE),
            "scale": float(os.environ.get("BITSTABLE_PROPERTY_SCALE", "1")), "n": args.n, "seed": args.seed,
            "jobs": args.jobs, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import subprocess

        meta["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()
    except Exception:
        pass
    print(f"property sweep: {meta['device']}, profile {meta['profile']}, {args.n} configs per "
          f"property, seed {args.seed}", file=sys.stderr)
    results = {n: {"configs": 0, "violations": 0, "errors": 0, "seconds": 0.0, "failures": []}
               for n in names}
    t_start = time.perf_counter()
    last_write = [0.0]

    def write(final=False):
        if not args.out or (not final and time.perf_counter() - last_write[0] < 30):
            return
        last_write[0] = time.perf_counter()
        data = dict(meta, ok=all(r["violations"] == r["errors"] == 0 for r in results.values()),
                    finished=final, wall_seconds=time.perf_counter() - t_start, properties=results)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, args.out)

    def record(name, i, cfg, status, msg, secs):
        r = results[name]
        r["configs"] += 1
        r["seconds"] += secs
        if status != "ok":
            r["violations" if status == "violation" else "errors"] += 1
            if len(r["failures"]) < args.max_failures:
                r["failures"].append({"index": i, "status": status, "config": cfg, "message": msg[:4000],
                                      "replay": tp.replay_command(name, cfg)})
            first = msg.splitlines()[0] if msg else ""
            print(f"  [{name} #{i}] {status.upper()}: {first}\n    {tp.replay_command(name, cfg)}",
                  file=sys.stderr, flush=True)
        every = max(1, args.n // 20)
        if r["configs"] % every == 0 or r["configs"] == args.n:
            el = time.perf_counter() - t_start
            done = sum(x["configs"] for x in results.values())
            print(f"[{name}] {r['configs']}/{args.n}  violations {r['violations']}  errors {r['errors']}  "
                  f"({r['seconds']:.0f} s in this property; all: {done}/{len(tasks)} configs, {el:.0f} s)",
                  file=sys.stderr, flush=True)
        write()

    # round-robin: the i-th configuration of every property before the (i+1)-th of any
    tasks = [(name, args.seed, i) for i in range(args.n) for name in names]
    if args.total:
        tasks = tasks[:args.total]
    expired = lambda: args.time_limit and time.perf_counter() - t_start > args.time_limit  # noqa: E731
    if args.jobs <= 1:
        for name, s, i in tasks:
            if expired():
                break
            cfg = _config(tp, name, s, i)
            record(name, i, cfg, *_run_one(tp, name, cfg))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        todo, running = iter(tasks), set()
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(args.profile,)) as pool:
            while True:
                while len(running) < 2 * args.jobs and not expired():
                    task = next(todo, None)
                    if task is None:
                        break
                    running.add(pool.submit(_worker_task, task))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    record(*fut.result())
    if expired():
        meta["stopped_by_time_limit"] = True
        print(f"time limit {args.time_limit:.0f} s reached: stopped early", file=sys.stderr)
    write(final=True)
    print(_table(results, names))
    print(f"wall time {time.perf_counter() - t_start:.1f} s; device: {meta['device']}; profile {meta['profile']}")
    bad = sum(r["violations"] + r["errors"] for r in results.values())
    if bad:
        print(f"{bad} configuration(s) failed; replay commands in the log above"
              + (f" and in {args.out}" if args.out else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
