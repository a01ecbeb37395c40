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
    # m crosses every M class of the config table (tile shapes differ; on sm90 16-bit so do K blocks)
    for m in (1, 7, 16, 17, 33, 64, 65, 256, 257, 1000):
        if m <= M:
            assert torch.equal(ops.mm(a[:m], b), full[:m]), f"m={m}"
    # accuracy: within 2x of stock PyTorch's error in the same dtype (+1 ulp of the output)
    ref = a.double() @ b.double()
    err = (full.double() - ref).abs().max().item()
    stock = (torch.mm(a, b).double() - ref).abs().max().item()
    assert err <= 2 * stock + torch.finfo(dtype).eps * ref.abs().max().item()


def test_matmul_classes_share_block_k_where_it_orders_the_sum_and_end_unbounded():
    from bitstable.configs import _MATMUL

    for key, classes in _MATMUL.items():
        # block_k is free only on sm90 16-bit (tensor cores add K in 16-steps); float32's
        # blocked summation and the interpreter's product cut the sum into block_k pieces.
        if key[0] == "sm90" and key[1] in ("bf16", "fp16"):
            assert all(cfg.chunk_blocks == 0 and cfg.block_k % 16 == 0 for _, cfg in classes), key
        else:
            assert len({(cfg.block_k, cfg.chunk_blocks) for _, cfg in classes}) == 1, key
        bounds = [b for b, _ in classes]
        assert bounds[-1] is None and all(b is not None for b in bounds[:-1]), key
        assert bounds[:-1] == sorted(bounds[:-1]), key
    # the copy-engine tiles name classes of the same table and keep its K order
    from bitstable.configs import _MATMUL_TMA

    for key, table in _MATMUL_TMA.items():
        bounds = {b for b, _ in _MATMUL[key]}
        assert set(table) <= bounds, key
        for bound, cfg in table.items():
            assert cfg.tma and cfg.chunk_blocks == 0, key
            if key[0] != "sm90":
                assert {cfg.block_k} == {c.block_k for _, c in _MATMUL[key]}, key


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


@pytest.mark.parametrize("causal,gqa", [(False, False), (True, True)], ids=["full", "causal-gqa"])
def test_sdpa_under_the_mode_is_bitstable_attention_and_batch_invariant(causal, gqa, device):
    """F.scaled_dot_product_attention (no mask) runs bitstable's kernels: the same bits as
    flash_attn_func, a sequence alone = inside the batch, gradients deterministic."""
    B, Hq, Hk, L, D = 3, 4, 2 if gqa else 4, 37, 32
    q = _r(B, Hq, L, D, dtype=torch.float16, device=device, seed=20)
    k = _r(B, Hk, L, D, dtype=torch.float16, device=device, seed=21)
    v = _r(B, Hk, L, D, dtype=torch.float16, device=device, seed=22)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with bitstable.set_batch_invariant_mode():
        qq = q.clone().requires_grad_(True)
        out = sdpa(qq, k, v, is_causal=causal, enable_gqa=gqa)
        out.float().square().sum().backward()
        alone = sdpa(q[1:2], k[1:2], v[1:2], is_causal=causal, enable_gqa=gqa)
        with torch.inference_mode():
            inf = sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
        q2 = q.clone().requires_grad_(True)
        sdpa(q2, k, v, is_causal=causal, enable_gqa=gqa).float().square().sum().backward()
    fa = bitstable.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    assert torch.equal(out.detach(), fa.transpose(1, 2))
    assert torch.equal(alone, out[1:2].detach()) and torch.equal(inf, out.detach())
    assert torch.equal(qq.grad, q2.grad)
    stock = sdpa(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=gqa)
    torch.testing.assert_close(out.float(), stock, rtol=2e-3, atol=2e-3)
    with bitstable.set_batch_invariant_mode(exclude=["scaled_dot_product_attention", "bmm", "_softmax"]):
        excluded = sdpa(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=gqa)
    assert torch.equal(excluded, stock)


