"""Learnable attention sinks (``learnable_sink``, FlashAttention 4 / gpt-oss).

Against the float64 reference (forward, lse, dq/dk/dv and the sink's gradient, with the
suite's tolerance rule), a -inf sink changes no bit, batch invariance forward and backward,
varlen = alone, the stock path, and the errors.
"""

import pytest
import torch

import bitstable
from bitstable import flash_attn_func, flash_attn_varlen_func
from bitstable.reference import attention_reference
from bitstable.testing import Shape, check_backward_batch_invariance, check_batch_invariance


@pytest.fixture(autouse=True)
def _small_splits(device):
    with bitstable.set_deterministic_mode(True, split_size=32 if device == "cpu" else 1024):
        yield


def _rand(*shape, dtype, device, g):
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _run(fn, q, k, v, sink, dout, dlse):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    sink = sink.detach().clone().requires_grad_(True)
    out, lse = fn(q, k, v, sink)
    seen = torch.isfinite(lse)
    loss = (out.double() * dout.double()).sum() + (torch.where(seen, lse, 0).double() * dlse.double()).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad, sink.grad


def _ours(**kw):
    def fn(q, k, v, sink):
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, learnable_sink=sink, **kw)
        return out, lse
    return fn


def _reference(dtype, **kw):
    def fn(q, k, v, sink):
        return attention_reference(q, k, v, compute_dtype=dtype, learnable_sink=sink, **kw)
    return fn


CASES = [pytest.param(dict(causal=True), 17, 23, id="causal"),
         pytest.param(dict(causal=True), 23, 9, id="causal-lq>lk-empty-rows"),
         pytest.param(dict(window_size=(5, 2), softcap=3.0), 13, 21, id="window-softcap")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kw,Lq,Lk", CASES)
def test_vs_float64_reference(dtype, kw, Lq, Lk, device):
    g = torch.Generator().manual_seed(40)
    q = _rand(2, Lq, 4, 32, dtype=dtype, device=device, g=g)
    k, v = (_rand(2, Lk, 2, 32, dtype=dtype, device=device, g=g) for _ in range(2))
    sink = (torch.randn(4, generator=g) * 2).to(device)
    dout = _rand(2, Lq, 4, 32, dtype=dtype, device=device, g=g)
    dlse = torch.randn(2, 4, Lq, generator=g).to(device)
    ours = _run(_ours(**kw), q, k, v, sink, dout, dlse)
    ref = _run(_reference(torch.float64, **kw), q.double(), k.double(), v.double(), sink.double(), dout, dlse)
    stock = _run(_reference(dtype, **kw), q, k, v, sink, dout, dlse)
    eps = torch.finfo(dtype).eps
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv", "dsink")):
        a, r, s = ours[i], ref[i], stock[i]
        assert a.shape == r.shape and not a.isnan().any(), name
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(r))
            fin = torch.isfinite(r)
            assert (a.double() - r)[fin].abs().max().item() <= 1e-5 * (1 + r[fin].abs().max().item())
            continue
        err, err_s = (a.double() - r).abs().max().item(), (s.double() - r).abs().max().item()
        tol = 2 * err_s + (1 if name == "out" else 4) * eps * r.abs().max().item()
        assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (stock {err_s:.3g})"
    if Lq > Lk:   # rows that see no key: out 0, lse = the sink
        empty_row = 0
        assert (ours[0][:, empty_row] == 0).all()
        assert torch.equal(ours[1][:, :, empty_row], sink.expand(2, 4))


def test_a_minus_inf_sink_changes_no_bit(device):
    g = torch.Generator().manual_seed(41)
    q = _rand(2, 21, 4, 16, dtype=torch.float16, device=device, g=g)
    k, v = (_rand(2, 15, 1, 16, dtype=torch.float16, device=device, g=g) for _ in range(2))
    dout = _rand(2, 21, 4, 16, dtype=torch.float16, device=device, g=g)
    dlse = torch.zeros(2, 4, 21, device=device)
    minus_inf = torch.full((4,), float("-inf"), device=device)
    with_sink = _run(_ours(causal=True), q, k, v, minus_inf, dout, dlse)

    def plain(q, k, v, sink):
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, causal=True)
        return out, lse
    without = _run(plain, q, k, v, minus_inf, dout, dlse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), with_sink, without):
        assert torch.equal(a, b), name


