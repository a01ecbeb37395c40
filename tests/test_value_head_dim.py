"""A value head dim Dv other than q/k's D (Dv <= D), as in DeepSeek's MLA prefill (192 / 128).

v is zero-padded inside to q/k's head dim; out is [..., Dv]; gradients keep the inputs'
shapes.  Accuracy against float64 with the suite's tolerance rule, varlen = alone, batch
invariance forward and backward, the stock path, and the errors.
"""

import pytest
import torch

import bitstable
from bitstable import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from bitstable.reference import attention_reference, flash_backward_slack
from bitstable.testing import Shape, check_backward_batch_invariance, check_batch_invariance


@pytest.fixture(autouse=True)
def _small_splits(device):
    with bitstable.set_deterministic_mode(True, split_size=32 if device == "cpu" else 1024):
        yield


def _rand(*shape, dtype, device, g):
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _grads(fn, q, k, v, dout):
    q, k, v = _leaves(q, k, v)
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _check_accuracy(q, k, v, dout, kw):
    dtype = q.dtype
    ours = _grads(lambda *t: flash_attn_func(*t, **kw), q, k, v, dout)
    ref = _grads(lambda *t: attention_reference(*t, compute_dtype=torch.float64, **kw)[0],
                 q.double(), k.double(), v.double(), dout)
    stock = _grads(lambda *t: attention_reference(*t, compute_dtype=dtype, **kw)[0], q, k, v, dout)
    slack = (0.0,) + flash_backward_slack(q, k, v, ours[0], dout, **kw)
    eps = torch.finfo(dtype).eps
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        a, r, s = ours[i], ref[i], stock[i]
        assert a.shape == r.shape and a.dtype == dtype and not a.isnan().any(), name
        err, err_s = (a.double() - r).abs().max().item(), (s.double() - r).abs().max().item()
        tol = 2 * err_s + (1 if i == 0 else 4) * eps * r.abs().max().item() + slack[i]
        assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (stock {err_s:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D,Dv,kw", [pytest.param(24, 16, dict(causal=True), id="d24-dv16-causal"),
                                     pytest.param(40, 13, dict(window_size=(7, 2), softcap=3.0),
                                                  id="d40-dv13-window-softcap")])
def test_forward_backward_vs_float64(dtype, D, Dv, kw, device):
    g = torch.Generator().manual_seed(30)
    q = _rand(2, 17, 4, D, dtype=dtype, device=device, g=g)
    k = _rand(2, 23, 2, D, dtype=dtype, device=device, g=g)
    v = _rand(2, 23, 2, Dv, dtype=dtype, device=device, g=g)
    dout = _rand(2, 17, 4, Dv, dtype=dtype, device=device, g=g)
    _check_accuracy(q, k, v, dout, kw)


def test_varlen_sequences_equal_alone(device):
    g = torch.Generator().manual_seed(31)
    dtype, D, Dv, lens = torch.float16, 32, 24, [11, 0, 20]
    tot = sum(lens)
    q, k = (_rand(tot, 2, D, dtype=dtype, device=device, g=g) for _ in range(2))
    v = _rand(tot, 2, Dv, dtype=dtype, device=device, g=g)
    dout = _rand(tot, 2, Dv, dtype=dtype, device=device, g=g)
    cu = torch.tensor([0, 11, 11, 31], dtype=torch.int32, device=device)
    packed = _grads(lambda *t: flash_attn_varlen_func(*t, cu, cu, 20, 20, causal=True), q, k, v, dout)
    assert packed[0].shape == (tot, 2, Dv)
    for a, b in ((0, 11), (11, 31)):
        alone = _grads(lambda *t: flash_attn_func(*t, causal=True), q[None, a:b], k[None, a:b], v[None, a:b],
                       dout[None, a:b])
        for name, x, y in zip(("out", "dq", "dk", "dv"), packed, alone):
            assert torch.equal(x[a:b], y[0]), f"rows {a}:{b} {name}"


SHAPE = Shape(batch=2, heads_q=2, heads_kv=1, seqlen_q=19, seqlen_k=27, head_dim=32)


def _dv(Dv):
    """The harness draws v with q's head dim: take its first Dv columns (a strided view)."""
    def fn(q, k, v, **kw):
        return flash_attn_func(q, k, v[..., :Dv], **kw)
    return fn


def test_batch_invariance_forward_and_backward(device):
    fn = _dv(24)
    r = check_batch_invariance(fn, SHAPE, torch.float16, device, batch_sizes=(3,), causal=True)
    assert r.passed, r.detail
    # backward by hand (the harness's dout has q's head dim): sequence 0 alone = at every
    # position of a batch of 3
    g = torch.Generator().manual_seed(35)
    dt = torch.float16
    q, k = (_rand(3, 19, 2, 32, dtype=dt, device=device, g=g), _rand(3, 27, 1, 32, dtype=dt, device=device, g=g))
    v, dout = _rand(3, 27, 1, 24, dtype=dt, device=device, g=g), _rand(3, 19, 2, 24, dtype=dt, device=device, g=g)
    alone = _grads(lambda *t: flash_attn_func(*t, causal=True), q[:1], k[:1], v[:1], dout[:1])
    for pos in range(3):
        bq, bk, bv, bd = (t[torch.tensor(_place(pos), device=device)]
                          for t in (q, k, v, dout))
        batched = _grads(lambda *t: flash_attn_func(*t, causal=True), bq, bk, bv, bd)
        for name, a, b in zip(("out", "dq", "dk", "dv"), alone, batched):
            assert torch.equal(a[0], b[pos]), f"{name} at position {pos}"


