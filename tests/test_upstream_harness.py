"""The flash-attn upstream harness (scripts/run_flash_attn_upstream.py): its sampler, its
failure classifier, one end-to-end run on a synthetic test file, and, where flash-attn's
test file has been placed at .upstream/test_flash_attn.py (it is not in this repository),
that it collects through the shim.  No flash-attn code is needed or kept here.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import flash_attn_upstream_plugin as plugin  # noqa: E402
import run_flash_attn_upstream as runner  # noqa: E402

UPSTREAM_FILE = REPO / ".upstream" / "test_flash_attn.py"


def _ids():
    ids = [f"test_flash_attn.py::test_flash_attn_kvcache[{i}-{d}]" for i in range(300) for d in (32, 59)]
    ids += [f"test_flash_attn.py::test_flash_attn_output[{i}]" for i in range(120)]
    ids += [f"test_flash_attn.py::test_flash_attn_bwd_overflow[{i}]" for i in range(3)]
    ids += ["test_flash_attn.py::test_flash_attn_generator_arg_must_be_none"]
    return ids


# ----------------------------------------------------------------------------- sampler
def test_sample_is_deterministic_and_order_free():
    ids = _ids()
    a = plugin.select(ids, 50, seed=3)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    b = plugin.select(shuffled, 50, seed=3)
    assert len(a) == 50 and sorted(a) == sorted(b)
    assert a == [i for i in ids if i in set(a)]  # kept in the given order
    assert plugin.select(ids, 50, seed=3) == a  # same call, same sample
    assert sorted(plugin.select(ids, 50, seed=4)) != sorted(a)  # the seed matters


def test_sample_ignores_where_the_file_lies():
    ids = _ids()
    moved = ["some/dir/" + i for i in ids]
    a = plugin.select(ids, 40, seed=1)
    b = plugin.select(moved, 40, seed=1)
    assert [plugin.case_id(i) for i in a] == [plugin.case_id(i) for i in b]
    assert plugin.sample_key(ids[0], 1) == plugin.sample_key(moved[0], 1)


def test_sample_edges():
    ids = _ids()
    assert plugin.select(ids, 0, seed=0) == ids
    assert plugin.select(ids, len(ids) + 5, seed=0) == ids
    assert len(plugin.select(ids, 1, seed=0)) == 1


def test_stratified_sample_represents_every_function():
    ids = _ids()
    picked = plugin.select(ids, 40, seed=0)
    fns = {plugin.function_name(i) for i in picked}
    assert fns == {plugin.function_name(i) for i in ids}
    flat = plugin.select(ids, 40, seed=0, stratify=False)
    assert len(flat) == 40
    q = plugin.quotas({"a": 3, "b": 1000, "c": 10}, 60)
    assert sum(q.values()) == 60 and q["a"] == 3 and q["c"] >= 1 and q["b"] > q["c"]
    assert sum(plugin.quotas({"a": 1, "b": 1, "c": 1, "d": 5}, 2).values()) == 2


# ----------------------------------------------------------------------------- classifier
CASES = [
    # (message, params, test name, crash path, expected category)
    ("NotImplementedError: dropout_p=0.17: bitstable's attention does not implement dropout yet",
     {"dropout_p": 0.17, "d": 64}, "test_flash_attn_output", "", runner.DROPOUT),
    ("ValueError: head dim (q.shape[-1]) must be a multiple of 8 in [8, 256], got 59",
     {"dropout_p": 0.0, "d": 59}, "test_flash_attn_output", "", runner.HEAD_DIM),
    ("TypeError: flash_attn_with_kvcache() got an unexpected keyword argument 'rotary_cos'",
     {"rotary_fraction": 0.0, "num_splits": 1}, "test_flash_attn_kvcache", "", runner.ROTARY),
    ("TypeError: flash_attn_with_kvcache() got an unexpected keyword argument 'cache_leftpad'",
     {}, "test_flash_attn_kvcache", "", runner.LEFTPAD),
    ("TypeError: flash_attn_with_kvcache() got an unexpected keyword argument 'num_splits'",
     {}, "test_flash_attn_kvcache", "", runner.NUM_SPLITS),
    ("TypeError: flash_attn_varlen_func() got an unexpected keyword argument 'block_table'",
     {"paged_kv_block_size": 256}, "test_flash_attn_varlen_output", "", runner.PAGED),
    ("NotImplementedError: softcap is not supported here", {"softcap": 50.0},
     "test_flash_attn_output", "", runner.SOFTCAP),
    ("ValueError: alibi_slopes must have shape (9,) or (4, 9), got (4, 9, 1)", {"alibi": True},
     "test_flash_attn_output", "", runner.ALIBI),
    ("NotImplementedError: not supported", {"dropout_p": 0.0, "d": 64, "alibi": True},
     "test_flash_attn_output", "", runner.ALIBI),  # a bare NotImplementedError: by parameters
    ("AttributeError: 'NoneType' object has no attribute 'shape'", {"dropout_p": 0.17},
     "test_flash_attn_qkvpacked", "", runner.DROPOUT),
    ("ImportError: cannot import name '_flash_attn_varlen_forward' from 'flash_attn.flash_attn_interface'",
     {"dtype": "torch.float16"}, "test_flash_attn_varlen_paged_kv_num_splits", "", runner.INTERNAL),
    ("ImportError: cannot import name 'flash_attn_gpu' from 'flash_attn.flash_attn_interface'",
     {}, "test_flash_attn_generator_arg_must_be_none", "", runner.INTERNAL),
    # An assertion of the test is an accuracy mismatch, even in a case that uses a feature.
    ("AssertionError: assert 0.0123 <= (2 * 0.00391)", {"dropout_p": 0.17, "d": 59, "alibi": True},
     "test_flash_attn_output", "/x/test_flash_attn.py", runner.ACCURACY),
    ("AssertionError: assert False\n +  where False = <built-in method equal>(dq, dq0)", {"d": 64},
     "test_flash_attn_deterministic", "/x/test_flash_attn.py", runner.ACCURACY),
    ("AssertionError: internal invariant", {}, "test_flash_attn_output",
     "/repo/src/bitstable/attention/launch.py", runner.OTHER),
    ("ValueError: cache too small: sequence 0 needs 257 slots after the append, block_table gives 256",
     {"append_knew": True}, "test_flash_attn_kvcache_paged_block_table_bounds", "", runner.OTHER),
    ("Failed: DID NOT RAISE <class 'RuntimeError'>", {}, "test_flash_attn_kvcache_paged_block_table_bounds",
     "", runner.OTHER),
    ("Failed: Timeout >300.0s", {"d": 64}, "test_flash_attn_output", "", runner.OTHER),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", {"dropout_p": 0.17},
     "test_flash_attn_output", "", runner.OTHER),
    ("triton.runtime.errors.OutOfResources: out of resource: shared memory, Required: 262144",
     {"d": 256}, "test_flash_attn_output", "", runner.OTHER),
    ("IndexError: index 3 is out of bounds", {"dropout_p": 0.17}, "test_flash_attn_output", "", runner.OTHER),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", {"d": 59},
     "test_flash_attn_output", "", runner.OTHER),
    ("TypeError: unsupported operand type(s) for +: 'int' and 'str'", {}, "test_flash_attn_causal",
     "", runner.OTHER),
]


@pytest.mark.parametrize("message,params,test_name,crash_path,expected", CASES)
def test_classifier(message, params, test_name, crash_path, expected):
    c = runner.classify(message, params, test_name, crash_path)
    assert c["category"] == expected, c
    assert c["basis"]


def test_classifier_reads_the_recorded_exception_type():
    # pytest's crash message of a rewritten assert has no "AssertionError:" prefix.
    c = runner.classify("assert 0.0123 <= (2 * 0.00391)", {"dropout_p": 0.17}, "test_flash_attn_output",
                        "/x/test_flash_attn.py", exc_type="builtins.AssertionError")
    assert c["category"] == runner.ACCURACY
    c = runner.classify("AssertionError: Torch not compiled with CUDA enabled", {"d": 64},
                        "test_flash_attn_output", "/usr/lib/python3/site-packages/torch/cuda/__init__.py",
                        exc_type="builtins.AssertionError", test_path="/x/.upstream/test_flash_attn.py")
    assert c["category"] == runner.OTHER and "outside the test file" in c["basis"]
    c = runner.classify("assert 3 <= 2", {}, "test_flash_attn_output", "/y/.upstream/test_flash_attn.py",
                        exc_type="builtins.AssertionError", test_path="/x/.upstream/test_flash_attn.py")
    assert c["category"] == runner.ACCURACY
    c = runner.classify("DID NOT RAISE <class 'RuntimeError'>", {}, "test_flash_attn_causal", "",
                        exc_type="_pytest.outcomes.Failed")
    assert c["category"] == runner.OTHER and "not raised" in c["basis"]
    c = runner.classify("CUDA out of memory.", {"dropout_p": 0.17}, "test_flash_attn_output", "",
                        exc_type="torch.OutOfMemoryError")
    assert c["category"] == runner.OTHER


def test_exception_type_and_message_grouping():
    assert runner.exception_type("torch.OutOfMemoryError: CUDA out of memory") == "OutOfMemoryError"
    assert runner.exception_type("AssertionError") == "AssertionError"
    assert runner.exception_type("assert x") == ""
    a = runner.normalize_message("NotImplementedError: dropout_p=0.17: no\nmore lines")
    b = runner.normalize_message("NotImplementedError: dropout_p=0.25: no")
    assert a == b == "NotImplementedError: dropout_p=N: no"
    assert runner.param_features({"dropout_p": 0.17, "d": 59, "rotary_fraction": 0.5,
                                  "paged_kv_block_size": 256, "has_leftpad": True}) == [
        runner.DROPOUT, runner.HEAD_DIM, runner.ROTARY, runner.PAGED, runner.LEFTPAD]
    assert runner.param_features({"d": 64, "paged_kv_block_size": None, "alibi": False}) == []


# ----------------------------------------------------------------------------- end to end
SYNTHETIC = """
import pytest

