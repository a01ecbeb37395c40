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


@pytest.fixture
def small_verify(monkeypatch):
    """``bitstable verify`` at small sizes: its attention scenarios (their dtypes and
    features) on a tiny shape, its decode checks on a 20-token cache (a prefill chunk, two
    one-token steps and a chunk across the first key block; one batch of 2).  These tests
    prove that verify runs the checks it names, reports them next to stock PyTorch and
    decides its exit code; what the checks prove at larger sizes is proven by the tests of
    the same properties: tests/test_attention_invariance.py and test_attention_backward.py
    run the same check functions on flash_attn_func, test_attention_kvcache.py proves
    decode = training and decode batch invariance over several splits and pages.  (The ops
    check keeps verify's own CPU sizes: nothing else runs ``testing.ops_checks``.)"""
    from bitstable.cli import verify
    from bitstable.testing import Shape

    real = verify._scenarios
    tiny = Shape(batch=1, heads_q=2, heads_kv=1, seqlen_q=17, seqlen_k=20, head_dim=16)

    def scenarios(on_gpu):
        out = real(on_gpu)
        return out if on_gpu else [(name, dtype, tiny, kw, (2,), (1, 5), 2) for name, dtype, _, kw, *_ in out]

    decode = Shape(batch=1, heads_q=4, heads_kv=2, seqlen_q=1, seqlen_k=20, head_dim=16)
    chunking, batch = verify.check_decode_chunking, verify.check_decode_batch_invariance
    monkeypatch.setattr(verify, "_scenarios", scenarios)
    monkeypatch.setattr(verify, "check_decode_chunking", lambda kv, full, shape, dtype, device, **kw: chunking(
        kv, full, decode, dtype, device, **dict(kw, chunk_sizes=(5, 1, 1, 13))))
    monkeypatch.setattr(verify, "check_decode_batch_invariance", lambda kv, shape, dtype, device, **kw: batch(
        kv, decode, dtype, device, **dict(kw, batch_sizes=(2,))))
    return verify


def test_verify_runs_the_checks_named_and_writes_json(tmp_path, small_verify, monkeypatch):
    """The command line runs the checks ``--checks`` names (here one forward check of each
    attention scenario and one decode check), next to stock PyTorch, and writes JSON.
    (In this process: ``python -m bitstable`` reaching ``cli.main`` is test_bad_shape_argument's.)"""
    from bitstable import cli

    out = io.StringIO()
    run_verify = small_verify.run_verify
    monkeypatch.setattr(small_verify, "run_verify", lambda *a, **kw: run_verify(*a, stream=out, **kw))
    path = tmp_path / "verify.json"
    assert cli.main(["verify", "--checks", "run-to-run,decode-batch", "--json", str(path)]) == 0, out.getvalue()
    assert "ALL bitstable checks hold" in out.getvalue()
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["checks"] == ["run-to-run", "decode-batch"]
    checks = [row["check"] for row in data["rows"]]
    # one run-to-run row per CPU scenario (fp16 causal GQA, bf16 window+softcap, fp16 + dropout)
    assert checks.count("run-to-run") == 3 and checks[-1] == "decode batch invariance", checks
    assert len(checks) == 4
    assert any("dropout" in row["scenario"] for row in data["rows"])
    assert all(row["bitstable"] for row in data["rows"])
    assert all(row["stock"] in (True, False) for row in data["rows"])  # stock PyTorch was run too


def test_verify_runs_every_check_and_they_hold(tmp_path, small_verify):
    """All of verify's checks, end to end (table, verdict, JSON), at small sizes (the
    ``small_verify`` fixture); the ops check at verify's own CPU sizes."""
    verify = small_verify
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
    assert len(data["rows"]) == 2 * 6 + 5 + 2 + 4     # the dropout scenario has no chunk check
    assert all(row["bitstable"] for row in data["rows"])
    assert all(row["stock"] in (True, False) for row in data["rows"])  # stock PyTorch was run too


