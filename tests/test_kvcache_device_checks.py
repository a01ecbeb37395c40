"""``flash_attn_with_kvcache`` with its values on the device: no host read, the kernels check.

GPU-resident ``cache_seqlens`` / ``cache_batch_idx`` / ``block_table`` / ``cache_leftpad``
are never read back (a decode step must not wait for the GPU); kernels/cache_checks.py
checks each row instead.  On the CPU every tensor is readable for free, so these tests
force the device path by making ``host_readable`` say no (on a GPU it is the real path).

* valid calls: the same bits as the host-checked call, and the same cache afterwards;
* a row that fails a check: NaN outputs and lse, nothing of it written to the cache, the
  other rows untouched and bitwise the host-checked ones.
"""

import pytest
import torch

from bitstable import flash_attn_with_kvcache
from bitstable.attention.kvcache import validation


@pytest.fixture
def on_device(monkeypatch):
    """Make every value look GPU-resident: the kernels check them."""
    monkeypatch.setattr(validation, "host_readable", lambda t: False)


def _inputs(device, B=3, L=48, Hq=4, Hk=2, D=16, n_new=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).half().to(device)  # noqa: E731
    return r(B, n_new, Hq, D), r(B, L, Hk, D), r(B, L, Hk, D), r(B, n_new, Hk, D), r(B, n_new, Hk, D)


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def _run(q, kc, vc, k, v, **kw):
    kc, vc = kc.clone(), vc.clone()
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, causal=True, return_softmax_lse=True, **kw)
    return out, lse, kc, vc


def _host_then_device(monkeypatch, q, kc, vc, k, v, **kw):
    host = _run(q, kc, vc, k, v, **kw)
    monkeypatch.setattr(validation, "host_readable", lambda t: False)
    dev = _run(q, kc, vc, k, v, **kw)
    monkeypatch.undo()
    return host, dev


def test_valid_calls_give_the_host_checked_bits(device, monkeypatch):
    q, kc, vc, k, v = _inputs(device)
    Lq = q.shape[1]
    g = torch.Generator().manual_seed(1)
    cos = torch.rand(64, 4, generator=g).to(device)
    sin = torch.rand(64, 4, generator=g).to(device)
    pages_k, pages_v = kc.reshape(9, 16, 2, 16), vc.reshape(9, 16, 2, 16)
    table = _i32([[8, 0, 1], [2, 7, 3], [4, 5, 6]], device)
    calls = [
        ("contiguous", (kc, vc), dict(cache_seqlens=_i32([5, 40, 0], device))),
        ("batch_idx", (kc, vc), dict(cache_seqlens=_i32([5, 17, 30], device),
                                     cache_batch_idx=_i32([2, 0, 1], device))),
        ("paged", (pages_k, pages_v), dict(cache_seqlens=_i32([33, 3, 46], device), block_table=table)),
        ("leftpad", (kc, vc), dict(cache_seqlens=_i32([9, 20, 4], device),
                                   cache_leftpad=_i32([3, 20, 0], device))),
        ("rotary", (kc, vc), dict(cache_seqlens=_i32([9, 20, 46 - Lq], device), rotary_cos=cos,
                                  rotary_sin=sin, rotary_interleaved=False)),
    ]
    for name, (ck, cv), kw in calls:
        host, dev = _host_then_device(monkeypatch, q, ck, cv, k, v, **kw)
        assert not host[0].isnan().any(), name
        for a, b, what in zip(host, dev, ("out", "lse", "k_cache", "v_cache")):
            assert torch.equal(a, b), f"{name}: {what} differs between host and device checks"


def _assert_row_failed(host, dev, kc, bad_rows, good_rows, rows_of=None):
    """Failing rows: NaN out/lse, their cache rows as before; good rows: the host bits."""
    out, lse, kc_after, _ = dev
    rows_of = rows_of or {}
    for b in bad_rows:
        assert out[b].isnan().all() and lse[b].isnan().all(), f"row {b} did not fail"
        for r in rows_of.get(b, [b]):
            assert torch.equal(kc_after[r], kc[r]), f"failing row {b} wrote cache row {r}"
    for b in good_rows:
        assert torch.equal(out[b], host[0][b]) and torch.equal(lse[b], host[1][b]), f"row {b} changed"


def test_a_failing_row_is_nan_and_writes_nothing(device, on_device):
    q, kc, vc, k, v = _inputs(device)
    L = kc.shape[1]
    host = _run(q, kc, vc, k, v, cache_seqlens=_i32([5, 40, 7], device))   # checks made by the kernels
    for lens in ([5, L - 1, 7], [5, -3, 7]):           # too long for the cache; negative
        dev = _run(q, kc, vc, k, v, cache_seqlens=_i32(lens, device))
        _assert_row_failed(host, dev, kc, bad_rows=[1], good_rows=[0, 2])

    # cache_batch_idx out of range, then two rows naming one cache row while appending
    idx_host = _run(q, kc, vc, k, v, cache_seqlens=_i32([5, 40, 7], device),
                    cache_batch_idx=_i32([0, 1, 2], device))
    dev = _run(q, kc, vc, k, v, cache_seqlens=_i32([5, 40, 7], device), cache_batch_idx=_i32([0, 3, 2], device))
    _assert_row_failed(idx_host, dev, kc, bad_rows=[1], good_rows=[0, 2], rows_of={1: [1]})
    dev = _run(q, kc, vc, k, v, cache_seqlens=_i32([5, 40, 7], device), cache_batch_idx=_i32([2, 1, 2], device))
    _assert_row_failed(idx_host, dev, kc, bad_rows=[0, 2], good_rows=[1], rows_of={0: [2], 2: [2]})

    # left padding past the row's length
    dev = _run(q, kc, vc, k, v, cache_seqlens=_i32([5, 40, 7], device), cache_leftpad=_i32([0, 0, 8], device))
    _assert_row_failed(host, dev, kc, bad_rows=[2], good_rows=[0, 1])


def test_a_bad_page_or_rotary_position_fails_its_row(device, on_device):
    q, kc, vc, k, v = _inputs(device)
    pages_k, pages_v = kc.reshape(9, 16, 2, 16), vc.reshape(9, 16, 2, 16)
    lens = _i32([20, 3, 40], device)
    good = _run(q, pages_k, pages_v, k, v, cache_seqlens=lens, block_table=_i32([[0, 1, 2], [3, 4, 5],
                                                                                [6, 7, 8]], device))
    dev = _run(q, pages_k, pages_v, k, v, cache_seqlens=lens, block_table=_i32([[0, 1, 2], [3, 4, 5],
                                                                               [6, 9, 8]], device))
    assert dev[0][2].isnan().all() and dev[1][2].isnan().all()
    for b in (0, 1):
        assert torch.equal(dev[0][b], good[0][b])
    assert torch.equal(dev[2][6:9], pages_k[6:9]), "the failing row wrote its pages"

    g = torch.Generator().manual_seed(1)
    cos, sin = torch.rand(24, 4, generator=g).to(device), torch.rand(24, 4, generator=g).to(device)
    rot = dict(rotary_cos=cos, rotary_sin=sin)
    ok = _run(q, kc, vc, k, v, cache_seqlens=_i32([5, 10, 7], device), **rot)
    dev = _run(q, kc, vc, k, v, cache_seqlens=_i32([5, 23, 7], device), **rot)   # positions 23, 24 > 23
    _assert_row_failed(ok, dev, kc, bad_rows=[1], good_rows=[0, 2])
