"""flash-attn's API surface (issue 16): the packed variants, window_size as a tuple, list
or tensor, head dims that are not a multiple of 8, ``reduction_tree``, and paged k/v in
the varlen function.  Contract checks are bitwise (``torch.equal``); accuracy checks use
the float64 reference with the tolerance rule of test_attention_accuracy.py /
test_attention_backward.py."""

import math

import pytest
import torch

import bitstable
import bitstable.flash_attn
from bitstable import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                       flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                       flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
from bitstable.reference import attention_reference
from bitstable.testing import Shape, check_backward_batch_invariance, check_batch_invariance

FP = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture(autouse=True)
def _small_splits(device):
    with bitstable.set_deterministic_mode(True, split_size=32 if device == "cpu" else 512):
        yield


def _rand(*shape, dtype, device, g):
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# ---------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------

PACKED = ["flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
          "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"]


def test_exports_match_flash_attn():
    names = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", *PACKED]
    for name in names:
        assert name in bitstable.__all__ and name in bitstable.flash_attn.__all__
        assert getattr(bitstable, name) is getattr(bitstable.flash_attn, name)


def test_packed_signatures_are_flash_attns():
    import inspect

    tail = ["dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
            "deterministic", "return_attn_probs"]
    want = {
        "flash_attn_qkvpacked_func": ["qkv"] + tail,
        "flash_attn_kvpacked_func": ["q", "kv"] + tail,
        "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"] + tail,
        "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k",
                                            "max_seqlen_q", "max_seqlen_k"] + tail,
    }
    defaults = dict(dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)
    for name, params in want.items():
        sig = inspect.signature(getattr(bitstable, name))
        positional = [p for p, v in sig.parameters.items() if v.kind != v.KEYWORD_ONLY]
        assert positional == params, name
        # bitstable's own additions are keyword-only, after flash-attn's arguments
        assert [p for p, v in sig.parameters.items() if v.kind == v.KEYWORD_ONLY] == ["dropout_seeds"], name
        for p, d in defaults.items():
            assert sig.parameters[p].default == d, (name, p)


# ---------------------------------------------------------------------------------------
# Packed variants: out bitwise the unpacked call's, grads bitwise its grads stacked
# ---------------------------------------------------------------------------------------

def _check_grads_stacked(packed_grad, grads, dim):
    assert packed_grad is not None, "no gradient reached the packed tensor"
    assert torch.equal(packed_grad, torch.stack(grads, dim)), "packed grad != unpacked grads stacked"


@pytest.mark.parametrize("dtype", FP)
@pytest.mark.parametrize("D", [pytest.param(32, id="d32"), pytest.param(20, id="d20-padded")])
def test_qkvpacked_equals_unpacked(dtype, D, device):
    g = torch.Generator().manual_seed(0)
    qkv = _rand(2, 37, 3, 2, D, dtype=dtype, device=device, g=g)
    dout = _rand(2, 37, 2, D, dtype=dtype, device=device, g=g)
    kw = dict(causal=True, softcap=4.0)
    (p,) = _leaves(qkv)
    out, lse, probs = flash_attn_qkvpacked_func(p, return_attn_probs=True, **kw)
    q, k, v = _leaves(*qkv.unbind(2))
    ref, ref_lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert probs is None and out.shape == (2, 37, 2, D)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    out.backward(dout)
    ref.backward(dout)
    _check_grads_stacked(p.grad, [q.grad, k.grad, v.grad], 2)


@pytest.mark.parametrize("dtype", FP)
def test_kvpacked_equals_unpacked(dtype, device):
    """GQA, seqlen_q != seqlen_k, a window given as a tensor."""
    g = torch.Generator().manual_seed(1)
    q0 = _rand(2, 23, 4, 32, dtype=dtype, device=device, g=g)
    kv0 = _rand(2, 41, 2, 2, 32, dtype=dtype, device=device, g=g)
    dout = _rand(2, 23, 4, 32, dtype=dtype, device=device, g=g)
    q, kv = _leaves(q0, kv0)
    out = flash_attn_kvpacked_func(q, kv, window_size=torch.tensor([9, 3]))
    q2, k2, v2 = _leaves(q0, *kv0.unbind(2))
    ref = flash_attn_func(q2, k2, v2, window_size=(9, 3))
    assert torch.equal(out, ref)
    out.backward(dout)
    ref.backward(dout)
    assert torch.equal(q.grad, q2.grad)
    _check_grads_stacked(kv.grad, [k2.grad, v2.grad], 2)


