"""The command line: verify proves the contract (exit 0) and writes JSON; bench writes table, JSON, plot."""

import io
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


class _Sink:
    def write(self, s):
        pass

    def flush(self):
        pass


def test_verify_runs_the_checks_named_and_writes_json(tmp_path):
    """The command line runs the checks ``--checks`` names (here one forward check of each
    attention scenario and one decode check), next to stock PyTorch, and writes JSON."""
    path = tmp_path / "verify.json"
    r = _run("verify", "--checks", "run-to-run,decode-batch", "--json", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ALL bitstable checks hold" in r.stdout
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["checks"] == ["run-to-run", "decode-batch"]
    checks = [row["check"] for row in data["rows"]]
    assert checks.count("run-to-run") == 2 and checks[-1] == "decode batch invariance", checks
    assert len(checks) == 3
    assert all(row["bitstable"] for row in data["rows"])
    assert all(row["stock"] in (True, False) for row in data["rows"])  # stock PyTorch was run too


def test_verify_runs_every_check_and_they_hold(tmp_path, monkeypatch):
    """All of verify's checks, end to end (table, verdict, JSON), with its attention
    scenarios (dtypes, features) at tiny sizes; the decode and ops checks at verify's own
    CPU sizes."""
    from bitstable.cli import verify
    from bitstable.testing import Shape

    real = verify._scenarios
    tiny = Shape(batch=1, heads_q=2, heads_kv=1, seqlen_q=17, seqlen_k=20, head_dim=16)

    def scenarios(on_gpu):
        out = real(on_gpu)
        return out if on_gpu else [(name, dtype, tiny, kw, (2,), (1, 5), 2) for name, dtype, _, kw, *_ in out]

    monkeypatch.setattr(verify, "_scenarios", scenarios)
    path = tmp_path / "verify.json"
    out = io.StringIO()
    assert verify.run_verify(str(path), stream=out) == 0, out.getvalue()
    assert "ALL bitstable checks hold" in out.getvalue()
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["checks"] == list(verify.CHECKS)
    checks = {row["check"] for row in data["rows"]}
    assert {"run-to-run", "batch invariance", "chunk invariance (causal)", "layout invariance",
            "backward run-to-run", "backward batch invariance", "prefill/decode = training",
            "decode batch invariance", "softmax rows", "log_softmax rows", "rms_norm rows"} <= checks
    assert any(c.startswith("matmul rows") for c in checks)
    assert len(data["rows"]) == 2 * 6 + 2 + 4
    assert all(row["bitstable"] for row in data["rows"])
    assert all(row["stock"] in (True, False) for row in data["rows"])  # stock PyTorch was run too


def test_verify_exits_nonzero_on_a_violation(monkeypatch):
    """A failing bitstable check makes verify exit 1; a failing stock check does not."""
    from bitstable.cli import verify
    from bitstable.testing import CheckResult

    monkeypatch.setattr(verify, "check_run_to_run",
                        lambda fn, *a, **k: CheckResult("run-to-run", fn is not verify.flash_attn_func))
    assert verify.run_verify(stream=_Sink(), checks=["run-to-run"]) == 1
    monkeypatch.setattr(verify, "check_run_to_run",
                        lambda fn, *a, **k: CheckResult("run-to-run", fn is verify.flash_attn_func))
    assert verify.run_verify(stream=_Sink(), checks=["run-to-run"]) == 0


def test_verify_rejects_unknown_checks(capsys):
    from bitstable import cli
    from bitstable.cli import verify

    with pytest.raises(SystemExit) as e:
        cli.main(["verify", "--checks", "run-to-run,nope"])
    assert e.value.code == 2 and "--checks takes a comma list of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown check"):
        verify.run_verify(stream=_Sink(), checks=["nope"])


def test_bench_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    r = _run("bench", "--shape", "1,2,32,32", "--reps", "1", "--out", str(tmp_path),
             "--decode-batches", "1", "--decode-lengths", "16,40",
             "--mm-shape", "3,40,24", "--mm-shape", "20,16,8", "--row-shape", "5,70")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    dense = [row for row in rows if row["pass_"] in ("fwd", "fwd+bwd")]
    op_rows = [row for row in rows if row["pass_"] == "ops"]
    from bitstable.cli.bench_ops import MATMUL_LAYOUTS

    assert [(row["op"], row.get("layout"), row["shape"]) for row in op_rows] == [
        ("mm", lay, shape) for shape in ("3x40x24", "20x16x8") for lay in MATMUL_LAYOUTS] + [
        (op, None, "5x70") for op in ("softmax", "log_softmax", "layer_norm", "rms_norm")]
    assert all(row["ratio_vs_stock"] > 0 for row in op_rows)
    assert "Batch-invariant ops" in (tmp_path / "bench.md").read_text()
    decode = [row for row in rows if row["pass_"] == "decode"]
    assert len(dense) == 4 and {row["causal"] for row in dense} == {False, True}
    assert {row["pass_"] for row in dense} == {"fwd", "fwd+bwd"}
    assert [(row["B"], row["L"]) for row in decode] == [(1, 16), (1, 40)]
    assert all(row["bitstable_gbs"] > 0 for row in decode)
    assert "Decode (one token" in (tmp_path / "bench.md").read_text()
    assert all(row["bitstable_ms"] > 0 for row in rows)
    assert "| B | H | L | D |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "[1/4]" in r.stdout  # progress lines


def test_bad_shape_argument():
    r = _run("bench", "--shape", "1,2,3")
    assert r.returncode != 0 and "B,H,L,D" in r.stderr
