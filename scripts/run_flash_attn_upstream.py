#!/usr/bin/env python3
"""Run flash-attn's own test file against bitstable, through an import shim.

    python3 scripts/run_flash_attn_upstream.py TEST_FILE --out DIR
        [--sample N] [--seed S] [--no-stratify] [--timeout SECONDS] [--workers W]
        [--per-test-timeout SECONDS] [--collect-only] [-- EXTRA PYTEST ARGS]

TEST_FILE is flash-attn's ``tests/test_flash_attn.py``, unmodified (it is not in this
repository: put it at ``.upstream/test_flash_attn.py``, untracked, so it travels to the
device with the working tree).  The runner puts ``scripts/flash_attn_shim`` (a package
named ``flash_attn`` that re-exports bitstable) first on ``PYTHONPATH``, then
``scripts/`` (the pytest plugin) and ``src/`` (bitstable), and runs pytest on the file
with the plugin ``flash_attn_upstream_plugin``: a deterministic sample of N cases
(hash of node id and seed, with a quota per test function), xdist workers where pytest-xdist is installed, and a
wall-clock bound (no case starts after ``timeout - grace``; pytest is killed at
``timeout - 5`` s if it has not ended, and what ran is still reported).

It writes to DIR:
* ``upstream_summary.json`` / ``upstream_summary.md``: counts (passed, failed, errors,
  skipped, not run by the deadline, not finished), failures classified by cause, the
  most frequent distinct error messages, and a table per test function;
* ``upstream_results.jsonl`` (every phase report), ``upstream_selected.json`` (the
  sample), ``upstream_pytest.log`` (pytest's output).

``--collect-only`` only collects (no GPU needed: a missing CUDA capability is stood
in), and writes ``upstream_selected.json`` and a short ``upstream_collection.md``.

Classification (:func:`classify`) reads the crash message, the case's parameters and
the test's name.  Missing features are recognised only from errors that say so
(NotImplementedError, an unexpected keyword, a TypeError/ValueError naming the feature,
or a NoneType error in a case that uses it); every AssertionError raised by the test
(a numerical or bitwise comparison) is an "accuracy mismatch", whatever the parameters.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
SHIM = SCRIPTS / "flash_attn_shim"
PLUGIN = "flash_attn_upstream_plugin"
INI = SCRIPTS / "flash_attn_upstream_pytest.ini"

sys.path.insert(0, str(SCRIPTS))
from flash_attn_upstream_plugin import DEADLINE_REASON, function_name  # noqa: E402

# ----------------------------------------------------------------------------- categories
DROPOUT = "dropout"
HEAD_DIM = "head dim"
ROTARY = "rotary"
PAGED = "paged/block_table"
LEFTPAD = "cache_leftpad"
ALIBI = "alibi"
SOFTCAP = "softcap"
NUM_SPLITS = "num_splits"
WINDOW = "window_size"
INTERNAL = "deterministic/internal"
ACCURACY = "accuracy mismatch"
OTHER = "other"
CATEGORIES = [DROPOUT, HEAD_DIM, ROTARY, PAGED, LEFTPAD, ALIBI, SOFTCAP, NUM_SPLITS, WINDOW,
              INTERNAL, ACCURACY, OTHER]

#: Upstream tests (at the pinned commit) that test flash-attn's own internals: its compiled
#: extension (``flash_attn_gpu``) or its private ``_flash_attn_varlen_forward``.
INTERNAL_TESTS = {"test_flash_attn_generator_arg_must_be_none",
                  "test_flash_attn_varlen_paged_kv_num_splits"}
#: Upstream tests that check that a bad call raises RuntimeError (``pytest.raises``).
EXPECTS_RUNTIME_ERROR = {"test_flash_attn_kvcache_paged_block_table_bounds"}
INTERNAL_NAMES = re.compile(r"flash_attn_gpu|flash_attn_2_cuda|\b_flash_attn_(varlen_)?(forward|backward)\b"
                            r"|cannot import name '_")

#: Keywords of flash-attn's API -> the feature they belong to.
KEYWORD_FEATURE = {
    "dropout_p": DROPOUT, "return_attn_probs": DROPOUT,
    "rotary_cos": ROTARY, "rotary_sin": ROTARY, "rotary_interleaved": ROTARY,
    "cache_leftpad": LEFTPAD, "num_splits": NUM_SPLITS, "block_table": PAGED,
    "softcap": SOFTCAP, "alibi_slopes": ALIBI, "window_size": WINDOW,
    "deterministic": INTERNAL,
}
#: Words in an error message -> the feature it is about, in order of precedence.
MESSAGE_FEATURE: List[Tuple[str, List[str]]] = [
    (DROPOUT, ["dropout"]),
    (ROTARY, ["rotary"]),
    (LEFTPAD, ["cache_leftpad", "leftpad"]),
    (NUM_SPLITS, ["num_splits"]),
    (PAGED, ["block_table", "paged", "page size", "page_size"]),
    (SOFTCAP, ["softcap"]),
    (ALIBI, ["alibi"]),
    (HEAD_DIM, ["head dim", "headdim", "head_dim", "multiple of 8"]),
    (WINDOW, ["window_size", "window size"]),
    (INTERNAL, ["deterministic"]),
]
#: Exception types that a missing feature or a rejected argument raises.
FEATURE_ERRORS = {"NotImplementedError", "TypeError", "ValueError", "AttributeError",
                  "ImportError", "ModuleNotFoundError", "RuntimeError"}


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v not in ("", "False", "None", "0", "0.0")
    return bool(v)


def _num(v, default=0.0) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def param_features(params: Optional[Dict[str, object]]) -> List[str]:
    """The features a case exercises, read from its parameters (in CATEGORIES order)."""
    p = params or {}
    out = []
    if _num(p.get("dropout_p")) > 0:
        out.append(DROPOUT)
    if "d" in p and int(_num(p["d"], 8)) % 8 != 0:
        out.append(HEAD_DIM)
    if _num(p.get("rotary_fraction")) > 0:
        out.append(ROTARY)
    if p.get("paged_kv_block_size") not in (None, "None"):
        out.append(PAGED)
    if _truthy(p.get("has_leftpad", False)):
        out.append(LEFTPAD)
    if _truthy(p.get("alibi", False)):
        out.append(ALIBI)
    if _num(p.get("softcap")) > 0:
        out.append(SOFTCAP)
    if "num_splits" in p:  # the kvcache test always passes num_splits=
        out.append(NUM_SPLITS)
    if _truthy(p.get("local", False)):  # a window given as a tensor
        out.append(WINDOW)
    return out


_ETYPE = re.compile(r"^\s*([A-Za-z_][\w.]*)(?::|$)")


def exception_type(message: str) -> str:
    """'NotImplementedError' from 'NotImplementedError: ...' (the last dotted part)."""
    m = _ETYPE.match(message or "")
    return m.group(1).rsplit(".", 1)[-1] if m else ""


def classify(message: str, params: Optional[Dict[str, object]] = None, test_name: str = "",
             crash_path: str = "", exc_type: str = "", test_path: str = "") -> Dict[str, str]:
    """Cause of one failure: ``{"category": ..., "basis": ...}`` (see the module docstring).

    ``message`` is the crash message (pytest's, which for a rewritten ``assert`` does not
    start with the exception's name); ``exc_type`` the exception's (qualified) class name
    where known, else it is read from the start of ``message``.  An AssertionError is an
    accuracy mismatch when it was raised in the test file (``test_path``; without it,
    anywhere outside bitstable's code).
    """
    message = message or ""
    etype = exc_type.rsplit(".", 1)[-1] if exc_type else exception_type(message)
    feats = param_features(params)
    if test_name in INTERNAL_TESTS:
        return {"category": INTERNAL, "basis": "the test exercises flash-attn internals"}
    if INTERNAL_NAMES.search(message):
        return {"category": INTERNAL, "basis": "needs a flash-attn internal the shim does not provide"}
    if etype == "Failed" or message.startswith("Failed"):
        if "Timeout" in message:
            return {"category": OTHER, "basis": "per-test timeout"}
        if "DID NOT RAISE" in message:
            return {"category": OTHER, "basis": "an expected error was not raised"}
        return {"category": OTHER, "basis": "pytest.fail"}
    if test_name in EXPECTS_RUNTIME_ERROR and etype in ("ValueError", "TypeError"):
        return {"category": OTHER, "basis": f"raised {etype} where the test expects RuntimeError"}
    if etype == "AssertionError":
        where = (crash_path or "").replace("\\", "/")
        outside = ("/bitstable/" in where if not test_path
                   else bool(where) and Path(where).name != Path(test_path).name)
        if outside:  # torch's "not compiled with CUDA", an assert in bitstable or the shim...
            tail = "/".join(where.split("/")[-3:])
            return {"category": OTHER, "basis": f"an assert outside the test file ({tail})"}
        what = ("bitwise comparison" if "torch.equal" in message or "deterministic" in test_name
                else "numerical comparison")
        return {"category": ACCURACY, "basis": what}
    if etype in FEATURE_ERRORS:
        m = re.search(r"unexpected keyword argument '(\w+)'", message)
        if m:
            kw = m.group(1)
            return {"category": KEYWORD_FEATURE.get(kw, OTHER), "basis": f"missing keyword {kw}"}
        low = message.lower()
        for cat, words in MESSAGE_FEATURE:
            for w in words:
                if w in low:
                    return {"category": cat, "basis": f"message names '{w}'"}
        if etype in ("NotImplementedError",) and feats:
            return {"category": feats[0], "basis": "NotImplementedError; parameters: " + ", ".join(feats)}
        if "NoneType" in message and DROPOUT in feats:
            # return_attn_probs gives no probability matrix: the test reads it under dropout only.
            return {"category": DROPOUT, "basis": "None where the test reads the dropout S matrix"}
        return {"category": OTHER, "basis": f"{etype} not naming a feature"}
    return {"category": OTHER, "basis": etype or "unrecognised failure"}


# ----------------------------------------------------------------------------- summary
_NUMBERS = re.compile(r"(?<![\w.])[-+]?\d+(\.\d+)?([eE][-+]?\d+)?")


def normalize_message(message: str, width: int = 220) -> str:
    """First line of a message, numbers replaced by N, cut to ``width``: groups alike errors."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else "(no message)"
    return _NUMBERS.sub("N", first)[:width]


def read_results(path: Path) -> Tuple[Dict[str, List[dict]], List[dict], Optional[int]]:
    per: Dict[str, List[dict]] = collections.OrderedDict()
    collect_errors: List[dict] = []
    exitstatus = None
    if not path.exists():
        return per, collect_errors, exitstatus
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        ev = rec.get("event")
        if ev == "report":
            per.setdefault(rec["nodeid"], []).append(rec)
        elif ev == "collect_error":
            collect_errors.append(rec)
        elif ev == "finish":
            exitstatus = rec.get("exitstatus")
    return per, collect_errors, exitstatus


def case_outcome(reports: List[dict]) -> Tuple[str, Optional[dict]]:
    """(outcome, the report that decided it) for one case's phase reports."""
    by = {r["when"]: r for r in reports}
    setup, call, teardown = by.get("setup"), by.get("call"), by.get("teardown")
    if setup is not None and setup["outcome"] == "failed":
        return "error", setup
    if setup is not None and setup["outcome"] == "skipped":
        return ("not_run" if setup.get("reason", "").endswith(DEADLINE_REASON)
                or DEADLINE_REASON in setup.get("reason", "") else "skipped"), setup
    if call is not None:
        if call["outcome"] == "failed":
            return "failed", call
        if call["outcome"] == "skipped":
            return ("xfailed" if "wasxfail" in call else "skipped"), call
        if teardown is not None and teardown["outcome"] == "failed":
            return "error", teardown
        return "passed", call
    return "not_finished", None


def summarize(out: Path, meta: dict) -> dict:
    per, collect_errors, exitstatus = read_results(out / "upstream_results.jsonl")
    sel_path = out / "upstream_selected.json"
    selected = json.loads(sel_path.read_text()) if sel_path.exists() else {}
    nodeids = selected.get("nodeids") or list(per)
    counts = collections.Counter()
    cats = collections.Counter()
    cat_basis: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    cat_example: Dict[str, dict] = {}
    feats_of_failures = collections.Counter()
    messages: Dict[str, dict] = {}
    per_fn: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    skip_reasons = collections.Counter()
    params_of = {}
    in_flight = []
    for nid in nodeids:
        reps = per.get(nid, [])
        outcome, rep = case_outcome(reps)
        counts[outcome] += 1
        if outcome == "not_finished" and reps:
            in_flight.append(nid)  # set up, never reported: running when pytest was stopped
        fn = function_name(nid)
        per_fn[fn][outcome] += 1
        params = next((r.get("params") for r in reps if r.get("params") is not None), None)
        params_of[nid] = params
        if outcome == "skipped":
            skip_reasons[normalize_message(rep.get("reason", ""))] += 1
        if outcome in ("failed", "error"):
            c = classify(rep.get("message", ""), params, fn, rep.get("crash_path", ""),
                         rep.get("exc_type", ""), meta.get("test_file", ""))
            cats[c["category"]] += 1
            per_fn[fn]["cat:" + c["category"]] += 1
            cat_basis[c["category"]][c["basis"]] += 1
            for f in param_features(params):
                feats_of_failures[f] += 1
            msg = rep.get("message", "") or ""
            etype = (rep.get("exc_type") or "").rsplit(".", 1)[-1]
            if etype and not msg.lstrip().startswith(etype) and etype != "Failed":
                msg = f"{etype}: {msg}"
            key = normalize_message(msg)
            m = messages.setdefault(key, {"message": key, "count": 0, "category": c["category"],
                                          "example": nid})
            m["count"] += 1
            cat_example.setdefault(c["category"], {"nodeid": nid, "message": key})
            failures.append({"nodeid": nid, "outcome": outcome, "when": rep.get("when"),
                             "category": c["category"], "basis": c["basis"],
                             "message": (rep.get("message") or "")[:600],
                             "crash_path": rep.get("crash_path"), "params": params,
                             "stdout_tail": (rep.get("stdout_tail") or "")[-600:]})
    summary = {
        "meta": meta,
        "pytest_exitstatus": exitstatus,
        "collected": selected.get("collected"),
        "selected": len(nodeids),
        "counts": {k: counts.get(k, 0) for k in
                   ("passed", "failed", "error", "skipped", "xfailed", "not_run", "not_finished")},
        "failure_categories": {k: cats.get(k, 0) for k in CATEGORIES if cats.get(k, 0)},
        "failure_category_basis": {k: dict(v.most_common()) for k, v in cat_basis.items()},
        "failure_category_example": cat_example,
        "features_exercised_by_failures": dict(feats_of_failures.most_common()),
        "top_messages": sorted(messages.values(), key=lambda m: -m["count"])[:20],
        "skip_reasons": dict(skip_reasons.most_common(10)),
        "per_function": {fn: dict(c) for fn, c in sorted(per_fn.items())},
        "collect_errors": collect_errors,
        "in_flight_when_stopped": in_flight,
        "failures": failures,
    }
    (out / "upstream_summary.json").write_text(json.dumps(summary, indent=1, default=repr))
    (out / "upstream_summary.md").write_text(render_md(summary))
    return summary


def render_md(s: dict) -> str:
    m = s["meta"]
    c = s["counts"]
    lines = ["# flash-attn upstream tests against bitstable", ""]
    lines += [f"- date: {m.get('date')}", f"- command: `{m.get('command')}`",
              f"- upstream: Dao-AILab/flash-attention @ {m.get('upstream_commit')}; test file "
              f"{m.get('test_file')} blob {m.get('test_blob')} "
              f"({'unmodified: matches the pinned blob' if m.get('test_unmodified') else 'DOES NOT match the pinned blob ' + str(m.get('pinned_blob'))})",
              f"- bitstable: {m.get('bitstable_rev')}; {m.get('env')}",
              f"- sample: {s['selected']} of {s.get('collected')} collected cases (seed {m.get('seed')}); "
              f"workers {m.get('workers')}; wall-clock bound {m.get('timeout')} s, ran {m.get('wall_s')} s"
              + ("; **stopped at the bound**" if m.get("hit_bound") else ""),
              f"- pytest exit status: {s.get('pytest_exitstatus')}", ""]
    ran = c["passed"] + c["failed"] + c["error"]
    lines += ["| passed | failed | errors | skipped | not run (bound) | not finished | pass rate of those run |",
              "|---|---|---|---|---|---|---|",
              f"| {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} | {c['not_run']} | "
              f"{c['not_finished']} | {(100.0 * c['passed'] / ran) if ran else 0:.1f}% of {ran} |", ""]
    if s["failure_categories"]:
        lines += ["## Failures (and errors) by cause", "",
                  "| cause | cases | on what basis | example |", "|---|---|---|---|"]
        for cat, n in s["failure_categories"].items():
            basis = "; ".join(f"{b} ({k})" for b, k in list(s["failure_category_basis"][cat].items())[:4])
            ex = s["failure_category_example"][cat]
            lines.append(f"| {cat} | {n} | {basis} | `{ex['nodeid'].split('::')[-1][:90]}` |")
        lines += ["", "An AssertionError raised by the test (a numerical or bitwise comparison) counts as "
                  "an accuracy mismatch whatever the case's parameters; a feature counts only when "
                  "the error names it (or is a NotImplementedError / a None probability matrix in a "
                  "case using it).", ""]
        lines += ["Features that the failing cases exercise (by parameters; a case can count "
                  "under several): " + ", ".join(f"{k} {v}" for k, v in
                                                 s["features_exercised_by_failures"].items()), ""]
        lines += ["## Most frequent error messages (numbers as N)", "", "| cases | cause | message |",
                  "|---|---|---|"]
        for msg in s["top_messages"][:15]:
            lines.append(f"| {msg['count']} | {msg['category']} | `{msg['message'].replace('|', '/')}` |")
        lines.append("")
    lines += ["## Per test function", "",
              "| function | passed | failed | errors | skipped | not run | causes |", "|---|---|---|---|---|---|---|"]
    for fn, cnt in s["per_function"].items():
        causes = ", ".join(f"{k[4:]} {v}" for k, v in cnt.items() if k.startswith("cat:"))
        lines.append(f"| {fn} | {cnt.get('passed', 0)} | {cnt.get('failed', 0)} | {cnt.get('error', 0)} | "
                     f"{cnt.get('skipped', 0)} | {cnt.get('not_run', 0) + cnt.get('not_finished', 0)} | {causes} |")
    lines.append("")
    if s["skip_reasons"]:
        lines += ["Skip reasons: " + "; ".join(f"{k} ({v})" for k, v in s["skip_reasons"].items()), ""]
    acc = [f for f in s["failures"] if f["category"] == ACCURACY]
    if acc:
        lines += ["## Accuracy mismatches", ""]
        lines += [f"- `{f['nodeid'].split('::')[-1]}`: {normalize_message(f['message'], 160)}" for f in acc[:40]]
        lines.append("")
    if s["in_flight_when_stopped"]:
        lines += ["Running when pytest was stopped: " + ", ".join(
            f"`{n.split('::')[-1]}`" for n in s["in_flight_when_stopped"][:20]), ""]
    if s["collect_errors"]:
        lines += ["## Collection errors", ""] + [f"- {e.get('nodeid')}: {normalize_message(e.get('message', ''))}"
                                                 for e in s["collect_errors"]] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running
def git_blob(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def pinned() -> Tuple[str, str]:
    text = (SHIM / "flash_attn" / "__init__.py").read_text()
    commit = re.search(r'UPSTREAM_COMMIT = "(\w+)"', text).group(1)
    blob = re.search(r'UPSTREAM_TEST_BLOB = "(\w+)"', text).group(1)
    return commit, blob


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def env_line() -> Tuple[str, bool]:
    code = ("import torch, triton; g = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA';"
            "print(f'torch {torch.__version__}, triton {triton.__version__}, {g}'); print(torch.cuda.is_available())")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        out = r.stdout.strip().splitlines()
        return (out[0], out[1] == "True") if len(out) >= 2 else ("torch/triton: unknown", False)
    except (OSError, subprocess.SubprocessError):
        return "torch/triton: unknown", False


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return (rev or "unknown") + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Arguments after -- go to pytest as they are.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("test_file", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sample", type=int, default=0, help="cases to run (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stratify", action="store_true",
                    help="sample the file as one group (default: a quota per test function)")
    ap.add_argument("--timeout", type=float, default=0, help="wall-clock bound of the whole run, s (0: none)")
    ap.add_argument("--workers", type=int, default=0,
                    help="pytest-xdist workers (0: 8 with CUDA and xdist, else 1)")
    ap.add_argument("--per-test-timeout", type=float, default=300,
                    help="pytest-timeout per case, s, where pytest-timeout is installed (0: off)")
    ap.add_argument("--collect-only", action="store_true", help="collect and sample only (no GPU needed)")
    args = list(argv) if argv is not None else sys.argv[1:]
    extra = args[args.index("--") + 1:] if "--" in args else []
    a = ap.parse_args(args[:args.index("--")] if "--" in args else args)
    a.pytest_args = extra

    t0 = time.time()
    test_file = a.test_file.resolve()
    if not test_file.is_file():
        print(f"error: test file {a.test_file} not found (flash-attn's tests/test_flash_attn.py; "
              f"see benchmarks/README.md)", file=sys.stderr)
        return 2
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("upstream_results.jsonl", "upstream_selected.json"):
        (out / name).unlink(missing_ok=True)
    commit, pinned_blob = pinned()
    blob = git_blob(test_file)
    env_desc, cuda = env_line()

    workers = a.workers or (8 if cuda else 1)
    use_xdist = workers > 1 and _has("xdist") and not a.collect_only
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM), str(SCRIPTS), str(REPO / "src")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRITON_CACHE_DIR", str(REPO / ".triton_cache"))
    grace = max(10.0, min(90.0, 0.15 * a.timeout)) if a.timeout else 0.0
    deadline = t0 + a.timeout - grace if a.timeout else 0.0
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-c", str(INI), "--rootdir", str(test_file.parent),
           "-p", PLUGIN, "-p", "no:cacheprovider", "-q", "-rN", "--tb=short",
           "--upstream-sample", str(a.sample), "--upstream-seed", str(a.seed),
           *(["--upstream-no-stratify"] if a.no_stratify else []),
           "--upstream-results", str(out / "upstream_results.jsonl"),
           "--upstream-selected", str(out / "upstream_selected.json")]
    if a.collect_only:
        cmd += ["--collect-only"]
        if not cuda:
            cmd += ["--upstream-fake-capability", "9.0"]
    else:
        cmd += ["--upstream-deadline", f"{deadline:.3f}"]
        if use_xdist:
            cmd += ["-n", str(workers)]
        if a.per_test_timeout and _has("pytest_timeout"):
            cmd += ["--timeout", str(a.per_test_timeout)]
    cmd += list(a.pytest_args)
    shown = ("python3 scripts/run_flash_attn_upstream.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])))
    print("running:", " ".join(shlex.quote(x) for x in cmd), flush=True)
    log_path = out / "upstream_pytest.log"
    hit_bound = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(test_file.parent), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        hard = (t0 + a.timeout - 5 - time.time()) if a.timeout else None
        try:
            rc = proc.wait(timeout=max(hard, 1.0) if hard is not None else None)
        except subprocess.TimeoutExpired:
            hit_bound = True
            for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)  # the process group this runner started
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    wall = time.time() - t0
    if a.collect_only:
        sel = json.loads((out / "upstream_selected.json").read_text()) if (out / "upstream_selected.json").exists() else {}
        md = [f"# flash-attn upstream collection through the shim", "",
              f"- upstream Dao-AILab/flash-attention @ {commit}; test blob {blob} "
              f"({'unmodified' if blob == pinned_blob else 'DOES NOT match the pinned ' + pinned_blob})",
              f"- {env_desc}; pytest exit {rc}",
              f"- collected {sel.get('collected')} cases, sample {sel.get('selected')} (seed {a.seed})", "",
              "| function | collected | selected |", "|---|---|---|"]
        md += [f"| {fn} | {v['collected']} | {v['selected']} |" for fn, v in sorted(sel.get("per_function", {}).items())]
        (out / "upstream_collection.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        if rc != 0:
            print(log_path.read_text()[-3000:])
        return 0 if rc == 0 and sel else 1
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": shown, "upstream_commit": commit, "test_file": str(a.test_file),
            "test_blob": blob, "pinned_blob": pinned_blob, "test_unmodified": blob == pinned_blob,
            "bitstable_rev": git_rev(), "env": env_desc, "seed": a.seed, "sample": a.sample,
            "workers": workers if use_xdist else 1, "timeout": a.timeout, "wall_s": round(wall, 1),
            "hit_bound": hit_bound, "pytest_returncode": rc}
    s = summarize(out, meta)
    print((out / "upstream_summary.md").read_text())
    ran = s["counts"]["passed"] + s["counts"]["failed"] + s["counts"]["error"]
    if rc not in (0, 1) and not hit_bound:
        print(log_path.read_text()[-3000:])
    # 0: the harness ran (whatever the tests gave); 1: nothing ran or pytest itself broke.
    return 0 if ran > 0 and (rc in (0, 1) or hit_bound) else 1


if __name__ == "__main__":
    sys.exit(main())
