"""The model pass of ``bitstable bench`` (``--passes model``): rows, tables, files and the CLI flags.

One run of the pass at the smallest size (a one-layer tiny Llama, one training shape, one
generation batch, one call per overhead case) is shared by the tests through a
module-scoped fixture: under the interpreter every kernel call runs through Python.
"""

import io
import json
import math

import pytest
import torch

from bitstable import _backend
from bitstable.cli.bench_model import N_OVERHEAD_CASES, Distinct

RUNS = 2          # identical runs per case (the bench's default is 3; trimmed for the CPU)
SIZES = dict(config=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=32),
             train_shapes=[(2, 8)], gen_batches=[2], prompt_len=4, new_tokens=2, runs=RUNS,
             train_warmup=0, gen_warmup=0, overhead_calls=1, overhead_repeats=1, overhead_warmup=0,
             overhead_shapes=dict(attn=(1, 16, 2, 16), decode=(32, 2, 1, 16), mm=(8, 32, 32), rows=(8, 32)))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from bitstable.cli.bench import run_bench

    if not _backend.interpreting():
        pytest.skip("CPU-size run of the model pass; on the GPU run `bitstable bench --passes model`")
    out = tmp_path_factory.mktemp("bench_model")
    progress = io.StringIO()
    rows = run_bench(str(out), passes=["model"], stream=io.StringIO(), model_sizes=dict(SIZES, progress=progress))
    return dict(rows=rows, out=out, progress=progress.getvalue())


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_rows_of_every_part(bench):
    rows = bench["rows"]
    assert rows and all(r["pass_"] == "model" for r in rows)
    parts = [(r["part"], r["case"]) for r in rows]
    assert parts[:4] == [("train", "train eager"), ("train", "train compile"), ("generate", "Engine"),
                         ("generate", "HF generate")]
    assert len([r for r in rows if r["part"] == "overhead"]) == N_OVERHEAD_CASES
    for r in rows:
        assert any(k.startswith("ratio") for k in r), r
        assert r["covers"] and r["not_covered"]
        if r["status"] == "ok":
            assert _finite_positive(r["ratio_vs_stock"]), r


def test_train_rows(bench):
    eager, compiled = [r for r in bench["rows"] if r["part"] == "train"]
    assert eager["status"] == "ok", eager.get("errors")
    assert (eager["B"], eager["L"]) == (2, 8)
    for impl in ("stock", "bitstable"):
        assert _finite_positive(eager[f"{impl}_ms"])
        assert len(eager[f"{impl}_times_ms"]) == RUNS
        assert 1 <= eager[f"{impl}_identical_runs"] <= RUNS
    assert eager["bitstable_identical_runs"] == 1        # one gradient set in RUNS identical steps
    assert eager["ratio_vs_stock"] == pytest.approx(eager["stock_ms"] / eager["bitstable_ms"])
    # The interpreter cannot be compiled: the row says so instead of carrying numbers.
    assert compiled["status"] == "skipped" and "interpreter" in compiled["reason"]
    assert compiled["stock_ms"] is None and compiled["bitstable_ms"] is None and compiled["ratio_vs_stock"] is None
    assert "torch.compile" in compiled["not_covered"]


def test_generate_rows(bench):
    gen = [r for r in bench["rows"] if r["part"] == "generate"]
    assert [(r["api"], r["B"]) for r in gen] == [("engine", 2), ("hf_generate", 2)]
    for r in gen:
        assert r["status"] == "ok", r.get("errors")
        for impl in ("stock", "bitstable"):
            assert _finite_positive(r[f"{impl}_tokens_per_s"])
            assert 1 <= r[f"{impl}_identical_runs"] <= RUNS
        assert r["bitstable_identical_runs"] == 1        # tokens and log-probs/logits bitwise equal
        assert r["ratio_vs_stock"] == pytest.approx(r["bitstable_tokens_per_s"] / r["stock_tokens_per_s"])
        assert isinstance(r["same_tokens_as_stock"], bool)


