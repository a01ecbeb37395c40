"""pytest plugin of the flash-attn upstream harness (``scripts/run_flash_attn_upstream.py``).

Loaded with ``-p flash_attn_upstream_plugin`` (``scripts/`` on ``PYTHONPATH``).  It

* samples the collected cases deterministically: each case's key is a hash of the
  seed and its node id without the file part (``test_fn[params]``); each test
  function gets a quota of the ``N`` cases (a floor for every function, so the rare
  ones are represented, the rest in proportion to their size: :func:`quotas`) and
  keeps its cases of smallest key, in collection order.  The sample depends only on
  the seed, ``N`` and the test file, not on where the file lies or on collection
  order, and every xdist worker selects the same cases;
* stops at a wall-clock deadline: a case whose setup starts after it is skipped with
  :data:`DEADLINE_REASON` (the summary counts those as not run);
* records every phase report (setup/call/teardown) as one JSON line, written and
  flushed as reports arrive on the controller, so a run killed at its time limit
  still leaves what ran: node id, outcome, duration, the case's parameters, and for
  a failure the crash message and where it was raised;
* for ``--collect-only`` on a machine without CUDA, can stand in a device capability
  (the upstream module calls ``torch.cuda.get_device_capability`` at import).

The sampler (:func:`sample_key`, :func:`select`) has no pytest dependency and is
tested by tests/test_upstream_harness.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Dict, Iterable, List, Sequence

import pytest

#: The skip reason of cases that the deadline left unrun.
DEADLINE_REASON = "bitstable upstream harness: wall-clock bound reached, not run"
#: user_properties key carrying the case's parameters (JSON text) to the controller.
PARAMS_KEY = "upstream_params"


# --------------------------------------------------------------------------- sampler
def case_id(nodeid: str) -> str:
    """The part of a node id that names the case inside its file: ``test_fn[params]``."""
    return nodeid.split("::", 1)[1] if "::" in nodeid else nodeid


def function_name(nodeid: str) -> str:
    """The test function of a node id (its case id without parameters)."""
    return case_id(nodeid).split("[", 1)[0]


def sample_key(nodeid: str, seed: int) -> int:
    """Deterministic sort key of one case for ``seed`` (sha256 of seed and case id)."""
    digest = hashlib.sha256(f"{int(seed)}\0{case_id(nodeid)}".encode()).hexdigest()
    return int(digest[:16], 16)


def quotas(counts: Dict[str, int], n: int) -> Dict[str, int]:
    """Cases to take from each group (test function) for a sample of ``n``.

    Every group first gets ``max(1, n // (3 * groups))`` cases (or all it has), so that
    the rare test functions are represented; the rest of ``n`` is shared in proportion
    to what each group has left (largest remainder, ties by name).  ``n <= 0`` or
    ``n >= total`` takes everything.
    """
    total = sum(counts.values())
    if n <= 0 or n >= total:
        return dict(counts)
    names = sorted(counts)
    floor = max(1, n // (3 * max(1, len(names))))
    q = {g: min(counts[g], floor) for g in names}
    while sum(q.values()) > n:  # more groups than n: the largest groups keep a case
        g = max((g for g in names if q[g] > 0), key=lambda g: (-counts[g], g))
        q[g] -= 1
    left = n - sum(q.values())
    room = {g: counts[g] - q[g] for g in names}
    pool = sum(room.values())
    if left > 0 and pool > 0:
        share = {g: left * room[g] / pool for g in names}
        for g in names:
            q[g] += int(share[g])
        rest = n - sum(q.values())
        order = sorted(names, key=lambda g: (-(share[g] - int(share[g])), g))
        for g in order:
            if rest <= 0:
                break
            if q[g] < counts[g]:
                q[g] += 1
                rest -= 1
    return q


def select(nodeids: Sequence[str], n: int, seed: int, stratify: bool = True) -> List[str]:
    """A deterministic sample of ``n`` cases, in their original order.

    Within a group the cases of smallest :func:`sample_key` are taken.  With
    ``stratify`` the groups are the test functions, with :func:`quotas`; without it,
    the whole file is one group.  ``n <= 0`` or ``n >= len(nodeids)`` keeps every case.
    The result for a given (set of node ids, n, seed, stratify) does not depend on the
    order of ``nodeids``.
    """
    if n <= 0 or n >= len(nodeids):
        return list(nodeids)
    groups: Dict[str, List[str]] = {}
    for i in nodeids:
        groups.setdefault(function_name(i) if stratify else "", []).append(i)
    q = quotas({g: len(v) for g, v in groups.items()}, n)
    keep = set()
    for g, members in groups.items():
        ranked = sorted(members, key=lambda i: (sample_key(i, seed), case_id(i)))
        keep.update(ranked[:q[g]])
    return [i for i in nodeids if i in keep]


def jsonable_params(params: Dict[str, object]) -> Dict[str, object]:
    """Parameters as JSON values: numbers, strings, bools and None as is, the rest repr'd."""
    out = {}
    for k, v in params.items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        else:
            out[k] = repr(v)
    return out


# --------------------------------------------------------------------------- options
def pytest_addoption(parser):
    g = parser.getgroup("bitstable-upstream", "bitstable: flash-attn upstream harness")
    g.addoption("--upstream-sample", type=int, default=0,
                help="run this many cases, sampled by hash of seed and node id (0: all)")
    g.addoption("--upstream-seed", type=int, default=0, help="seed of the sample")
    g.addoption("--upstream-no-stratify", action="store_true",
                help="sample the file as one group (default: a quota per test function)")
    g.addoption("--upstream-deadline", type=float, default=0.0,
                help="epoch seconds after which no further case starts (0: none)")
    g.addoption("--upstream-results", default=None, help="JSON-lines file of every report")
    g.addoption("--upstream-selected", default=None,
                help="JSON file: collected count, sample parameters and the selected node ids")
    g.addoption("--upstream-fake-capability", default=None,
                help="MAJOR.MINOR: answer torch.cuda.get_device_capability with this when "
                     "CUDA is unavailable (collection on a CPU machine only)")


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    cap = config.getoption("--upstream-fake-capability")
    if cap:
        import torch

        if not torch.cuda.is_available():
            major, minor = (int(x) for x in str(cap).split("."))
            torch.cuda.get_device_capability = lambda device=None: (major, minor)
    path = config.getoption("--upstream-results")
    if path and not _is_worker(config):
        config._upstream_results = open(path, "a", buffering=1)  # noqa: SIM115 (closed at unconfigure)
        _write(config, {"event": "start", "time": time.time(), "pid": os.getpid()})


def pytest_unconfigure(config):
    fh = getattr(config, "_upstream_results", None)
    if fh is not None:
        fh.close()
        config._upstream_results = None


def _write(config, rec):
    fh = getattr(config, "_upstream_results", None)
    if fh is not None:
        fh.write(json.dumps(rec, default=repr) + "\n")
        fh.flush()


# --------------------------------------------------------------------------- sampling
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    n = config.getoption("--upstream-sample")
    seed = config.getoption("--upstream-seed")
    ids = [it.nodeid for it in items]
    stratify = not config.getoption("--upstream-no-stratify")
    keep = set(select(ids, n, seed, stratify))
    kept = [it for it in items if it.nodeid in keep]
    dropped = [it for it in items if it.nodeid not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    path = config.getoption("--upstream-selected")
    worker = getattr(config, "workerinput", {}).get("workerid") if _is_worker(config) else None
    if path and worker in (None, "gw0"):
        per_fn: Dict[str, Dict[str, int]] = {}
        for i in ids:
            per_fn.setdefault(function_name(i), {"collected": 0, "selected": 0})["collected"] += 1
        for it in kept:
            per_fn[function_name(it.nodeid)]["selected"] += 1
        with open(path, "w") as fh:
            json.dump({"collected": len(ids), "selected": len(kept), "sample": n, "seed": seed,
                       "stratify": stratify,
                       "per_function": per_fn, "nodeids": [it.nodeid for it in kept]}, fh, indent=1)


# --------------------------------------------------------------------------- running
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    callspec = getattr(item, "callspec", None)
    params = jsonable_params(dict(callspec.params)) if callspec is not None else {}
    if not any(k == PARAMS_KEY for k, _ in item.user_properties):
        item.user_properties.append((PARAMS_KEY, json.dumps(params)))
    deadline = item.config.getoption("--upstream-deadline")
    if deadline and time.time() > deadline:
        pytest.skip(DEADLINE_REASON)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.excinfo is not None and rep.failed:
        t = call.excinfo.type
        # A plain string attribute travels with the report to xdist's controller.
        rep.upstream_exc_type = f"{t.__module__}.{t.__qualname__}"


def _crash(report):
    """(message, path, lineno) of a failed report's crash, as well as can be read."""
    lr = report.longrepr
    crash = getattr(lr, "reprcrash", None)
    if crash is not None:
        return str(crash.message), str(getattr(crash, "path", "")), getattr(crash, "lineno", None)
    text = str(lr) if lr is not None else ""
    return text[-4000:], "", None


def _exc_lines(report, limit=12) -> List[str]:
    """The 'E   ...' lines of the traceback's last entry (the exception as pytest shows it)."""
    text = str(report.longrepr) if report.longrepr is not None else ""
    lines = [ln[4:] if ln.startswith("E   ") else ln[1:].lstrip() for ln in text.splitlines()
             if ln.startswith("E ")]
    return lines[-limit:]


def pytest_runtest_logreport(report):
    config = getattr(report, "_upstream_config", None) or _CONFIG.get("config")
    if config is None or getattr(config, "_upstream_results", None) is None:
        return
    rec = {"event": "report", "nodeid": report.nodeid, "when": report.when,
           "outcome": report.outcome, "duration": round(float(report.duration), 4)}
    for k, v in getattr(report, "user_properties", ()) or ():
        if k == PARAMS_KEY:
            try:
                rec["params"] = json.loads(v)
            except (TypeError, ValueError):
                rec["params"] = {"_raw": str(v)}
    node = getattr(report, "node", None)
    if node is not None and hasattr(node, "gateway"):
        rec["worker"] = node.gateway.id
    if report.failed:
        msg, path, lineno = _crash(report)
        rec["message"] = msg[:4000]
        rec["crash_path"] = path
        rec["crash_lineno"] = lineno
        rec["exc_lines"] = _exc_lines(report)
        rec["exc_type"] = getattr(report, "upstream_exc_type", "")
        out = getattr(report, "capstdout", "") or ""
        if out:  # the upstream tests print their max diffs before asserting on them
            rec["stdout_tail"] = out[-1500:]
    elif report.skipped:
        lr = report.longrepr
        rec["reason"] = str(lr[2]) if isinstance(lr, tuple) and len(lr) == 3 else str(lr)[:500]
    if hasattr(report, "wasxfail"):
        rec["wasxfail"] = str(report.wasxfail)
    _write(config, rec)


_CONFIG: Dict[str, object] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _CONFIG["config"] = session.config


def pytest_sessionfinish(session, exitstatus):
    _write(session.config, {"event": "finish", "time": time.time(), "exitstatus": int(exitstatus)})


def pytest_collectreport(report):
    if report.failed:
        config = _CONFIG.get("config")
        if config is not None:
            msg, path, lineno = _crash(report)
            _write(config, {"event": "collect_error", "nodeid": report.nodeid, "message": msg[:4000]})


__all__: Iterable[str] = ["DEADLINE_REASON", "case_id", "sample_key", "quotas", "select", "jsonable_params",
                          "function_name"]
