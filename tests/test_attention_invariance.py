"""The invariance contract, bitwise (torch.equal): run-to-run, batch, chunking, layout."""

import pytest
import torch

import bitstable
from bitstable import flash_attn_func
from bitstable._backend import interpreting
from bitstable.testing import (Shape, check_batch_invariance, check_chunk_invariance,
                               check_layout_invariance, check_run_to_run)

from cases import DTYPE_PARAMS, cpu_bf16_gpu_marked, matrix

FEATURES = [
    pytest.param({}, id="plain"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window_size=(13, 3), softcap=4.0), id="window-softcap"),
    pytest.param(dict(alibi_slopes="per-head", causal=True), id="alibi"),
]
CPU_SHAPE = Shape(batch=2, heads_q=2, heads_kv=1, seqlen_q=37, seqlen_k=53, head_dim=32)
GPU_SHAPE = Shape(batch=4, heads_q=8, heads_kv=2, seqlen_q=1500, seqlen_k=2100, head_dim=128)
SHAPES = [pytest.param(CPU_SHAPE, id="cpu-size"),
          pytest.param(GPU_SHAPE, id="gpu-size", marks=pytest.mark.gpu)]


def _kw(feature, shape, device):
    kw = dict(feature)
    if kw.get("alibi_slopes") == "per-head":
        kw["alibi_slopes"] = torch.linspace(0.05, 0.5, shape.heads_q, device=device)
    return kw


@pytest.fixture(autouse=True)
def _small_splits(device):
    # Several splits per sequence even at CPU sizes (the interpreter's block_n is 16).
    with bitstable.set_deterministic_mode(True, split_size=32 if device == "cpu" else 512):
        yield


# bf16 through the interpreter for one feature per test (cases.cpu_bf16_gpu_marked)
@pytest.mark.parametrize("dtype,feature,shape", matrix(DTYPE_PARAMS, FEATURES, SHAPES, bf16_on_cpu=("alibi",)))
def test_batch_invariance(dtype, feature, shape, device):
    """A sequence alone = the same sequence at every position of batches of 2, 3 and 8; at
    CPU sizes of one batch of 3 (first, middle and last position)."""
    batch_sizes = (3,) if shape is CPU_SHAPE else (2, 3, 8)
    r = check_batch_invariance(flash_attn_func, shape, dtype, device, batch_sizes=batch_sizes,
                               **_kw(feature, shape, device))
    assert r.passed, r.detail


@pytest.mark.parametrize("dtype,feature,shape",
                         matrix(DTYPE_PARAMS, FEATURES, SHAPES, bf16_on_cpu=("window-softcap",)))
def test_chunk_invariance(dtype, feature, shape, device):
    chunks = (1, 7, 16, 17, 33) if shape is CPU_SHAPE else (1, 63, 64, 65, 129, 1000)
    r = check_chunk_invariance(flash_attn_func, shape, dtype, device, chunk_sizes=chunks,
                               **_kw(feature, shape, device))
    assert r.passed, r.detail


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [cpu_bf16_gpu_marked(p, keep=False) for p in DTYPE_PARAMS])
def test_run_to_run(dtype, shape, device):
    runs = 3 if shape is CPU_SHAPE else 50
    r = check_run_to_run(flash_attn_func, shape, dtype, device, runs=runs, causal=True)
    assert r.passed, r.detail


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_layout_invariance(dtype, shape, device):
    r = check_layout_invariance(flash_attn_func, shape, dtype, device, causal=True)
    assert r.passed, r.detail


def test_split_size_changes_only_the_order_not_the_accuracy(device):
    """Different split sizes are different (documented) configurations; both are accurate
    and each is deterministic."""
    from bitstable.configs import arch_key, attention_config

    bn = attention_config(arch_key(torch.device(device)), torch.float32, 32).block_n
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 5 * bn, 2, 32, generator=g).to(device) for _ in range(3))
    outs = []
    for split in (bn, 2 * bn, 1024):
        with bitstable.set_deterministic_mode(True, split_size=split):
            a = flash_attn_func(q, k, v)
            b = flash_attn_func(q, k, v)
        assert torch.equal(a, b)
        outs.append(a)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


#: The harness self-test's sizes: small, GQA (the layout check expands the kv heads).
HARNESS_SHAPE = Shape(batch=2, heads_q=2, heads_kv=1, seqlen_q=17, seqlen_k=20, head_dim=16)


def test_checks_detect_a_batch_dependent_function(device):
    """The harness itself must fail a function whose rows depend on the batch."""
    def leaky(q, k, v, **kw):
        out = flash_attn_func(q, k, v, **kw)
        return out + 1e-3 * q.shape[0]

    r = check_batch_invariance(leaky, HARNESS_SHAPE, torch.float32, device, batch_sizes=(2,))
    assert not r.passed

    def chunk_leaky(q, k, v, **kw):
        out = flash_attn_func(q, k, v, **kw)
        return out + 1e-3 * q.shape[1]

    assert not check_chunk_invariance(chunk_leaky, HARNESS_SHAPE, torch.float32, device).passed

    calls = []

    def flaky(q, k, v, **kw):
        calls.append(1)
        return flash_attn_func(q, k, v, **kw) + 1e-3 * len(calls)

    assert not check_run_to_run(flaky, HARNESS_SHAPE, torch.float32, device).passed

    def stride_leaky(q, k, v, **kw):
        return flash_attn_func(q, k, v, **kw) + 1e-3 * float(q.is_contiguous())

    assert not check_layout_invariance(stride_leaky, HARNESS_SHAPE, torch.float32, device).passed


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("feature", FEATURES)
def test_loop_structures_give_identical_bits(feature, shape, device):
    """The forward kernel's loop structures and K/V load paths (launch-only choices)
    compute one reduction order, bit for bit."""
    from bitstable import launch_options
    from bitstable.attention.launch import forward_plan

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, L, h, shape.head_dim, generator=g).to(torch.float16).to(device)
               for L, h in ((shape.seqlen_q, shape.heads_q), (shape.seqlen_k, shape.heads_kv),
                            (shape.seqlen_k, shape.heads_kv)))
    kw = _kw(feature, shape, device)
    # The interpreter has no copy engine (launch.kv_descriptors never makes descriptors
    # there): both loop structures, pointer loads only.
    variants = [("branch", False), ("nested", False)]
    if not interpreting():
        variants += [("branch", True), ("nested", True)]
    outs = []
    for style, tma in variants:
        with launch_options.forced(fwd_loop=style, fwd_tma=tma):
            plan = forward_plan(q, k, **kw)
            assert (plan.loop, plan.want_tma) == (style, tma), f"forced {style}/{tma}, planned {plan[:5]}"
            outs.append(flash_attn_func(q, k, v, **kw))
    for (style, tma), out in zip(variants[1:], outs[1:]):
        assert torch.equal(out, outs[0]), f"loop={style} tma={tma} differs from loop=branch tma=False"