def test_overhead_rows(bench):
    over = [r for r in bench["rows"] if r["part"] == "overhead"]
    names = [r["case"] for r in over]
    assert names[:2] == ["attn fwd", "attn fwd+bwd"]
    assert [n for n in names if n.startswith("kvcache decode")] == [
        "kvcache decode (cache_seqlens int)", "kvcache decode (cache_seqlens CPU tensor)",
        "kvcache decode (cache_seqlens device tensor)"]
    assert {"ops.mm", "a @ w (mode)", "softmax (mode)", "rms_norm (mode)", "layer_norm (mode)"} <= set(names)
    for r in over:
        assert r["status"] == "ok", r.get("errors")
        assert _finite_positive(r["stock_us"]) and _finite_positive(r["bitstable_us"])
        assert r["ratio_bitstable_over_stock"] == pytest.approx(r["bitstable_us"] / r["stock_us"])
        assert r["bitstable_host_sync"] is None          # no device here: nothing to sync with


def test_files_tables_and_progress(bench):
    out = bench["out"]
    data = json.loads((out / "bench.json").read_text())
    assert [r["case"] for r in data["rows"]] == [r["case"] for r in bench["rows"]]
    assert all(r["pass_"] == "model" for r in data["rows"])
    md = (out / "bench.md").read_text()
    assert "Model pass: training step and generation" in md
    assert "| part | case | B |" in md and "| train | train eager | 2 | 8 |" in md
    assert "skipped: Triton's interpreter" in md
    assert "Host overhead per eager call" in md and "| kvcache decode (cache_seqlens int) |" in md
    assert "Not covered:" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "bench.png").stat().st_size > 1000
    lines = [ln for ln in bench["progress"].splitlines() if ln.startswith("[model ")]
    n = 2 + 2 + N_OVERHEAD_CASES
    assert lines[0].startswith(f"[model 1/{n}] train eager") and lines[-1].startswith(f"[model {n}/{n}]")


def test_distinct_compares_bits():
    d = Distinct()
    x = torch.tensor([0.0, float("nan"), 1.5])
    d.add([x, torch.tensor([1, 2])])
    d.add([x.clone(), torch.tensor([1, 2])])                     # same bits (NaN included)
    assert d.count == 1
    d.add([torch.tensor([-0.0, float("nan"), 1.5]), torch.tensor([1, 2])])   # -0.0 == 0.0, other bits
    d.add([x, torch.tensor([1, 3])])
    assert (d.count, d.added) == (3, 4)


def test_cli_model_flags(monkeypatch, tmp_path):
    from bitstable import cli
    from bitstable.cli import bench

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda out, **kw: seen.update(kw, out=out) or [])
    assert cli.main(["bench", "--passes", "model", "--out", str(tmp_path), "--model-train", "2,8",
                     "--model-train", "1,16", "--model-batches", "1,2", "--model-new-tokens", "3",
                     "--model-prompt-len", "5", "--model-runs", "4", "--model-parts", "train,overhead"]) == 0
    assert seen["passes"] == ["model"] and seen["out"] == str(tmp_path)
    assert seen["model_sizes"] == dict(size=None, train_shapes=[(2, 8), (1, 16)], gen_batches=[1, 2], prompt_len=5,
                                       new_tokens=3, runs=4, parts=["train", "overhead"], compile_causal_mask="skip")
    seen.clear()
    for bad in (["--passes", "model,bogus"], ["--passes", "model", "--model-parts", "train,bogus"],
                ["--passes", "model", "--model-train", "2"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", *bad])
    assert not seen                                          # the bad calls never reached run_bench


def test_failed_rows_are_shown_with_the_error():
    from bitstable.cli.bench_model import model_table

    row = dict(part="generate", case="HF generate", api="hf_generate", B=1, prompt_len=4, new_tokens=2, runs=RUNS,
               stock_tokens_per_s=10.0, bitstable_tokens_per_s=None, ratio_vs_stock=None, stock_identical_runs=1,
               bitstable_identical_runs=None, status="failed",
               errors=dict(bitstable="RuntimeError: no structural support\nTraceback line"))
    line = model_table([row]).splitlines()[-1]
    assert "| 10.0 tok/s | n/a | n/a | 1 of 2 | n/a | failed: bitstable: RuntimeError: no structural support |" in line
