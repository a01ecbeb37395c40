"""Bad input gets a clear error naming the argument; NaN passes through; backward says it is missing."""

import pytest
import torch

import bitstable
from bitstable import flash_attn_func


def qkv(device, dtype=torch.float16, B=1, Lq=20, Lk=20, Hq=2, Hk=2, D=32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    return r(B, Lq, Hq, D), r(B, Lk, Hk, D), r(B, Lk, Hk, D)


def test_wrong_dtype(device):
    q, k, v = qkv(device)
    with pytest.raises(TypeError, match="q must be bfloat16, float16 or float32"):
        flash_attn_func(q.to(torch.float64), k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attn_func(q, k.float(), v)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        flash_attn_func(q, k.tolist(), v)


def test_wrong_device(device):
    q, k, v = qkv(device)
    other = "meta"
    with pytest.raises(ValueError, match=r"k is on meta"):
        flash_attn_func(q, k.to(other), v)


def test_bad_shapes(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match=r"q must have shape \(batch, seqlen, heads, headdim\)"):
        flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        flash_attn_func(q, k, v[:, :10])
    with pytest.raises(ValueError, match="batch size"):
        flash_attn_func(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match="head dim 16 does not match q's 32"):
        flash_attn_func(q, k[..., :16], v[..., :16])


@pytest.mark.parametrize("D", [12, 264, 512])
def test_bad_head_dim(device, D):
    q, k, v = qkv(device, D=D)
    with pytest.raises(ValueError, match=r"head dim \(q.shape\[-1\]\) must be a multiple of 8 in \[8, 256\]"):
        flash_attn_func(q, k, v)


def test_heads_must_divide(device):
    q, k, v = qkv(device, Hq=3, Hk=2)
    with pytest.raises(ValueError, match=r"number of q heads \(3\) must be a multiple of the number of k/v heads \(2\)"):
        flash_attn_func(q, k, v)


def test_bad_options(device):
    q, k, v = qkv(device)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(TypeError, match="window_size must be a pair"):
        flash_attn_func(q, k, v, window_size=5)
    with pytest.raises(ValueError, match="window_size entries must be >= -1"):
        flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(TypeError, match="alibi_slopes must be float32"):
        flash_attn_func(q, k, v, alibi_slopes=torch.ones(2, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(2,\) or \(1, 2\)"):
        flash_attn_func(q, k, v, alibi_slopes=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="causal must be a bool"):
        flash_attn_func(q, k, v, causal="yes")
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        flash_attn_func(q, k, v, softmax_scale=float("nan"))


def test_split_size_must_fit_the_block(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match="split_size must be a positive multiple of 16"):
        bitstable.set_deterministic_mode(True, split_size=100)
    with pytest.raises(TypeError, match="split_size must be an int"):
        bitstable.set_deterministic_mode(True, split_size=64.0)
    if device == "cuda":
        with bitstable.set_deterministic_mode(True, split_size=48):
            with pytest.raises(ValueError, match="split_size=48 must be a multiple of the key block"):
                flash_attn_func(q, k, v)


def test_nan_passes_through_as_nan(device):
    q, k, v = qkv(device)
    q[0, 3, 1, 5] = float("nan")
    out = flash_attn_func(q, k, v)
    assert out[0, 3, 1].isnan().all()           # the row with NaN query
    assert not out[0, :3].isnan().any()          # other rows untouched
    k2 = k.clone()
    k2[0, 7, 0, 0] = float("nan")
    out = flash_attn_func(q.nan_to_num(), k2, v, causal=True)
    assert not out[0, :7, 0].isnan().any()      # rows that cannot see key 7
    assert out[0, 7:, 0].isnan().all()          # rows that can


def test_empty_query(device):
    q, k, v = qkv(device, Lq=0)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (1, 2, 0)


def test_alibi_slopes_with_any_strides(device):
    """(batch, heads) slopes given as a transposed view give the same bits as contiguous ones."""
    q, k, v = qkv(device, B=2, Hq=2, Hk=2)
    slopes = torch.tensor([[0.1, 0.5], [0.3, 0.2]], device=device)
    strided = slopes.t().contiguous().t()          # same values, last stride 2
    assert strided.stride(-1) != 1
    assert torch.equal(flash_attn_func(q, k, v, alibi_slopes=strided),
                       flash_attn_func(q, k, v, alibi_slopes=slopes))
