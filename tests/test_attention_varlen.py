"""flash_attn_varlen_func: a packed sequence equals the same sequence alone, bit for bit."""

import pytest
import torch

import bitstable
from bitstable import flash_attn_func, flash_attn_varlen_func

from cases import DTYPE_PARAMS, matrix

FEATURES = [
    pytest.param({}, id="plain"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window_size=(11, 2), softcap=3.0), id="window-softcap"),
    pytest.param(dict(causal=True, alibi="per-seq"), id="alibi-per-seq"),
]
CPU_LENS = ([7, 0, 40, 19], [12, 5, 40, 33])          # (q lengths, k lengths); one empty query
GPU_LENS = ([1, 700, 2049, 64, 1500], [1, 900, 2049, 1000, 1500])
SIZES = [pytest.param((CPU_LENS, 32), id="cpu-size"),
         pytest.param((GPU_LENS, 128), id="gpu-size", marks=pytest.mark.gpu)]


def _pack(lens_q, lens_k, Hq, Hk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = [torch.randn(L, Hq, D, generator=g).to(dtype).to(device) for L in lens_q]
    ks = [torch.randn(L, Hk, D, generator=g).to(dtype).to(device) for L in lens_k]
    vs = [torch.randn(L, Hk, D, generator=g).to(dtype).to(device) for L in lens_k]

    def cu(lens):
        return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)

    return qs, ks, vs, cu(lens_q), cu(lens_k)


@pytest.fixture(autouse=True)
def _small_splits(device):
    with bitstable.set_deterministic_mode(True, split_size=32 if device == "cpu" else 512):
        yield


# bf16 through the interpreter for one feature per test (cases.cpu_bf16_gpu_marked)
@pytest.mark.parametrize("dtype,feature,size",
                         matrix(DTYPE_PARAMS, FEATURES, SIZES, bf16_on_cpu=("alibi-per-seq",)))
def test_packed_equals_alone(dtype, feature, size, device):
    (lens_q, lens_k), D = size
    qs, ks, vs, cu_q, cu_k = _pack(lens_q, lens_k, 4, 2, D, dtype, device)
    kw = dict(feature)
    slopes = None
    if kw.pop("alibi", None):
        slopes = torch.rand(len(lens_q), 4, generator=torch.Generator().manual_seed(1)).to(device)
    out, lse, _ = flash_attn_varlen_func(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu_q, cu_k,
                                         max(lens_q), max(lens_k), alibi_slopes=slopes,
                                         return_attn_probs=True, **kw)
    assert out.shape == (sum(lens_q), 4, D) and lse.shape == (4, sum(lens_q))
    for i, (q, k, v) in enumerate(zip(qs, ks, vs)):
        a, b = cu_q[i].item(), cu_q[i + 1].item()
        if b == a:
            continue
        alone, alone_lse, _ = flash_attn_func(q[None], k[None], v[None], return_attn_probs=True,
                                              alibi_slopes=None if slopes is None else slopes[i:i + 1],
                                              **kw)
        assert torch.equal(out[a:b], alone[0]), f"sequence {i}: packed output differs from alone"
        assert torch.equal(lse[:, a:b], alone_lse[0]), f"sequence {i}: packed lse differs from alone"


def test_packing_neighbours_do_not_matter(device):
    """The same sequence packed with different neighbours gives the same bits."""
    qs, ks, vs, cu_q, cu_k = _pack([9, 30, 4], [9, 30, 20], 2, 1, 32, torch.float16, device)
    qs2, ks2, vs2, cu_q2, cu_k2 = _pack([30, 13], [30, 7], 2, 1, 32, torch.float16, device, seed=5)
    a = flash_attn_varlen_func(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu_q, cu_k, 30, 30, causal=True)
    b = flash_attn_varlen_func(torch.cat([qs2[0], qs[1]]), torch.cat([ks2[0], ks[1]]),
                               torch.cat([vs2[0], vs[1]]),
                               torch.tensor([0, 30, 60], dtype=torch.int32, device=device),
                               torch.tensor([0, 30, 60], dtype=torch.int32, device=device), 30, 30,
                               causal=True)
    assert torch.equal(a[9:39], b[30:60])


def test_stock_path_is_close(device):
    qs, ks, vs, cu_q, cu_k = _pack([6, 20], [10, 20], 2, 2, 32, torch.float32, device)
    args = (torch.cat(qs), torch.cat(ks), torch.cat(vs), cu_q, cu_k, 20, 20)
    ours = flash_attn_varlen_func(*args, causal=True)
    with bitstable.set_deterministic(False):
        stock = flash_attn_varlen_func(*args, causal=True)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)


def test_bad_cu_seqlens(device):
    qs, ks, vs, cu_q, cu_k = _pack([6, 20], [10, 20], 2, 2, 32, torch.float16, device)
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        flash_attn_varlen_func(q, k, v, cu_q.long(), cu_k, 20, 20)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        flash_attn_varlen_func(q, k, v, cu_q, torch.tensor([0, 30, 25], dtype=torch.int32, device=device),
                               20, 20)
    with pytest.raises(ValueError, match="must have the same length"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k[:2], 20, 20)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        flash_attn_varlen_func(q, k, v, cu_q + 1, cu_k, 20, 20)
    with pytest.raises(ValueError, match="must end at the packed length 26"):
        flash_attn_varlen_func(q, k, v, torch.tensor([0, 6, 25], dtype=torch.int32, device=device), cu_k, 20, 20)
    with pytest.raises(ValueError, match=r"max_seqlen_q=10 is smaller than the longest sequence \(20\)"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 10, 20)
    with pytest.raises(ValueError, match=r"q must have shape \(total_tokens, heads, headdim\)"):
        flash_attn_varlen_func(q[None], k, v, cu_q, cu_k, 20, 20)
    # block_table is supported (tests/test_flash_attn_api.py); with it k/v must be pages
    with pytest.raises(ValueError, match=r"k must have shape \(num_blocks, page_size, heads, headdim\) "
                                         r"with block_table"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 20, block_table=cu_q)


@pytest.mark.parametrize("dtype,feature,size",
                         matrix(DTYPE_PARAMS, FEATURES[1:3], SIZES, bf16_on_cpu=("window-softcap",)))
def test_packed_gradients_equal_alone(dtype, feature, size, device):
    (lens_q, lens_k), D = size
    qs, ks, vs, cu_q, cu_k = _pack(lens_q, lens_k, 4, 2, D, dtype, device, seed=2)
    g = torch.Generator().manual_seed(3)
    douts = [torch.randn(q.shape, generator=g).to(dtype).to(device) for q in qs]
    q, k, v = (torch.cat(t).requires_grad_(True) for t in (qs, ks, vs))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **feature)
    out.backward(torch.cat(douts))
    for t in (q.grad, k.grad, v.grad):
        assert not t.isnan().any()
    for i in range(len(qs)):
        qi, ki, vi = (t[None].clone().requires_grad_(True) for t in (qs[i], ks[i], vs[i]))
        oi = flash_attn_func(qi, ki, vi, **feature)
        oi.backward(douts[i][None])
        a, b = cu_q[i].item(), cu_q[i + 1].item()
        c, d = cu_k[i].item(), cu_k[i + 1].item()
        assert torch.equal(q.grad[a:b], qi.grad[0]), f"sequence {i}: dq differs"
        assert torch.equal(k.grad[c:d], ki.grad[0]), f"sequence {i}: dk differs"
        assert torch.equal(v.grad[c:d], vi.grad[0]), f"sequence {i}: dv differs"
