"""Forward accuracy against a float64 reference, with tolerances relative to
stock PyTorch's own error in the same dtype (FlashAttention's test rule)."""

import pytest
import torch

from bitstable import flash_attn_func
from bitstable.reference import attention_reference

from cases import CPU_FEATURES, GPU_FEATURES, make_inputs, params


@pytest.mark.parametrize("dtype,sizes,kw", params(CPU_FEATURES, GPU_FEATURES))
def test_forward_matches_float64_reference(dtype, sizes, kw, device):
    q, k, v, kw = make_inputs(sizes, kw, dtype, device)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert probs is None
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output"

    ref_kw = {k_: v_ for k_, v_ in kw.items()}
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), **ref_kw)
    stock, stock_lse = attention_reference(q, k, v, **ref_kw)          # stock PyTorch, same dtype
    err = (out.double() - ref).abs().max().item()
    err_stock = (stock.double() - ref).abs().max().item()
    floor = torch.finfo(dtype).eps * ref.abs().max().item()
    assert err <= 2 * err_stock + floor, f"max error {err:.3g} vs stock {err_stock:.3g} (floor {floor:.3g})"

    # log-sum-exp: +inf exactly where a row sees no key, close elsewhere
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    if (~empty).any():
        lerr = (lse.double() - ref_lse)[~empty].abs().max().item()
        lerr_stock = (stock_lse.double() - ref_lse)[~empty].abs().max().item()
        assert lerr <= 2 * lerr_stock + 1e-5 * (1 + ref_lse[~empty].abs().max().item()), (lerr, lerr_stock)
    if empty.any():  # rows that see no key are exactly zero
        rows = empty.transpose(1, 2)  # B, Lq, H
        assert (out[rows] == 0).all()
