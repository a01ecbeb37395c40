"""attention/rotary.py: flash-attn's rotary semantics, and per-token bits."""

import pytest
import torch

from bitstable.attention.rotary import apply_rotary, check_rotary


def _tables(seqlen, rotary_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def _reference(x, cos, sin, pos, interleaved):
    """Complex multiplication in float64: the pair (x1, x2) as x1 + i x2 times e^{i theta}."""
    r = 2 * cos.shape[1]
    xd = x.double()
    if interleaved:
        x1, x2 = xd[..., 0:r:2], xd[..., 1:r:2]
    else:
        x1, x2 = xd[..., :r // 2], xd[..., r // 2:r]
    z = torch.complex(x1, x2) * torch.polar(torch.ones_like(cos.double()[pos]), torch.atan2(
        sin.double()[pos], cos.double()[pos]))[:, :, None, :]
    y = xd.clone()
    if interleaved:
        y[..., 0:r:2], y[..., 1:r:2] = z.real, z.imag
    else:
        y[..., :r // 2], y[..., r // 2:r] = z.real, z.imag
    return y


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [16, 32])
def test_matches_the_rotation(interleaved, rotary_dim):
    g = torch.Generator().manual_seed(50)
    x = torch.randn(2, 7, 3, 32, generator=g).to(torch.float16)
    cos, sin = _tables(64, rotary_dim)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [40, 41, 42, 43, 44, 45, 46]])
    out = apply_rotary(x, cos, sin, pos, interleaved)
    ref = _reference(x, cos, sin, pos, interleaved)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert (out.double() - ref).abs().max().item() <= 2 * torch.finfo(torch.float16).eps * ref.abs().max().item()
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])   # the rest passes through


def test_a_token_alone_has_its_bits_in_any_chunk():
    g = torch.Generator().manual_seed(51)
    x = torch.randn(1, 20, 2, 16, generator=g).to(torch.bfloat16)
    cos, sin = _tables(32, 16)
    pos = torch.arange(20)[None]
    full = apply_rotary(x, cos, sin, pos)
    for a, b in ((0, 1), (3, 11), (19, 20)):
        assert torch.equal(apply_rotary(x[:, a:b], cos, sin, pos[:, a:b]), full[:, a:b])


def test_errors():
    cos, sin = _tables(8, 8)
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin must be given together"):
        check_rotary(cos, None, 16, torch.float16, cos.device)
    with pytest.raises(ValueError, match=r"rotary_dim \(2 \* rotary_cos.shape\[1\] = 8\) must be in \[2, head dim 4\]"):
        check_rotary(cos, sin, 4, torch.float16, cos.device)
    with pytest.raises(ValueError, match="rotary_cos must have shape"):
        check_rotary(cos[0], sin[0], 16, torch.float16, cos.device)
    assert check_rotary(cos, sin, 16, torch.float16, cos.device) == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("along", [False, True], ids=["at-length", "along"])
def test_the_kernel_is_apply_rotary_bit_for_bit(dtype, interleaved, along, device):
    """kernels/rotary.py (``rotate``, what flash_attn_with_kvcache runs) gives apply_rotary's
    bits: whole-D and partial rotary dims, a head dim that is not a power of two, positions
    from a device length vector, a strided input.  bf16 on the GPU only: the interpreter
    truncates fp32 -> bf16 instead of rounding to nearest even."""
    from bitstable.attention.rotary import rotate

    g = torch.Generator().manual_seed(52)
    for D, r in ((32, 32), (59, 32), (40, 18)):
        x = torch.randn(3, 5, 8, D, generator=g).to(dtype).to(device).transpose(1, 2).contiguous().transpose(1, 2)
        x = x[:, :, 1:7]                             # [3, 5, 6, D], strided over tokens and heads
        cos, sin = (t.to(dtype).to(device) for t in _tables(60, r))
        base = torch.tensor([0, 9, 54], dtype=torch.int32, device=device)
        pos = base.long()[:, None] + (torch.arange(5, device=device)[None, :] if along else 0)
        want = apply_rotary(x, cos, sin, pos.expand(3, 5), interleaved)
        got = rotate(x, cos, sin, base, along, interleaved)
        assert torch.equal(got, want), (D, r)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_the_rotary_append_writes_the_rotary_kernels_bits(dtype, device):
    """kernels/kv_append.py's rotary append (what a decode or chunk step with rotary runs):
    the keys it writes into the cache and the query it rotates in the same launch are
    apply_rotary's bits; v is copied; no other slot is touched.  Strided q, a head dim that
    is not a power of two, partial rotary dims, both pair layouts, q along or at the length,
    and no q at all."""
    from bitstable.attention.kvcache.append import AppendRotary, append

    g = torch.Generator().manual_seed(53)
    B, n, Hk, S = 3, 4, 2, 60
    base = torch.tensor([0, 9, 50], dtype=torch.int32, device=device)
    for D, r in ((32, 32), (59, 18)):
        for interleaved, along, with_q in ((False, True, True), (True, False, True), (True, True, False)):
            k, v = (torch.randn(B, n, Hk, D, generator=g).to(dtype).to(device) for _ in range(2))
            q = torch.randn(B, n, 8, D, generator=g).to(dtype).to(device)[:, :, 1:7]     # strided heads
            cos, sin = (t.to(dtype).to(device) for t in _tables(S, r))
            kc, vc = (torch.full((B, S, Hk, D), float("nan"), dtype=dtype, device=device) for _ in range(2))
            got_q = append(kc, vc, k, v, base, None, None, 0,
                           rotary=AppendRotary(cos, sin, interleaved, q if with_q else None, along))
            pos = base.long()[:, None] + torch.arange(n, device=device)[None, :]
            want_k = apply_rotary(k, cos, sin, pos, interleaved)
            written = torch.zeros(B, S, dtype=torch.bool, device=device)
            for b in range(B):
                lo = int(base[b])
                assert torch.equal(kc[b, lo:lo + n], want_k[b]), (D, r, interleaved, b)
                assert torch.equal(vc[b, lo:lo + n], v[b]), (D, r, b)
                written[b, lo:lo + n] = True
            assert kc[~written].isnan().all() and vc[~written].isnan().all()
            if with_q:
                q_pos = pos if along else base.long()[:, None].expand(B, n)
                assert torch.equal(got_q, apply_rotary(q, cos, sin, q_pos, interleaved)), (D, r, interleaved, along)
            else:
                assert got_q is None