SHAPE = Shape(batch=2, heads_q=4, heads_kv=2, seqlen_q=19, seqlen_k=27, head_dim=16)


def test_batch_invariance_forward_and_backward(device):
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], device=device)

    def fn(q, k, v, **kw):
        return flash_attn_func(q, k, v, learnable_sink=sink, **kw)

    r = check_batch_invariance(fn, SHAPE, torch.float16, device, batch_sizes=(3,), causal=True)
    assert r.passed, r.detail
    r = check_backward_batch_invariance(fn, SHAPE, torch.float16, device, batch_sizes=(3,), causal=True)
    assert r.passed, r.detail


def test_varlen_sequences_equal_alone(device):
    g = torch.Generator().manual_seed(42)
    dtype, lens = torch.float16, [10, 0, 19]
    q, k, v = (_rand(29, 2, 16, dtype=dtype, device=device, g=g) for _ in range(3))
    sink = torch.tensor([1.5, -0.5], device=device)
    cu = torch.tensor([0, 10, 10, 29], dtype=torch.int32, device=device)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 19, 19, causal=True, return_attn_probs=True,
                                         learnable_sink=sink)
    for a, b in ((0, 10), (10, 29)):
        o, l_, _ = flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], causal=True, return_attn_probs=True,
                                   learnable_sink=sink)
        assert torch.equal(out[a:b], o[0]) and torch.equal(lse[:, a:b], l_[0])


def test_stock_path(device):
    g = torch.Generator().manual_seed(43)
    q, k, v = (_rand(1, 12, 2, 16, dtype=torch.float32, device=device, g=g) for _ in range(3))
    sink = torch.tensor([0.3, -2.0], device=device)
    ours = flash_attn_func(q, k, v, causal=True, learnable_sink=sink)
    with bitstable.set_deterministic(False):
        stock = flash_attn_func(q, k, v, causal=True, learnable_sink=sink)
    assert (ours - stock).abs().max().item() < 1e-5


@pytest.mark.parametrize("bad,err,match", [
    ([0.0, 0.0], TypeError, "learnable_sink must be a torch.Tensor or None, got list"),
    (torch.zeros(2, dtype=torch.float16), TypeError, "learnable_sink must be float32"),
    (torch.zeros(3), ValueError, r"learnable_sink must have shape \(nheads,\) = \(2,\)"),
])
def test_errors(bad, err, match, device):
    q, k, v = (torch.zeros(1, 4, 2, 8, device=device) for _ in range(3))
    if isinstance(bad, torch.Tensor):
        bad = bad.to(device)
    with pytest.raises(err, match=match):
        flash_attn_func(q, k, v, learnable_sink=bad)


@pytest.mark.gpu
def test_gpu_bf16_vs_float64(device):
    g = torch.Generator().manual_seed(44)
    dtype = torch.bfloat16
    q = _rand(2, 1536, 8, 64, dtype=dtype, device=device, g=g)
    k, v = (_rand(2, 1536, 1, 64, dtype=dtype, device=device, g=g) for _ in range(2))
    sink = torch.randn(8, generator=g).to(device)
    dout = _rand(2, 1536, 8, 64, dtype=dtype, device=device, g=g)
    dlse = torch.zeros(2, 8, 1536, device=device)
    ours = _run(_ours(causal=True), q, k, v, sink, dout, dlse)
    ref = _run(_reference(torch.float64, causal=True), q.double(), k.double(), v.double(), sink.double(), dout, dlse)
    stock = _run(_reference(dtype, causal=True), q, k, v, sink, dout, dlse)
    eps = torch.finfo(dtype).eps
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv", "dsink")):
        if name == "lse":
            continue
        err = (ours[i].double() - ref[i]).abs().max().item()
        err_s = (stock[i].double() - ref[i]).abs().max().item()
        tol = 2 * err_s + (1 if name == "out" else 4) * eps * ref[i].abs().max().item()
        assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (stock {err_s:.3g})"
