"""flash_attn_with_kvcache: flash-attn's argument order, rotary, learnable sinks, cache_leftpad.

Training = chunked prefill = decode with rotary and sinks: each chunk's output (and lse)
is bitwise the full forward's on the rotated q and k with the same sink.
"""

import inspect

import pytest
import torch

import bitstable
from bitstable import flash_attn_func, flash_attn_with_kvcache
from bitstable.attention.rotary import apply_rotary

#: flash-attn 2.6's positional order (flash_attn_interface.flash_attn_with_kvcache)
FLASH_ATTN_ORDER = ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
                    "cache_batch_idx", "cache_leftpad", "block_table", "softmax_scale", "causal", "window_size",
                    "softcap", "rotary_interleaved", "alibi_slopes", "num_splits", "return_softmax_lse"]


def test_positional_order_is_flash_attns():
    params = list(inspect.signature(flash_attn_with_kvcache).parameters.values())
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == FLASH_ATTN_ORDER
    assert {p.name for p in params if p.kind == p.KEYWORD_ONLY} == {"split_size", "learnable_sink"}
    assert inspect.signature(flash_attn_with_kvcache).parameters["rotary_interleaved"].default is True


def _tables(seqlen, rotary_dim):
    inv = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_chunked_prefill_and_decode_with_rotary_and_sink_equal_the_full_forward(interleaved, device):
    g = torch.Generator().manual_seed(60)
    B, L, Hq, Hk, D, dtype = 2, 40, 4, 2, 32, torch.float16
    q, k, v = (torch.randn(B, L, h, D, generator=g).to(dtype).to(device) for h in (Hq, Hk, Hk))
    cos, sin = (t.to(device) for t in _tables(64, 16))
    sink = torch.tensor([0.5, -1.0, 2.0, -0.25], device=device)
    pos = torch.arange(L, device=device)[None].expand(B, L)
    qr, kr = apply_rotary(q, cos, sin, pos, interleaved), apply_rotary(k, cos, sin, pos, interleaved)
    from bitstable.configs import arch_key, attention_config

    split = attention_config(arch_key(q.device), dtype, D).block_n   # the smallest split: most merges
    with bitstable.set_deterministic_mode(True, split_size=split):
        full, full_lse, _ = flash_attn_func(qr, kr, v, causal=True, return_attn_probs=True, learnable_sink=sink)
        kc = torch.zeros(B, 48, Hk, D, dtype=dtype, device=device)
        vc = torch.zeros_like(kc)
        start = 0
        for c in (13, 1, 1, 17, 8):
            out, lse = flash_attn_with_kvcache(q[:, start:start + c], kc, vc, k[:, start:start + c],
                                               v[:, start:start + c], cos, sin, cache_seqlens=start, causal=True,
                                               rotary_interleaved=interleaved, return_softmax_lse=True,
                                               learnable_sink=sink)
            assert torch.equal(out, full[:, start:start + c]), f"chunk at {start}"
            assert torch.equal(lse, full_lse[:, :, start:start + c]), f"lse of chunk at {start}"
            start += c
        assert torch.equal(kc[:, :L], kr)       # the cache holds the rotated keys


def test_non_causal_rotates_q_at_cache_seqlens(device):
    """flash-attn's rule: neither causal nor windowed, every q token sits at cache_seqlens."""
    g = torch.Generator().manual_seed(61)
    q = torch.randn(1, 3, 2, 16, generator=g).to(device)
    kc = torch.randn(1, 20, 2, 16, generator=g).to(device)
    vc = torch.randn(1, 20, 2, 16, generator=g).to(device)
    cos, sin = (t.to(device) for t in _tables(32, 16))
    out = flash_attn_with_kvcache(q, kc, vc, rotary_cos=cos, rotary_sin=sin, cache_seqlens=9)
    qr = apply_rotary(q, cos, sin, torch.full((1, 3), 9, device=device), interleaved=True)
    assert torch.equal(out, flash_attn_with_kvcache(qr, kc, vc, cache_seqlens=9))


def test_stock_path_with_rotary_and_sink(device):
    g = torch.Generator().manual_seed(62)
    q, k, v = (torch.randn(1, 6, 2, 16, generator=g).to(device) for _ in range(3))
    cos, sin = (t.to(device) for t in _tables(16, 8))
    sink = torch.tensor([0.3, -0.7], device=device)
    outs = []
    for det in (True, False):
        kc, vc = torch.zeros(1, 8, 2, 16, device=device), torch.zeros(1, 8, 2, 16, device=device)
        with bitstable.set_deterministic(det):
            outs.append(flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, cache_seqlens=0, causal=True,
                                                learnable_sink=sink))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_bad_rotary_sink_or_leftpad_leaves_the_cache_unchanged(device):
    from bitstable.attention.kvcache.validation import host_readable

    g = torch.Generator().manual_seed(63)
    q, k, v = (torch.randn(1, 2, 2, 16, generator=g).to(device) for _ in range(3))
    kc = torch.randn(1, 8, 2, 16, generator=g).to(device)
    vc = torch.randn(1, 8, 2, 16, generator=g).to(device)
    before = (kc.clone(), vc.clone())
    cos, sin = (t.to(device) for t in _tables(4, 8))
    bad_calls = [
        (dict(rotary_cos=cos), ValueError, "rotary_cos and rotary_sin must be given together"),
        (dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=3), ValueError, "rotary_cos/rotary_sin have 4 positions"),
        (dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=1), TypeError, "rotary_interleaved must be a bool"),
        (dict(learnable_sink=torch.zeros(3, device=device)), ValueError, "learnable_sink must have shape"),
    ]
    pad = torch.ones(1, dtype=torch.int32, device=device)
    if host_readable(pad):   # GPU-resident pads: the kernels check (test_kvcache_device_checks.py)
        bad_calls.append((dict(cache_leftpad=pad), ValueError, r"cache_leftpad must be in \[0, cache_seqlens\]"))
    for kw, err, match in bad_calls:
        with pytest.raises(err, match=match):
            flash_attn_with_kvcache(q, kc, vc, k=k, v=v, **{"cache_seqlens": 0, "causal": True, **kw})
        assert torch.equal(kc, before[0]) and torch.equal(vc, before[1]), kw


def test_torch_compile_traces_rotary_and_sink(device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(64)
    q, k, v = (torch.randn(1, 3, 2, 16, generator=g).to(device) for _ in range(3))
    cos, sin = (t.to(device) for t in _tables(16, 16))
    sink = torch.tensor([0.1, 0.9], device=device)

    def step(q, k, v, kc, vc):
        return flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, cache_seqlens=4, causal=True,
                                       learnable_sink=sink)

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        kc, vc = torch.zeros(1, 8, 2, 16, device=device), torch.zeros(1, 8, 2, 16, device=device)
        outs.append((fn(q, k, v, kc, vc), kc, vc))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