def _place(pos):
    """Batch order putting sequence 0 at ``pos`` (the others after it, in order)."""
    rest = [1, 2]
    return rest[:pos] + [0] + rest[pos:]


def test_stock_path_keeps_the_shapes(device):
    g = torch.Generator().manual_seed(32)
    q, k = (_rand(1, 9, 2, 24, dtype=torch.float32, device=device, g=g) for _ in range(2))
    v = _rand(1, 9, 2, 16, dtype=torch.float32, device=device, g=g)
    ours = flash_attn_func(q, k, v, causal=True)
    with bitstable.set_deterministic(False):
        stock = flash_attn_func(q, k, v, causal=True)
    assert stock.shape == ours.shape == (1, 9, 2, 16)
    assert (stock - ours).abs().max().item() < 1e-5


def test_errors(device):
    g = torch.Generator().manual_seed(33)
    q, k = (_rand(1, 8, 2, 16, dtype=torch.float32, device=device, g=g) for _ in range(2))
    with pytest.raises(ValueError, match=r"v head dim \(value head dim\) must be in \[1, k's head dim 16\]"):
        flash_attn_func(q, k, _rand(1, 8, 2, 24, dtype=torch.float32, device=device, g=g))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        flash_attn_func(q, k, _rand(1, 7, 2, 8, dtype=torch.float32, device=device, g=g))
    kc = torch.zeros(1, 16, 2, 16, device=device)
    vc = torch.zeros(1, 16, 2, 8, device=device)
    before = kc.clone(), vc.clone()
    with pytest.raises(ValueError, match=r"v_cache head dim \(value head dim\) must be in \[1, k_cache's"):
        flash_attn_with_kvcache(q[:, :1], kc, torch.zeros(1, 16, 2, 24, device=device),
                                cache_seqlens=torch.zeros(1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"k/v must have shape \(batch=1, seqlen_new, heads_k=2, headdim=16 / 8\)"):
        flash_attn_with_kvcache(q[:, :1], kc, vc, k=k[:, :1], v=k[:, :1],
                                cache_seqlens=torch.zeros(1, dtype=torch.int32, device=device))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_with_a_smaller_value_head_dim_equals_the_full_forward(paged, device):
    """Chunked prefill then decode through caches whose v head dim (24) is below q/k's (40):
    each chunk's output is bitwise the full forward's (which zero-pads v), out is [..., 24]."""
    g = torch.Generator().manual_seed(35)
    L, Hq, Hk, D, Dv = 37, 4, 2, 40, 24
    q = _rand(1, L, Hq, D, dtype=torch.float16, device=device, g=g)
    k = _rand(1, L, Hk, D, dtype=torch.float16, device=device, g=g)
    v = _rand(1, L, Hk, Dv, dtype=torch.float16, device=device, g=g)
    full = flash_attn_func(q, k, v, causal=True)
    if paged:
        kc, vc = torch.zeros(4, 16, Hk, D, device=device).half(), torch.zeros(4, 16, Hk, Dv, device=device).half()
        table = torch.tensor([[2, 0, 3]], dtype=torch.int32, device=device)
    else:
        kc, vc = torch.zeros(1, L + 3, Hk, D, device=device).half(), torch.zeros(1, L + 3, Hk, Dv, device=device).half()
        table = None
    outs, t = [], 0
    for n in (20, 1, 1, 9, 1, 5):
        outs.append(flash_attn_with_kvcache(q[:, t:t + n], kc, vc, k[:, t:t + n], v[:, t:t + n], cache_seqlens=t,
                                            block_table=table, causal=True))
        t += n
    got = torch.cat(outs, 1)
    assert got.shape == (1, L, Hq, Dv)
    assert torch.equal(got, full)


@pytest.mark.gpu
def test_gpu_mla_prefill_shape_vs_float64(device):
    """DeepSeek MLA prefill: q/k 192, v 128, bf16, causal, GQA-free, L 2048."""
    g = torch.Generator().manual_seed(34)
    dtype = torch.bfloat16
    q, k = (_rand(1, 2048, 8, 192, dtype=dtype, device=device, g=g) for _ in range(2))
    v = _rand(1, 2048, 8, 128, dtype=dtype, device=device, g=g)
    dout = _rand(1, 2048, 8, 128, dtype=dtype, device=device, g=g)
    _check_accuracy(q, k, v, dout, dict(causal=True))
