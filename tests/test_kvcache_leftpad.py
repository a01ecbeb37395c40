"""``flash_attn_with_kvcache(cache_leftpad=...)`` and head dims that are not a multiple of 8:
a left-padded row's chunked prefill and decode give the bits of the full forward of the
unpadded sequence (whatever the padding of the other rows), the stock path agrees, bad
padding raises before the cache is written."""

import pytest
import torch

import bitstable
from bitstable import flash_attn_func, flash_attn_with_kvcache

from cases import make_inputs


def _through_padded_cache(q, k, v, pads, steps, kw, garbage_seed=0):
    """Run q/k/v [B, L, H, D] through a contiguous cache whose row b starts at slot pads[b]
    (slots before it hold garbage), in chunks ``steps``; returns the concatenated outputs."""
    B, L, Hk, D = k.shape
    g = torch.Generator().manual_seed(garbage_seed)
    shape = (B, max(pads) + L + 3, Hk, D)
    k_cache = (torch.randn(shape, generator=g) * 100).to(k.dtype).to(k.device)
    v_cache = (torch.randn(shape, generator=g) * 100).to(v.dtype).to(v.device)
    leftpad = torch.tensor(pads, dtype=torch.int32, device=q.device)
    outs, t = [], 0
    for n in steps:
        seqlens = torch.tensor([p + t for p in pads], dtype=torch.int32, device=q.device)
        outs.append(flash_attn_with_kvcache(q[:, t:t + n], k_cache, v_cache, k[:, t:t + n], v[:, t:t + n],
                                            cache_seqlens=seqlens, cache_leftpad=leftpad, **kw))
        t += n
    assert t == L
    return torch.cat(outs, 1), k_cache, v_cache


@pytest.mark.parametrize("D,kw", [
    pytest.param(32, dict(causal=True), id="causal-d32"),
    pytest.param(59, dict(causal=True, window_size=(20, 0), alibi=(4,)), id="window-alibi-d59"),
])
def test_left_padded_rows_equal_the_unpadded_full_forward(D, kw, device):
    B, L, Hq, Hk = 3, 45, 4, 2
    q, k, v, kw = make_inputs((B, L, L, Hq, Hk, D), kw, torch.float16, device, seed=D)
    pads = [0, 5, 17]
    with bitstable.set_deterministic_mode(True, split_size=32 if device == "cpu" else 1024):
        full = flash_attn_func(q, k, v, **kw)
        got, k_cache, _ = _through_padded_cache(q, k, v, pads, [20, 13, 1, 1, 2, 1, 7], kw)
    assert torch.equal(got, full)
    for b, p in enumerate(pads):      # the appends landed after each row's padding
        assert torch.equal(k_cache[b, p:p + L], k[b])


def test_stock_path_masks_the_padding(device):
    B, L, H, D = 2, 30, 2, 32
    q, k, v, _ = make_inputs((B, L, L, H, H, D), {}, torch.float32, device, seed=3)
    ours, _, _ = _through_padded_cache(q, k, v, [3, 11], [25, 5], dict(causal=True))
    with bitstable.set_deterministic_mode(False):
        stock, _, _ = _through_padded_cache(q, k, v, [3, 11], [25, 5], dict(causal=True))
    assert torch.allclose(ours, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,exc,match", [
    ([-1, 0], ValueError, r"cache_leftpad must be in \[0, cache_seqlens\]"),
    ([0, 9], ValueError, r"cache_leftpad must be in \[0, cache_seqlens\]"),
    ("int64", TypeError, "cache_leftpad must be int32"),
    ("shape", ValueError, r"cache_leftpad must have shape \(2,\)"),
    ("paged", NotImplementedError, "cache_leftpad cannot be combined with block_table"),
])
def test_bad_leftpad_raises_before_the_cache_is_written(bad, exc, match, device):
    B, H, D = 2, 2, 16
    q = torch.randn(B, 1, H, D, dtype=torch.float16).to(device)
    knew, vnew = (torch.randn(B, 1, H, D, dtype=torch.float16).to(device) for _ in range(2))
    k_cache, v_cache = (torch.randn(B, 32, H, D, dtype=torch.float16).to(device) for _ in range(2))
    seqlens = torch.tensor([4, 8], dtype=torch.int32, device=device)
    block_table = None
    if bad == "int64":
        pad = torch.tensor([0, 1], device=device)
    elif bad == "shape":
        pad = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    elif bad == "paged":
        pad = torch.tensor([0, 1], dtype=torch.int32, device=device)
        k_cache, v_cache = k_cache.view(4, 16, H, D), v_cache.view(4, 16, H, D)
        block_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    else:
        pad = torch.tensor(bad, dtype=torch.int32, device=device)
    before = k_cache.clone(), v_cache.clone()
    from bitstable.attention.kvcache.validation import host_readable

    if isinstance(bad, list) and not host_readable(pad):
        # GPU-resident values are the kernels' to check: the bad row is NaN, nothing written.
        out = flash_attn_with_kvcache(q, k_cache, v_cache, knew, vnew, cache_seqlens=seqlens, cache_leftpad=pad)
        row = 0 if bad[0] < 0 else 1
        assert out[row].isnan().all() and not out[1 - row].isnan().any()
        assert torch.equal(k_cache[row], before[0][row]) and torch.equal(v_cache[row], before[1][row])
        return
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(q, k_cache, v_cache, knew, vnew, cache_seqlens=seqlens, cache_leftpad=pad,
                                block_table=block_table)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("append", [False, True], ids=["past-capacity", "append-past-capacity"])
def test_cache_overflow_is_a_value_error_and_flash_attns_runtime_error(append, device):
    """flash-attn raises RuntimeError naming block_table when the lengths pass the table's
    capacity; bitstable's error is both that and a ValueError, and writes nothing."""
    from bitstable.attention.kvcache.validation import CacheCapacityError

    H, D, page = 1, 16, 16
    q = torch.randn(1, 1, H, D, dtype=torch.float16).to(device)
    k_cache, v_cache = (torch.randn(4, page, H, D, dtype=torch.float16).to(device) for _ in range(2))
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    knew = vnew = None
    if append:
        knew, vnew = (torch.randn(1, 1, H, D, dtype=torch.float16).to(device) for _ in range(2))
    seqlens = torch.tensor([page if append else page + 1], dtype=torch.int32, device=device)
    before = k_cache.clone()
    for exc in (RuntimeError, ValueError, CacheCapacityError):
        with pytest.raises(exc, match="block_table"):
            flash_attn_with_kvcache(q, k_cache, v_cache, knew, vnew, cache_seqlens=seqlens, block_table=table)
    assert torch.equal(k_cache, before)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([page], dtype=torch.int32,
                                                                                 device=device), block_table=table)
    assert out.shape == (1, 1, H, D) and not out.isnan().any()
