"""Mode switches: deterministic on/off (stock PyTorch), split size, restore on exit."""

import torch

import bitstable
from bitstable import flash_attn_func, get_deterministic_mode, set_deterministic, set_deterministic_mode
from bitstable.configs import DEFAULT_SPLIT_SIZE
from bitstable.reference import attention_reference


def _inputs(device, Lq=24, Lk=24):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, L, 2, 32, generator=g).to(device) for L in (Lq, Lk, Lk)]


def test_defaults():
    mode = get_deterministic_mode()
    assert mode.enabled is True and mode.split_size == DEFAULT_SPLIT_SIZE


def test_context_restores_previous_mode():
    before = get_deterministic_mode()
    with set_deterministic_mode(True, split_size=64):
        assert get_deterministic_mode() == (True, 64)
        with set_deterministic(False):
            assert get_deterministic_mode() == (False, 64)
        assert get_deterministic_mode() == (True, 64)
    assert get_deterministic_mode() == before


def test_restores_on_exception():
    before = get_deterministic_mode()
    try:
        with set_deterministic(False):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert get_deterministic_mode() == before


def test_plain_setter_persists_until_reset():
    set_deterministic(False)
    try:
        assert get_deterministic_mode().enabled is False
    finally:
        set_deterministic(True)
    assert get_deterministic_mode().enabled is True


def test_off_routes_to_stock_sdpa(device):
    q, k, v = _inputs(device)
    with set_deterministic(False):
        out = flash_attn_func(q, k, v, causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    assert torch.equal(out, sdpa)


def test_off_handles_features_sdpa_cannot(device):
    q, k, v = _inputs(device, Lq=10, Lk=24)
    with set_deterministic(False):
        out, lse, _ = flash_attn_func(q, k, v, causal=True, softcap=2.0, return_attn_probs=True)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=True, softcap=2.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-5)


def test_on_and_off_agree_closely(device):
    q, k, v = _inputs(device)
    on = flash_attn_func(q, k, v)
    with set_deterministic(False):
        off = flash_attn_func(q, k, v)
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-5)