def test_varlen_qkvpacked_equals_unpacked(device):
    g = torch.Generator().manual_seed(2)
    lens = [7, 0, 33, 18]
    dtype = torch.float16
    qkv0 = _rand(sum(lens), 3, 2, 24, dtype=dtype, device=device, g=g)
    dout = _rand(sum(lens), 2, 24, dtype=dtype, device=device, g=g)
    cu = _cu(lens, device)
    (p,) = _leaves(qkv0)
    out, lse, _ = flash_attn_varlen_qkvpacked_func(p, cu, max(lens), causal=True, return_attn_probs=True)
    q, k, v = _leaves(*qkv0.unbind(1))
    ref, ref_lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                             return_attn_probs=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    out.backward(dout)
    ref.backward(dout)
    _check_grads_stacked(p.grad, [q.grad, k.grad, v.grad], 1)


def test_varlen_kvpacked_equals_unpacked(device):
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k = [5, 30, 12], [20, 30, 40]
    dtype = torch.float32
    q0 = _rand(sum(lens_q), 4, 16, dtype=dtype, device=device, g=g)
    kv0 = _rand(sum(lens_k), 2, 1, 16, dtype=dtype, device=device, g=g)
    dout = _rand(sum(lens_q), 4, 16, dtype=dtype, device=device, g=g)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    q, kv = _leaves(q0, kv0)
    out = flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                          window_size=[6, 0])
    q2, k2, v2 = _leaves(q0, *kv0.unbind(1))
    ref = flash_attn_varlen_func(q2, k2, v2, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                 window_size=(6, 0))
    assert torch.equal(out, ref)
    out.backward(dout)
    ref.backward(dout)
    assert torch.equal(q.grad, q2.grad)
    _check_grads_stacked(kv.grad, [k2.grad, v2.grad], 1)