@pytest.mark.parametrize("d", [32, 59])
@pytest.mark.parametrize("dropout_p", [0.0, 0.17])
def test_output(dropout_p, d):
    if dropout_p > 0:
        raise NotImplementedError(f"dropout_p={dropout_p}: not implemented")
    if d % 8:
        raise ValueError(f"head dim must be a multiple of 8, got {d}")

@pytest.mark.parametrize("x", range(3))
def test_acc(x):
    assert x < 2

def test_skipped():
    pytest.skip("reference OOM")
"""


def test_runner_end_to_end_on_a_synthetic_file(tmp_path):
    (tmp_path / "t").mkdir()
    test_file = tmp_path / "t" / "test_synthetic.py"
    test_file.write_text(textwrap.dedent(SYNTHETIC))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPTS / "run_flash_attn_upstream.py"), str(test_file),
                        "--out", str(out), "--workers", "1", "--timeout", "240"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((out / "upstream_summary.json").read_text())
    assert s["counts"]["passed"] == 3 and s["counts"]["failed"] == 4 and s["counts"]["skipped"] == 1
    assert s["counts"]["not_run"] == 0 and s["counts"]["not_finished"] == 0
    assert s["failure_categories"] == {runner.DROPOUT: 2, runner.HEAD_DIM: 1, runner.ACCURACY: 1}
    assert s["meta"]["test_unmodified"] is False  # not the pinned upstream file
    md = (out / "upstream_summary.md").read_text()
    assert "| dropout | 2 |" in md and "accuracy mismatch" in md


# ----------------------------------------------------------------------------- upstream
def _upstream_skip_reason():
    if not UPSTREAM_FILE.is_file():
        return (f"flash-attn's tests/test_flash_attn.py is not in this repository; place it at "
                f"{UPSTREAM_FILE.relative_to(REPO)} to check that it collects (benchmarks/README.md)")
    if importlib.util.find_spec("einops") is None:
        return "the upstream test file imports einops, which is not installed"
    return None


@pytest.mark.skipif(_upstream_skip_reason() is not None, reason=str(_upstream_skip_reason()))
def test_upstream_file_collects_through_the_shim():
    """Imports through the shim and collects a few of its functions (set
    BITSTABLE_UPSTREAM_FULL_COLLECT=1 for the whole file: about 500k cases, minutes)."""
    full = os.environ.get("BITSTABLE_UPSTREAM_FULL_COLLECT") == "1"
    small = ["test_flash_attn_bwd_overflow", "test_flash_attn_generator_arg_must_be_none",
             "test_flash_attn_kvcache_paged_block_table_bounds"]
    targets = [str(UPSTREAM_FILE)] if full else [f"{UPSTREAM_FILE}::{fn}" for fn in small]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SCRIPTS / "flash_attn_shim"), str(SCRIPTS), str(REPO / "src")]))
    r = subprocess.run([sys.executable, "-m", "pytest", *targets, "-c", str(runner.INI),
                        "--rootdir", str(UPSTREAM_FILE.parent), "-p", runner.PLUGIN, "-p", "no:cacheprovider",
                        "--collect-only", "-q", "--upstream-fake-capability", "9.0"],
                       capture_output=True, text=True, env=env, timeout=1200, cwd=str(UPSTREAM_FILE.parent))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = [ln for ln in r.stdout.splitlines() if "::test_" in ln]
    assert names
    if runner.git_blob(UPSTREAM_FILE) == runner.pinned()[1]:
        # counts at the pinned upstream commit
        assert len(names) == (508777 if full else 30 + 1 + 2), len(names)


def test_upstream_file_is_not_committed():
    """flash-attn's code must never be committed: .upstream/ holds it untracked only."""
    try:
        r = subprocess.run(["git", "-C", str(REPO), "ls-files", "--", ".upstream"], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available")
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    assert r.stdout.strip() == "", f"tracked under .upstream/: {r.stdout.split()}"
