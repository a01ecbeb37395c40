"""set_batch_invariant_mode and bitstable.ops: a row's bits never depend on the batch."""

import pytest
import torch

import bitstable
from bitstable import ops

from cases import DTYPES

MM_CPU = [(70, 45, 33), (33, 16, 1), (17, 100, 40)]
MM_GPU = [(2048, 4096, 4096), (1000, 4096, 1024), (300, 14336, 4096)]
MM = [pytest.param(s, id="x".join(map(str, s))) for s in MM_CPU] + \
     [pytest.param(s, id="gpu-" + "x".join(map(str, s)), marks=pytest.mark.gpu) for s in MM_GPU]


def _r(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


@pytest.mark.parametrize("mkn", MM)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_mm_rows_do_not_depend_on_m(dtype, mkn, device):
    M, K, N = mkn
    a, b = _r(M, K, dtype=dtype, device=device), _r(K, N, dtype=dtype, device=device, seed=1)
    full = ops.mm(a, b)
    for m in (1, 7, 64, 1000):
        if m <= M:
            assert torch.equal(ops.mm(a[:m], b), full[:m]), f"m={m}"
    # accuracy: within 2x of stock PyTorch's error in the same dtype (+1 ulp of the output)
    ref = a.double() @ b.double()
    err = (full.double() - ref).abs().max().item()
    stock = (torch.mm(a, b).double() - ref).abs().max().item()
    assert err <= 2 * stock + torch.finfo(dtype).eps * ref.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_bmm_addmm_and_reductions_rows_alone_equal_rows_in_batch(dtype, device):
    a, b = _r(3, 20, 24, dtype=dtype, device=device), _r(3, 24, 9, dtype=dtype, device=device, seed=1)
    assert torch.equal(ops.bmm(a[:1], b[:1]), ops.bmm(a, b)[:1])
    bias = _r(9, dtype=dtype, device=device, seed=2)
    x = a[0]
    assert torch.equal(ops.addmm(bias, x[:5], b[0]), ops.addmm(bias, x, b[0])[:5])
    y = _r(11, 150, dtype=dtype, device=device, seed=3)
    for fn in (ops.softmax, ops.log_softmax):
        assert torch.equal(fn(y[:2], -1), fn(y, -1)[:2])
        ref = getattr(torch, fn.__name__)(y.double(), -1)
        err = (fn(y, -1).double() - ref).abs().max().item()
        stock = (getattr(torch, fn.__name__)(y, -1).double() - ref).abs().max().item()
        assert err <= 2 * stock + 2 * torch.finfo(dtype).eps
    for fn in (ops.sum, ops.mean):
        assert torch.equal(fn(y[:3], -1), fn(y, -1)[:3])
        ref = getattr(torch, fn.__name__)(y.double(), -1)
        err = (fn(y, -1).double() - ref).abs().max().item()
        stock = (getattr(torch, fn.__name__)(y, -1).double() - ref).abs().max().item()
        assert err <= 2 * stock + torch.finfo(dtype).eps * ref.abs().max().item()
    z = _r(4, 5, 6, dtype=dtype, device=device, seed=4)
    torch.testing.assert_close(ops.sum(z, (0, 2), keepdim=True).float(),
                               z.float().sum((0, 2), keepdim=True), rtol=1e-2, atol=1e-2)


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = ops.mm

        def spy(a, b):
            self.calls += 1
            return real(a, b)
        monkeypatch.setattr(ops, "mm", spy)


def test_mode_nests_excludes_and_restores(device, monkeypatch):
    spy = _Spy(monkeypatch)
    a, b = _r(8, 8, device=device), _r(8, 8, device=device, seed=1)
    assert not bitstable.is_batch_invariant_mode_enabled()
    with bitstable.set_batch_invariant_mode():
        assert bitstable.is_batch_invariant_mode_enabled()
        torch.mm(a, b)
        assert spy.calls == 1
        with bitstable.set_batch_invariant_mode(False):
            assert not bitstable.is_batch_invariant_mode_enabled()
            torch.mm(a, b)
            assert spy.calls == 1
            with bitstable.set_batch_invariant_mode(True, exclude=["mm"]):
                torch.mm(a, b)
                assert spy.calls == 1            # excluded: stock
                torch.softmax(a, -1)             # others still replaced
        torch.mm(a, b)
        assert spy.calls == 2
    torch.mm(a, b)
    assert spy.calls == 2 and not bitstable.is_batch_invariant_mode_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with bitstable.set_batch_invariant_mode():
            raise RuntimeError("boom")
    torch.mm(a, b)
    assert spy.calls == 2 and not bitstable.is_batch_invariant_mode_enabled()
    bitstable.enable_batch_invariant_mode()
    try:
        torch.mm(a, b)
        assert spy.calls == 3
    finally:
        bitstable.disable_batch_invariant_mode()
    torch.mm(a, b)
    assert spy.calls == 3
    with pytest.raises(ValueError, match="exclude names unknown ops"):
        bitstable.set_batch_invariant_mode(exclude=["conv2d"])


def test_other_dtypes_fall_through_to_stock(device):
    x = torch.randn(5, 5, dtype=torch.float64, device=device)
    with bitstable.set_batch_invariant_mode():
        got = x @ x
        s = torch.softmax(x, -1)
    assert torch.equal(got, x @ x) and torch.equal(s, torch.softmax(x, -1))


class _Block(torch.nn.Module):
    """A small transformer block written with plain matmuls (attention + MLP)."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        sh = lambda t: t.reshape(B, L, self.heads, d // self.heads).transpose(1, 2).reshape(B * self.heads, L, -1)  # noqa: E731
        att = torch.softmax(torch.bmm(sh(q), sh(k).transpose(1, 2)) * 0.25, dim=-1)
        o = torch.bmm(att, sh(v)).reshape(B, self.heads, L, -1).transpose(1, 2).reshape(B, L, d)
        x = x + self.out(o)
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_transformer_block_forward_and_input_grads_are_batch_invariant(device):
    block = _Block().to(device)
    xs = _r(5, 9, 32, device=device, seed=6)
    with bitstable.set_batch_invariant_mode():
        x = xs.clone().requires_grad_(True)
        y = block(x)
        y.backward(torch.ones_like(y))
        for i in (0, 3):
            xi = xs[i:i + 1].clone().requires_grad_(True)
            yi = block(xi)
            yi.backward(torch.ones_like(yi))
            assert torch.equal(yi, y[i:i + 1]), f"sequence {i}: forward differs alone vs in batch"
            assert torch.equal(xi.grad, x.grad[i:i + 1]), f"sequence {i}: input grad differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_norms_rows_alone_equal_rows_in_batch_and_are_accurate(dtype, device):
    x = _r(6, 9, 130, dtype=dtype, device=device, seed=8)
    w, b = _r(130, dtype=dtype, device=device, seed=9), _r(130, dtype=dtype, device=device, seed=10)
    y = ops.layer_norm(x, (130,), w, b)
    assert torch.equal(ops.layer_norm(x[:2], (130,), w, b), y[:2])
    ref = torch.nn.functional.layer_norm(x.double(), (130,), w.double(), b.double())
    stock = torch.nn.functional.layer_norm(x, (130,), w, b)
    err, err_stock = (y.double() - ref).abs().max().item(), (stock.double() - ref).abs().max().item()
    assert err <= 2 * err_stock + torch.finfo(dtype).eps * ref.abs().max().item()
    r = ops.rms_norm(x, (130,), w)
    assert torch.equal(ops.rms_norm(x[:1], (130,), w), r[:1])
    rref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    rstock = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(dtype)
    assert (r.double() - rref).abs().max().item() <= \
        2 * (rstock.double() - rref).abs().max().item() + torch.finfo(dtype).eps * rref.abs().max().item()


def test_layer_norm_module_under_the_mode_trains(device):
    """nn.LayerNorm goes through the batch-invariant native_layer_norm; its backward works."""
    ln = torch.nn.LayerNorm(32).to(device)
    x = _r(4, 7, 32, device=device, seed=11).requires_grad_(True)
    with bitstable.set_batch_invariant_mode():
        out = ln(x)
        out.square().sum().backward()
        alone = ln(x[:1].detach())
    assert torch.equal(alone, out[:1].detach())
    ref = torch.nn.functional.layer_norm(x.detach(), (32,), ln.weight, ln.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.layer_norm(x2, (32,), ln.weight, ln.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