def test_verify_exits_nonzero_on_a_violation(monkeypatch):
    """A failing bitstable check makes verify exit 1; a failing stock check does not."""
    from bitstable.cli import verify
    from bitstable.testing import CheckResult

    def ours(fn):   # the dropout scenario's calls wrap flash_attn_func (functools.wraps)
        return getattr(fn, "__wrapped__", fn) is verify.flash_attn_func

    monkeypatch.setattr(verify, "check_run_to_run",
                        lambda fn, *a, **k: CheckResult("run-to-run", not ours(fn)))
    assert verify.run_verify(stream=_Sink(), checks=["run-to-run"]) == 1
    monkeypatch.setattr(verify, "check_run_to_run",
                        lambda fn, *a, **k: CheckResult("run-to-run", ours(fn)))
    assert verify.run_verify(stream=_Sink(), checks=["run-to-run"]) == 0


def test_verify_rejects_unknown_checks(capsys):
    from bitstable import cli
    from bitstable.cli import verify

    with pytest.raises(SystemExit) as e:
        cli.main(["verify", "--checks", "run-to-run,nope"])
    assert e.value.code == 2 and "--checks takes a comma list of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown check"):
        verify.run_verify(stream=_Sink(), checks=["nope"])


def test_bench_writes_table_json_and_plot(tmp_path, monkeypatch):
    """``bitstable bench``'s flags reach every pass, which write table, JSON and plot.  In
    this process (``python -m bitstable`` reaching ``cli.main`` is test_bad_shape_argument's),
    and the decode pass with 8 query heads of 32 (GQA group 4 as its default 32/8) instead
    of its GPU-sized default 32 heads of 128: under the interpreter a head dim is a tile
    width, 32 and 128 both whole power-of-two tiles (no masked-d code), and the time goes
    to the combine's rows (one per query head); the decode kernels' bits are
    tests/test_attention_kvcache.py's, at D=128 on the GPU."""
    pytest.importorskip("matplotlib")
    from bitstable import bench, cli

    stdout = io.StringIO()
    run_bench, bench_decode = bench.run_bench, bench.bench_decode
    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: run_bench(*a, stream=stdout, **kw))
    monkeypatch.setattr(bench, "bench_decode",
                        lambda **kw: bench_decode(**dict(kw, heads_q=8, heads_kv=2, head_dim=32)))
    assert cli.main(["bench", "--shape", "1,2,32,32", "--reps", "1", "--out", str(tmp_path),
                     "--decode-batches", "1", "--decode-lengths", "16,40",
                     "--mm-shape", "3,40,24", "--mm-shape", "20,16,8", "--row-shape", "5,70"]) == 0
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
    assert "[1/4]" in stdout.getvalue()  # progress lines


def test_bad_shape_argument():
    r = _run("bench", "--shape", "1,2,3")
    assert r.returncode != 0 and "B,H,L,D" in r.stderr


def test_bench_features_pass(tmp_path):
    """``--passes features``: a row per (feature, shape) with both timings and their ratio,
    the table and the plot (tiny sizes: the interpreter times nothing real; the GPU run's
    numbers are in benchmarks/results/)."""
    pytest.importorskip("matplotlib")
    from bitstable.cli.bench import run_bench

    rows = run_bench(str(tmp_path), reps=1, passes=["features"], stream=io.StringIO(),
                     features_sizes=dict(shapes=((1, 2, 16, 16),), decode_cases=((1, 16),),
                                         value_dims=(24, 16), decode_heads=(4, 2, 16)))
    assert [(r["feature"], r["D"], r["Dv"]) for r in rows] == [("sink", 16, 16), ("dv<d", 24, 16),
                                                                ("rotary-decode", 16, 16)]
    for r in rows:
        assert r["pass_"] == "features" and r["base_ms"] > 0 and r["bitstable_ms"] > 0
        assert r["cost"] == pytest.approx(r["bitstable_ms"] / r["base_ms"])
    assert rows[2]["cost_eager"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "What each feature costs" in md and "| rotary-decode | 1 | 4 | 16 |" in md
    assert (tmp_path / "bench.png").stat().st_size > 1000
