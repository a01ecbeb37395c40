"""bitstable/_launch.py: the direct launch through the compiled kernel's launcher gives the
bits of Triton's standard ``kernel[grid](...)`` path, and takes a new specialization (an
unaligned pointer, another head dim) through Triton's own path first.  GPU only: under the
interpreter every launch is the standard one."""

import pytest
import torch
import triton

import bitstable
from bitstable import _launch, ops


@pytest.fixture
def direct(monkeypatch):
    """The direct path on wherever this Triton supports it (whatever BITSTABLE_DIRECT_LAUNCH says)."""
    monkeypatch.setattr(_launch, "_ENABLED", not _launch.interpreting() and _launch._supported())


def _standard(fn):
    saved = _launch._ENABLED
    _launch._ENABLED = False
    try:
        return fn()
    finally:
        _launch._ENABLED = saved


@pytest.mark.gpu
def test_direct_launches_give_the_standard_bits(direct):
    if not _launch._ENABLED:
        pytest.skip("this Triton takes the standard path only (bitstable/_launch.py)")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 1000, device="cuda", dtype=torch.float16, generator=g)
    unaligned = torch.randn(64 * 1000 + 3, device="cuda", dtype=torch.float16, generator=g)[3:].view(64, 1000)
    assert unaligned.data_ptr() % 16 != 0
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    kc, vc = (torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    qd = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    calls = {
        "softmax": lambda: ops.softmax(x, -1),
        "softmax unaligned": lambda: ops.softmax(unaligned, -1),
        "sum": lambda: ops.sum(x, -1),
        "mm": lambda: ops.mm(x, x.t()),
        "attention": lambda: bitstable.flash_attn_func(q, k, v, causal=True),
        "attention d32": lambda: bitstable.flash_attn_func(q[..., :32], k[..., :32], v[..., :32]),
        # the Gluon partial kernel (B1, one token, d128), the combine kernel
        "decode": lambda: bitstable.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=4000, causal=True),
    }
    # Triton 3.6's launcher is called without its Python wrapper (its descriptor arguments
    # expanded by bitstable): every one of these launches takes that path there
    raw_expected = triton.__version__.startswith("3.6.")
    for name, fn in calls.items():
        ref = _standard(fn)
        before, raw_before = _launch.direct_launches, _launch.raw_launches
        first, second = fn(), fn()
        assert _launch.direct_launches > before, f"{name}: no direct launch"
        if raw_expected:
            assert _launch.raw_launches - raw_before == _launch.direct_launches - before, f"{name}: not raw"
        assert torch.equal(first, ref) and torch.equal(second, ref), f"{name}: the direct launch changed bits"
