"""The command line: verify proves the contract (exit 0) and writes JSON; bench writes table, JSON, plot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bitstable", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_verify_holds_and_writes_json(tmp_path):
    path = tmp_path / "verify.json"
    r = _run("verify", "--json", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ALL bitstable checks hold" in r.stdout
    data = json.loads(path.read_text())
    assert data["ok"] is True
    checks = {row["check"] for row in data["rows"]}
    assert {"run-to-run", "batch invariance", "chunk invariance (causal)", "layout invariance",
            "backward run-to-run", "backward batch invariance", "prefill/decode = training",
            "decode batch invariance"} <= checks
    assert all(row["bitstable"] for row in data["rows"])
    assert all(row["stock"] in (True, False) for row in data["rows"])  # stock PyTorch was run too


def test_verify_exits_nonzero_on_a_violation():
    from bitstable import verify
    from bitstable.testing import CheckResult

    class Sink:
        def write(self, s):
            pass

        def flush(self):
            pass

    original = verify.forward_checks
    try:
        verify.forward_checks = lambda fn, *a, **k: [CheckResult("run-to-run", fn is not verify.flash_attn_func)]
        assert verify.run_verify(stream=Sink()) == 1
    finally:
        verify.forward_checks = original


def test_bench_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    r = _run("bench", "--shape", "1,2,32,32", "--reps", "1", "--out", str(tmp_path),
             "--decode-batches", "1,2", "--decode-lengths", "40",
             "--mm-shape", "3,40,24", "--mm-shape", "20,16,8", "--row-shape", "5,70")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    dense = [row for row in rows if row["pass_"] in ("fwd", "fwd+bwd")]
    op_rows = [row for row in rows if row["pass_"] == "ops"]
    from bitstable.bench_ops import MATMUL_LAYOUTS

    assert [(row["op"], row.get("layout"), row["shape"]) for row in op_rows] == [
        ("mm", lay, shape) for shape in ("3x40x24", "20x16x8") for lay in MATMUL_LAYOUTS] + [
        (op, None, "5x70") for op in ("softmax", "log_softmax", "layer_norm", "rms_norm")]
    assert all(row["ratio_vs_stock"] > 0 for row in op_rows)
    assert "Batch-invariant ops" in (tmp_path / "bench.md").read_text()
    decode = [row for row in rows if row["pass_"] == "decode"]
    assert len(dense) == 4 and {row["causal"] for row in dense} == {False, True}
    assert {row["pass_"] for row in dense} == {"fwd", "fwd+bwd"}
    assert [(row["B"], row["L"]) for row in decode] == [(1, 40), (2, 40)]
    assert all(row["bitstable_gbs"] > 0 for row in decode)
    assert "Decode (one token" in (tmp_path / "bench.md").read_text()
    assert all(row["bitstable_ms"] > 0 for row in rows)
    assert "| B | H | L | D |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "[1/4]" in r.stdout  # progress lines


def test_bad_shape_argument():
    r = _run("bench", "--shape", "1,2,3")
    assert r.returncode != 0 and "B,H,L,D" in r.stderr