def test_packed_padded_torch_compile_fullgraph(device):
    """The packed unbind and the head-dim padding trace with no graph break; same bits."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(15)
    qkv0 = _rand(1, 17, 3, 2, 20, dtype=torch.float16, device=device, g=g)
    fn = lambda t: flash_attn_qkvpacked_func(t, causal=True)  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager" if device == "cpu" else "inductor", fullgraph=True)
    a, b = _leaves(qkv0, qkv0)
    out_c, out_e = compiled(a), fn(b)
    assert torch.equal(out_c, out_e)
    out_c.float().sum().backward()
    out_e.float().sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_packed_stock_path(device):
    """set_deterministic(False): the packed variants route to stock PyTorch too."""
    g = torch.Generator().manual_seed(4)
    qkv = _rand(1, 20, 3, 2, 16, dtype=torch.float32, device=device, g=g)
    with bitstable.set_deterministic(False):
        out = flash_attn_qkvpacked_func(qkv, causal=True)
        stock = flash_attn_func(*qkv.unbind(2), causal=True)
    assert torch.equal(out, stock)
    ref, _ = attention_reference(*(t.double() for t in qkv.unbind(2)), causal=True)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_packed_errors_name_the_packed_argument(device):
    g = torch.Generator().manual_seed(5)
    qkv = _rand(1, 8, 3, 2, 16, dtype=torch.float16, device=device, g=g)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        flash_attn_qkvpacked_func(qkv.tolist())
    with pytest.raises(ValueError, match=r"qkv\.shape\[2\] must be 3"):
        flash_attn_qkvpacked_func(qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\)"):
        flash_attn_qkvpacked_func(qkv[0])
    with pytest.raises(TypeError, match="qkv must be bfloat16, float16 or float32"):
        flash_attn_qkvpacked_func(qkv.double())
    with pytest.raises(ValueError, match=r"head dim \(qkv\[:, :, 0\]\.shape\[-1\]\) must be in \[1, 256\]"):
        flash_attn_qkvpacked_func(torch.zeros(1, 8, 3, 2, 264, dtype=torch.float16, device=device))
    q = qkv[:, :, 0]
    with pytest.raises(ValueError, match=r"kv\.shape\[2\] must be 2"):
        flash_attn_kvpacked_func(q, qkv)
    with pytest.raises(TypeError, match=r"kv\[:, :, 0\] dtype torch.float32 must match q's"):
        flash_attn_kvpacked_func(q, qkv[:, :, :2].float())
    with pytest.raises(ValueError, match=r"number of q heads \(2\) must be a multiple of the number of "
                                         r"kv\[:, :, 0\]/kv\[:, :, 1\] heads \(3\)"):
        flash_attn_kvpacked_func(q, torch.zeros(1, 8, 2, 3, 16, dtype=torch.float16, device=device))
    flat = qkv[0]                                   # (total, 3, H, D)
    cu = _cu([8], device)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        flash_attn_varlen_qkvpacked_func(flat, cu.long(), 8)
    with pytest.raises(ValueError, match=r"max_seqlen=4 is smaller than the longest sequence \(8\)"):
        flash_attn_varlen_qkvpacked_func(flat, cu, 4)
    with pytest.raises(ValueError, match=r"qkv must have shape \(total, 3, nheads, headdim\)"):
        flash_attn_varlen_qkvpacked_func(qkv, cu, 8)
    with pytest.raises(ValueError, match=r"kv\.shape\[1\] must be 2"):
        flash_attn_varlen_kvpacked_func(flat[:, 0], flat, cu, cu, 8, 8)
    with pytest.raises(ValueError, match=r"dropout_seeds must have shape \(1,\)"):
        flash_attn_qkvpacked_func(qkv, dropout_p=0.1, dropout_seeds=torch.tensor([1, 2], device=device))


# ---------------------------------------------------------------------------------------
# window_size: tuple, list or tensor
# ---------------------------------------------------------------------------------------

WINDOWS = [pytest.param([7, 2], id="list"),
           pytest.param(torch.tensor([7, 2]), id="int64-tensor"),
           pytest.param(torch.tensor([7, 2], dtype=torch.int32), id="int32-tensor"),
           pytest.param((torch.tensor(7), torch.tensor(2)), id="tuple-of-0d-tensors")]


@pytest.mark.parametrize("window", WINDOWS)
def test_window_size_forms_give_the_tuples_bits(window, device):
    g = torch.Generator().manual_seed(6)
    q, k, v = (_rand(1, 30, 2, 16, dtype=torch.float16, device=device, g=g) for _ in range(3))
    want = flash_attn_func(q, k, v, window_size=(7, 2))
    assert torch.equal(flash_attn_func(q, k, v, window_size=window), want)
    assert torch.equal(flash_attn_varlen_func(q[0], k[0], v[0], _cu([30], device), _cu([30], device), 30, 30,
                                              window_size=window), want[0])
    with bitstable.set_deterministic(False):   # the stock path takes them as well
        stock = flash_attn_func(q, k, v, window_size=window)
        assert torch.equal(stock, flash_attn_func(q, k, v, window_size=(7, 2)))


def test_window_size_tensor_in_kvcache(device):
    g = torch.Generator().manual_seed(7)
    q = _rand(1, 3, 2, 16, dtype=torch.float16, device=device, g=g)
    kc, vc = (_rand(1, 32, 2, 16, dtype=torch.float16, device=device, g=g) for _ in range(2))
    seqlens = torch.tensor([25], dtype=torch.int32)
    want = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True, window_size=(9, 0))
    got = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True,
                                  window_size=torch.tensor([9, 0]))
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [5, (1.0, 2), (1, 2, 3), "ab", (True, 0), torch.tensor([1.0, 2.0]),
                                 torch.tensor([1, 2, 3]), torch.tensor([[1], [2]]), None])
def test_window_size_bad_type(bad, device):
    g = torch.Generator().manual_seed(8)
    q, k, v = (_rand(1, 8, 2, 16, dtype=torch.float16, device=device, g=g) for _ in range(3))
    with pytest.raises(TypeError, match=r"window_size must be a pair of ints \(left, right\): a tuple, "
                                        r"a list or a 2-element integer tensor"):
        flash_attn_func(q, k, v, window_size=bad)
    with pytest.raises(TypeError, match="window_size must be a pair"):
        flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), window_size=bad)


def test_window_size_bad_value(device):
    g = torch.Generator().manual_seed(9)
    q, k, v = (_rand(1, 8, 2, 16, dtype=torch.float16, device=device, g=g) for _ in range(3))
    with pytest.raises(ValueError, match=r"window_size entries must be >= -1 .* got \(-2, 0\)"):
        flash_attn_func(q, k, v, window_size=torch.tensor([-2, 0]))


# ---------------------------------------------------------------------------------------
# Head dims that are not a multiple of 8
# ---------------------------------------------------------------------------------------

def _tolerance_ok(out, ref, stock, dtype, factor=1):
    err = (out.double() - ref).abs().max().item()
    err_stock = (stock.double() - ref).abs().max().item()
    floor = factor * torch.finfo(dtype).eps * ref.abs().max().item()
    return err <= 2 * err_stock + floor, f"max error {err:.3g} vs stock {err_stock:.3g} (floor {floor:.3g})"


ODD = [pytest.param(1, dict(causal=True), id="d1-causal"),
       pytest.param(13, dict(window_size=(9, 4), softcap=3.0), id="d13-window-softcap"),
       pytest.param(59, dict(causal=True), id="d59-causal")]


@pytest.mark.parametrize("dtype", FP)
@pytest.mark.parametrize("D,kw", ODD)
def test_odd_head_dim_forward_backward_vs_float64(dtype, D, kw, device):
    g = torch.Generator().manual_seed(10)
    q0 = _rand(1, 21, 2, D, dtype=dtype, device=device, g=g)
    k0, v0 = (_rand(1, 29, 1, D, dtype=dtype, device=device, g=g) for _ in range(2))
    dout = _rand(1, 21, 2, D, dtype=dtype, device=device, g=g)
    q, k, v = _leaves(q0, k0, v0)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert out.shape == q.shape and out.dtype == dtype and not out.isnan().any()
    out.backward(dout)
    ours = (q.grad, k.grad, v.grad)
    for t, src in zip(ours, (q0, k0, v0)):
        assert t.shape == src.shape and t.dtype == dtype and not t.isnan().any()

    def run(compute, *ts):
        ts = _leaves(*ts)
        o, l_ = attention_reference(*ts, compute_dtype=compute, **kw)
        o.backward(dout.to(o.dtype))
        return o, l_, [t.grad for t in ts]

    ref, ref_lse, ref_grads = run(torch.float64, q0.double(), k0.double(), v0.double())
    stock, _, stock_grads = run(dtype, q0, k0, v0)
    ok, msg = _tolerance_ok(out, ref, stock, dtype)
    assert ok, "out: " + msg
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    for name, a, r, s in zip(("dq", "dk", "dv"), ours, ref_grads, stock_grads):
        ok, msg = _tolerance_ok(a, r, s, dtype, factor=4)
        assert ok, f"{name}: {msg}"


def test_odd_head_dim_varlen_vs_float64(device):
    g = torch.Generator().manual_seed(11)
    dtype, D, lens = torch.float16, 27, [9, 0, 26]
    q0, k0, v0 = (_rand(sum(lens), 2, D, dtype=dtype, device=device, g=g) for _ in range(3))
    dout = _rand(sum(lens), 2, D, dtype=dtype, device=device, g=g)
    cu = _cu(lens, device)
    q, k, v = _leaves(q0, k0, v0)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    assert out.shape == q.shape
    out.backward(dout)
    for i in range(len(lens)):
        a, b = cu[i].item(), cu[i + 1].item()
        if a == b:
            continue
        seq = [t[None, a:b] for t in (q0, k0, v0)]
        ref, _ = attention_reference(*(t.double() for t in seq), causal=True)
        stock, _ = attention_reference(*seq, causal=True)
        ok, msg = _tolerance_ok(out[None, a:b], ref, stock, dtype)
        assert ok, f"sequence {i}: {msg}"
        # the packed sequence's own grads are those of the dense call (batch invariance)
        qs, ks, vs = _leaves(*seq)
        alone = flash_attn_func(qs, ks, vs, causal=True)
        assert torch.equal(out[a:b], alone[0])
        alone.backward(dout[None, a:b])
        for name, packed, single in (("dq", q.grad, qs.grad), ("dk", k.grad, ks.grad), ("dv", v.grad, vs.grad)):
            assert torch.equal(packed[a:b], single[0]), f"sequence {i}: {name}"


def test_odd_head_dim_default_scale_is_the_unpadded_one(device):
    g = torch.Generator().manual_seed(12)
    q, k, v = (_rand(1, 16, 2, 12, dtype=torch.float32, device=device, g=g) for _ in range(3))
    out = flash_attn_func(q, k, v)
    assert torch.equal(out, flash_attn_func(q, k, v, softmax_scale=1 / math.sqrt(12)))
    assert not torch.equal(out, flash_attn_func(q, k, v, softmax_scale=1 / math.sqrt(16)))


ODD_SHAPE = Shape(batch=2, heads_q=2, heads_kv=1, seqlen_q=19, seqlen_k=27, head_dim=13)


def test_odd_head_dim_batch_invariance(device):
    r = check_batch_invariance(flash_attn_func, ODD_SHAPE, torch.float16, device, batch_sizes=(3,),
                               causal=True)
    assert r.passed, r.detail
    r = check_backward_batch_invariance(flash_attn_func, ODD_SHAPE, torch.float16, device,
                                        batch_sizes=(3,), causal=True)
    assert r.passed, r.detail


@pytest.mark.parametrize("D", [0, 264, 512])
def test_head_dim_out_of_range(D, device):
    q = torch.zeros(1, 4, 2, D, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=r"head dim \(q.shape\[-1\]\) must be in \[1, 256\]"):
        flash_attn_func(q, q, q)
    with pytest.raises(ValueError, match=r"head dim \(q.shape\[-1\]\) must be in \[1, 256\]"):
        flash_attn_varlen_func(q[0], q[0], q[0], _cu([4], device), _cu([4], device), 4, 4)


def test_kvcache_takes_any_head_dim_and_refuses_out_of_range(device):
    """flash_attn_with_kvcache takes head dims that are not a multiple of 8 (the decode
    kernels mask the columns past them: test_kvcache_leftpad.py checks the bits against
    the full forward at D59) and refuses 0 and > 256 before writing."""
    q = torch.randn(1, 1, 2, 12, dtype=torch.float16).to(device)
    kc = torch.randn(1, 16, 2, 12, dtype=torch.float16).to(device)
    out = flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=4)
    assert out.shape == (1, 1, 2, 12) and not out.isnan().any()
    big = torch.zeros(1, 16, 2, 264, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=r"head dim \(q.shape\[-1\]\) must be in \[1, 256\]"):
        flash_attn_with_kvcache(big[:, :1], big, big.clone(), cache_seqlens=4)


# ---------------------------------------------------------------------------------------
# set_deterministic_mode(reduction_tree=...)
# ---------------------------------------------------------------------------------------

def test_reduction_tree_values():
    before = bitstable.get_deterministic_mode()
    for ok in ("sequential", None):
        with bitstable.set_deterministic_mode(True, split_size=64, reduction_tree=ok):
            assert bitstable.get_deterministic_mode() == (True, 64)
    with pytest.raises(NotImplementedError, match="reduction_tree='pairwise' is not implemented"):
        bitstable.set_deterministic_mode(True, reduction_tree="pairwise")
    with pytest.raises(ValueError, match="reduction_tree must be 'sequential'"):
        bitstable.set_deterministic_mode(True, reduction_tree="tree")
    with pytest.raises(TypeError, match="reduction_tree must be a str or None"):
        bitstable.set_deterministic_mode(True, reduction_tree=2)
    assert bitstable.get_deterministic_mode() == before, "a refused call changed the mode"
    from bitstable.mode import REDUCTION_TREES
    assert set(REDUCTION_TREES) == {"sequential", "pairwise"}


# ---------------------------------------------------------------------------------------
# flash_attn_varlen_func(block_table=...): paged k/v give the contiguous call's bits
# ---------------------------------------------------------------------------------------

def _paged(ks, vs, page_size, num_blocks, g, device):
    """Scatter each sequence's keys/values into shuffled pages; returns (k_pages, v_pages,
    block_table)."""
    Hk, D = ks[0].shape[1:]
    kp = torch.randn(num_blocks, page_size, Hk, D, generator=g).to(ks[0].dtype).to(device)
    vp = torch.randn(num_blocks, page_size, Hk, D, generator=g).to(ks[0].dtype).to(device)
    max_pages = max(-(-k.shape[0] // page_size) for k in ks)
    order = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.zeros(len(ks), max_pages + 1, dtype=torch.int32)   # one spare page per row
    for i, (k, v) in enumerate(zip(ks, vs)):
        for j in range(-(-k.shape[0] // page_size)):
            page = order.pop()
            table[i, j] = page
            kp[page, :k[j * page_size:(j + 1) * page_size].shape[0]] = k[j * page_size:(j + 1) * page_size]
            vp[page, :v[j * page_size:(j + 1) * page_size].shape[0]] = v[j * page_size:(j + 1) * page_size]
    return kp, vp, table.to(device)


@pytest.mark.parametrize("page_size,D", [pytest.param(16, 20, id="page16-d20-padded"),
                                         pytest.param(32, 32, id="page32-d32")])
def test_varlen_block_table_equals_contiguous(page_size, D, device):
    g = torch.Generator().manual_seed(13)
    dtype = torch.float16
    lens_q, lens_k = [5, 0, 19, 11], [21, 9, 37, 11]
    q0 = _rand(sum(lens_q), 2, D, dtype=dtype, device=device, g=g)
    ks = [_rand(n, 1, D, dtype=dtype, device=device, g=g) for n in lens_k]
    vs = [_rand(n, 1, D, dtype=dtype, device=device, g=g) for n in lens_k]
    kp, vp, table = _paged(ks, vs, page_size, 12, g, device)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    kw = dict(causal=True, softcap=5.0, return_attn_probs=True)
    (q,) = _leaves(q0)
    out, lse, _ = flash_attn_varlen_func(q, kp, vp, *args, block_table=table, **kw)
    (q2,) = _leaves(q0)
    ref, ref_lse, _ = flash_attn_varlen_func(q2, torch.cat(ks), torch.cat(vs), *args, **kw)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    dout = _rand(*out.shape, dtype=dtype, device=device, g=g)
    out.backward(dout)
    ref.backward(dout)
    assert torch.equal(q.grad, q2.grad)


def test_varlen_block_table_gradients(device):
    """dk/dv of the pages: the contiguous call's at the used slots, 0 elsewhere; a page two
    sequences share (a common prefix) sums their gradients in ascending sequence order."""
    g = torch.Generator().manual_seed(16)
    dtype, ps, D = torch.float16, 16, 16
    lens_q, lens_k = [6, 9, 4], [20, 35, 16]
    kp0, vp0 = (_rand(8, ps, 1, D, dtype=dtype, device=device, g=g) for _ in range(2))
    # sequence 0: pages 5, 1; sequence 1: pages 5 (shared prefix), 2, 7; sequence 2: page 3
    table = torch.tensor([[5, 1, 0], [5, 2, 7], [3, 0, 0]], dtype=torch.int32, device=device)
    q0 = _rand(sum(lens_q), 2, D, dtype=dtype, device=device, g=g)
    dout = _rand(sum(lens_q), 2, D, dtype=dtype, device=device, g=g)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    slots = []     # (sequence, key) -> (page, slot), ascending
    for i, n in enumerate(lens_k):
        slots += [(int(table[i, j // ps]), j % ps) for j in range(n)]
    q, kp, vp = _leaves(q0, kp0, vp0)
    out = flash_attn_varlen_func(q, kp, vp, *args, causal=True, block_table=table)
    q2, kc, vc = _leaves(q0, torch.stack([kp0[p, s_] for p, s_ in slots]),
                         torch.stack([vp0[p, s_] for p, s_ in slots]))
    ref = flash_attn_varlen_func(q2, kc, vc, *args, causal=True)
    assert torch.equal(out, ref)
    out.backward(dout)
    ref.backward(dout)
    assert torch.equal(q.grad, q2.grad)
    for name, paged, contiguous in (("dk", kp.grad, kc.grad), ("dv", vp.grad, vc.grad)):
        want = torch.zeros_like(paged)
        for t, (p, s_) in enumerate(slots):        # ascending (sequence, key) order
            want[p, s_] = want[p, s_] + contiguous[t]
        assert torch.equal(paged, want), name
    assert kp.grad[4].eq(0).all() and kp.grad[0].eq(0).all(), "unused pages must get zero gradient"


def test_varlen_block_table_errors(device):
    g = torch.Generator().manual_seed(14)
    dtype = torch.float16
    q = _rand(10, 2, 16, dtype=dtype, device=device, g=g)
    kp = _rand(4, 16, 2, 16, dtype=dtype, device=device, g=g)
    cu_q, cu_k = _cu([4, 6], device), _cu([20, 16], device)
    table = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32, device=device)
    args = (cu_q, cu_k, 6, 20)
    with pytest.raises(TypeError, match="block_table must be int32"):
        flash_attn_varlen_func(q, kp, kp, *args, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table must have shape \(num_seqs=2, max_pages_per_seq\)"):
        flash_attn_varlen_func(q, kp, kp, *args, block_table=table[:1])
    with pytest.raises(ValueError, match="needs 2 pages of 16, but block_table has 1 pages"):
        flash_attn_varlen_func(q, kp, kp, *args, block_table=table[:, :1])
    with pytest.raises(ValueError, match=r"block_table\[1\] holds page index 7 outside \[0, 4\)"):
        flash_attn_varlen_func(q, kp, kp, *args, block_table=torch.tensor([[0, 1], [7, 0]], dtype=torch.int32,
                                                                            device=device))
    with pytest.raises(ValueError, match=r"page size \(k.shape\[1\]\) must be a positive multiple of 16"):
        flash_attn_varlen_func(q, kp[:, :8], kp[:, :8], *args, block_table=table)
    with pytest.raises(ValueError, match=r"k must have shape \(num_blocks, page_size, heads, headdim\)"):
        flash_attn_varlen_func(q, kp[0], kp[0], *args, block_table=table)


# ---------------------------------------------------------------------------------------
# Real sizes (GPU)
# ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_qkvpacked_equals_unpacked(dtype, device):
    g = torch.Generator().manual_seed(20)
    qkv0 = _rand(2, 1500, 3, 8, 128, dtype=dtype, device=device, g=g)
    dout = _rand(2, 1500, 8, 128, dtype=dtype, device=device, g=g)
    (p,) = _leaves(qkv0)
    out = flash_attn_qkvpacked_func(p, causal=True)
    q, k, v = _leaves(*qkv0.unbind(2))
    ref = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, ref)
    out.backward(dout)
    ref.backward(dout)
    _check_grads_stacked(p.grad, [q.grad, k.grad, v.grad], 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [59, 111, 203])
def test_gpu_odd_head_dim_vs_float64(dtype, D, device):
    g = torch.Generator().manual_seed(21)
    q0, k0, v0 = (_rand(2, 1024, 4, D, dtype=dtype, device=device, g=g) for _ in range(3))
    dout = _rand(2, 1024, 4, D, dtype=dtype, device=device, g=g)
    q, k, v = _leaves(q0, k0, v0)
    out = flash_attn_func(q, k, v, causal=True)
    out.backward(dout)

    def run(compute, *ts):
        ts = _leaves(*ts)
        o, _ = attention_reference(*ts, compute_dtype=compute, causal=True)
        o.backward(dout.to(o.dtype))
        return o, [t.grad for t in ts]

    ref, ref_grads = run(torch.float64, q0.double(), k0.double(), v0.double())
    stock, stock_grads = run(dtype, q0, k0, v0)
    ok, msg = _tolerance_ok(out, ref, stock, dtype)
    assert ok, msg
    for name, a, r, s in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, stock_grads):
        ok, msg = _tolerance_ok(a, r, s, dtype, factor=4)
        assert ok, f"{name}: {msg}"


@pytest.mark.gpu
def test_gpu_varlen_block_table_equals_contiguous(device):
    g = torch.Generator().manual_seed(22)
    dtype = torch.bfloat16
    lens = [1, 700, 2049, 64]
    q = _rand(sum(lens), 8, 128, dtype=dtype, device=device, g=g)
    ks = [_rand(n, 2, 128, dtype=dtype, device=device, g=g) for n in lens]
    vs = [_rand(n, 2, 128, dtype=dtype, device=device, g=g) for n in lens]
    kp, vp, table = _paged(ks, vs, 256, 20, g, device)
    cu = _cu(lens, device)
    out = flash_attn_varlen_func(q, kp, vp, cu, cu, max(lens), max(lens), causal=True, block_table=table)
    ref = flash_attn_varlen_func(q, torch.cat(ks), torch.cat(vs), cu, cu, max(lens), max(lens), causal=True)
    assert torch.equal(out, ref)