def test_sdpa_with_a_mask_takes_the_batch_invariant_math_path(device):
    B, H, Lq, Lk, D = 3, 2, 5, 19, 16
    q = _r(B, H, Lq, D, device=device, seed=23)
    k, v = _r(B, H, Lk, D, device=device, seed=24), _r(B, H, Lk, D, device=device, seed=25)
    mask = _r(B, 1, Lq, Lk, device=device, seed=26) > -0.5          # bool mask, some keys hidden
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with bitstable.set_batch_invariant_mode():
        out = sdpa(q, k, v, attn_mask=mask)
        alone = sdpa(q[2:], k[2:], v[2:], attn_mask=mask[2:])
        causal_tl = sdpa(q, k, v, is_causal=True)                    # top-left causal, Lq != Lk
    assert torch.equal(alone, out[2:])
    torch.testing.assert_close(out, sdpa(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal_tl, sdpa(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rms_norm_under_the_mode_is_batch_invariant_with_deterministic_grads(dtype, device):
    x = _r(5, 3, 70, dtype=dtype, device=device, seed=30)
    w = _r(70, dtype=dtype, device=device, seed=31)
    rms = torch.nn.functional.rms_norm
    with bitstable.set_batch_invariant_mode():
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = rms(xx, (70,), ww, 1e-6)
        y.float().sin().sum().backward()
        alone = rms(x[4:], (70,), w, 1e-6)
        with torch.inference_mode():
            inf = rms(x, (70,), w, 1e-6)
    assert torch.equal(y.detach(), ops.rms_norm(x, (70,), w, 1e-6))
    assert torch.equal(alone, y[4:].detach()) and torch.equal(inf, y.detach())
    xd, wd = x.double().requires_grad_(True), w.double().requires_grad_(True)
    (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd).sin().sum().backward()
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    rms(xs, (70,), ws, 1e-6).float().sin().sum().backward()          # stock, same dtype
    for got, stock, ref in ((xx.grad, xs.grad, xd.grad), (ww.grad, ws.grad, wd.grad)):
        err = (got.double() - ref).abs().max().item()
        err_stock = (stock.double() - ref).abs().max().item()
        assert err <= 2 * err_stock + torch.finfo(dtype).eps * ref.abs().max().item()


def test_calls_without_grad_skip_autograd_and_keep_the_bits(device, monkeypatch):
    """Under the mode a call that needs no gradient takes the override directly (no stock
    autograd round trip); its bits equal the same call on inputs that require grad, and
    forward-mode AD still gets the autograd kernel's tangent."""
    from bitstable.ops import batch_invariant as bi

    F = torch.nn.functional
    x, w, b = _r(6, 40, device=device), _r(40, device=device, seed=1), _r(40, device=device, seed=2)
    m2 = _r(40, 24, device=device, seed=3)
    calls = {
        "softmax": lambda x: torch.softmax(x, -1),
        "log_softmax": lambda x: torch.log_softmax(x, -1),
        "sum": lambda x: x.sum(-1),
        "mean": lambda x: x.mean(-1),
        "mm": lambda x: x @ m2,
        "addmm": lambda x: torch.addmm(b[:24], x, m2),
        "bmm": lambda x: torch.bmm(x.view(2, 3, 40), m2.expand(2, 40, 24)),
        "layer_norm": lambda x: F.layer_norm(x, (40,), w, b),
        "rms_norm": lambda x: F.rms_norm(x, (40,), w),
    }
    stock_calls = []
    real = bi._STOCK_AUTOGRAD

    class Counting(dict):
        def __getitem__(self, name):
            kernel = real[name]

            class K:
                @staticmethod
                def call_boxed(*a, **k):
                    stock_calls.append(name)
                    return kernel.call_boxed(*a, **k)
            return K
    monkeypatch.setattr(bi, "_STOCK_AUTOGRAD", Counting())
    monkeypatch.setattr(bi, "_AUTOGRAD_IMPLS", {n: bi._autograd_entry(n, fn, takes)
                                                for n, (fn, takes) in bi._TRACED.items() if n in real})
    monkeypatch.setattr(bi, "_active", (False, frozenset(), None))   # re-register with the counting entries
    for name, fn in calls.items():
        with bitstable.set_batch_invariant_mode():
            stock_calls.clear()
            plain = fn(x)
            assert not stock_calls, f"{name}: a call without grad went through the stock autograd kernel"
            xg = x.clone().requires_grad_(True)
            with_grad = fn(xg)
            assert with_grad.requires_grad, name
            assert torch.equal(plain, with_grad.detach()), f"{name}: bits differ with and without grad"
            with torch.no_grad():
                assert torch.equal(fn(xg), plain), f"{name}: bits differ under no_grad"
    import torch.autograd.forward_ad as fwad
    with bitstable.set_batch_invariant_mode(), fwad.dual_level():
        dual = fwad.make_dual(x, torch.ones_like(x))
        tangent = fwad.unpack_dual(torch.softmax(dual, -1)).tangent
    assert tangent is not None and torch.isfinite(tangent).all()
