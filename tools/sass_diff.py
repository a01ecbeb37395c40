"""Dump the sm_90 SASS of every kernel variant the compile check builds, or compare two dumps.

A kernel refactor that should change no instruction (shared helpers, named constants)
is proven by identical SASS, built on a machine without a GPU:

    python tools/sass_diff.py dump DIR [--jobs N]    # one .sass file per variant
    python tools/sass_diff.py diff DIR_A DIR_B       # which variants differ, and how

Variants are ``compile_check_sm90.variants(full=False)``, named by kernel and a hash of
their constexprs and build arguments, so the two dumps pair up by name.  The SASS is
``cuobjdump -sass`` of the cubin (triton's own binary), with the file header dropped.
``diff`` prints, per differing variant, the instruction counts that changed (spills show as
STL/LDL).  Exit status: 0 if every variant is identical.
"""

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compile_check_sm90 as cc  # noqa: E402


def _name(job) -> str:
    key = json.dumps(job, sort_keys=True, default=str)
    return f"{job[1] if job[0] == 'triton' else 'gluon_decode'}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _sass(job) -> str:
    import triton

    if job[0] != "triton":
        return ""            # the Gluon kernel is built by its own path; not compared here
    _, name, const, args, opts = job
    const = {k: cc._TL[v] if k == "COMPUTE_DTYPE" else v for k, v in const.items()}
    ck = cc.build(cc._KERNELS[name], const, *args, **opts)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    try:
        out = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if "Function" in line), 0)
    return "\n".join(lines[start:]) + "\n"


def _dump_one(args):
    job, out_dir = args
    path = os.path.join(out_dir, _name(job) + ".sass")
    text = _sass(job)
    if text:
        with open(path, "w") as f:
            f.write(text)
    return path if text else ""


def dump(out_dir: str, jobs: int) -> int:
    os.makedirs(out_dir, exist_ok=True)
    work = [(j, out_dir) for j in cc.variants(False) if j[0] == "triton"]
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method)) as pool:
            paths = list(pool.map(_dump_one, work))
    else:
        paths = [_dump_one(w) for w in work]
    print(f"wrote {sum(bool(p) for p in paths)} SASS files to {out_dir}")
    return 0


def _counts(text: str) -> collections.Counter:
    ops = collections.Counter()
    for line in text.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def diff(a: str, b: str) -> int:
    names = sorted(set(os.listdir(a)) | set(os.listdir(b)))
    differ = 0
    for n in names:
        pa, pb = os.path.join(a, n), os.path.join(b, n)
        if not (os.path.exists(pa) and os.path.exists(pb)):
            print(f"{n}: only in {'the first' if os.path.exists(pa) else 'the second'} dump")
            differ += 1
            continue
        ta, tb = open(pa).read(), open(pb).read()
        if ta == tb:
            continue
        differ += 1
        ca, cb = _counts(ta), _counts(tb)
        changed = {op: (ca[op], cb[op]) for op in sorted(set(ca) | set(cb)) if ca[op] != cb[op]}
        print(f"{n}: differs; {sum(ca.values())} -> {sum(cb.values())} instructions; changed counts {changed}")
    print(f"{len(names) - differ} of {len(names)} variants identical")
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("dir")
    d.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    c = sub.add_parser("diff")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    return dump(args.dir, args.jobs) if args.cmd == "dump" else diff(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
