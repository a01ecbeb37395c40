"""Attention dropout: the keep-mask's definition (Philox known answers, kernels = torch
spec), accuracy of the forward and backward against float64 with the same mask, replay
from torch's generator, batch invariance through ``dropout_seeds``, varlen = dense,
``return_attn_probs``'s S_dmask, the stock path, and argument checks."""

import pytest
import torch

from bitstable import (flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                       set_deterministic_mode)
from bitstable.attention.dropout import (Dropout, keep_mask, keep_mask_reference,
                                         philox4x32_reference, stream_key)
from bitstable.reference import attention_reference, flash_backward_slack

from cases import make_inputs

P = 0.17


_PI_CTR, _PI_KEY = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)


@pytest.mark.parametrize("rounds,ctr,key,expected", [
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, _PI_CTR, _PI_KEY, (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, _PI_CTR, _PI_KEY, (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
], ids=["10-zeros", "10-ones", "10-pi", "7-zeros", "7-ones", "7-pi"])
def test_philox_reference_gives_random123_known_answers(rounds, ctr, key, expected):
    """The reference's rounds against Random123's kat_vectors (the mask uses 7)."""
    assert tuple(int(x) for x in philox4x32_reference(*ctr, *key, rounds=rounds)) == expected


@pytest.mark.parametrize("seeds", [None, [5, (1 << 40) + 7, -3]], ids=["batch-index", "dropout_seeds"])
def test_kernel_mask_is_the_specified_function(seeds, device):
    """The kernels' mask function (through dropout_mask_kernel) equals the torch spec
    bit for bit, keys above 32 bits and negative keys included; lengths not multiples of
    the tile or of 4."""
    t = None if seeds is None else torch.tensor(seeds, device=device)
    d = Dropout(P, 0xF23456789ABCDEF1, t)
    got = keep_mask(d, 3, 2, 37, 45, torch.device(device)).cpu()
    want = keep_mask_reference(d, seeds if seeds is not None else range(3), 2, 37, 45)
    assert torch.equal(got, want)
    frac = 1 - want.float().mean().item()
    assert abs(frac - P) < 0.03, frac
    # the other tile shapes the kernels take: 32 rows, and 32- and 64-key tiles (the
    # kernel's whole-group branch; the interpreter's attention kernels use 16 x 16)
    for tile in ((32, 32), (16, 64)):
        assert torch.equal(keep_mask(d, 3, 2, 37, 45, torch.device(device), tile=tile).cpu(), want), tile


def test_mask_depends_on_every_input():
    base = Dropout(P, stream_key(1, 0), None)
    m = keep_mask_reference(base, [0, 1], 2, 16, 16)
    assert not torch.equal(m[0], m[1])                      # sequence key
    assert not torch.equal(m[0, 0], m[0, 1])                # head
    assert not torch.equal(m[0, 0, :8], m[0, 0, 8:])        # query position
    assert not torch.equal(m[0, 0, :, :8], m[0, 0, :, 8:])  # key position
    other = keep_mask_reference(Dropout(P, stream_key(1, 32), None), [0, 1], 2, 16, 16)
    assert not torch.equal(m, other)                        # generator offset
    assert stream_key(1, 0) != stream_key(2, 0)


def _run(q, k, v, dout, seed, **kw):
    """(out, S_dmask, dq, dk, dv) of one dropout call after ``torch.manual_seed(seed)``."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    torch.manual_seed(seed)
    out, _, s = flash_attn_func(q, k, v, P, return_attn_probs=True, **kw)
    return (out, s) + torch.autograd.grad(out, (q, k, v), dout)


CASES = [
    pytest.param((2, 40, 40, 2, 2, 32), dict(), torch.float16, id="fp16-dense"),
    pytest.param((1, 29, 45, 4, 2, 40), dict(causal=True), torch.float16, id="fp16-causal-gqa-d40"),
    pytest.param((1, 33, 33, 2, 1, 32), dict(window_size=(9, 4), softcap=3.0, alibi=(2,)), torch.float32,
                 id="fp32-window-softcap-alibi"),
    pytest.param((2, 1000, 1100, 8, 2, 128), dict(causal=True), torch.bfloat16, id="gpu-bf16-causal-gqa-d128",
                 marks=pytest.mark.gpu),
    pytest.param((1, 777, 777, 4, 4, 64), dict(window_size=(100, 0), alibi=(4,)), torch.float16,
                 id="gpu-fp16-window-alibi", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("sizes,kw,dtype", CASES)
def test_dropout_matches_float64_with_the_same_mask(sizes, kw, dtype, device):
    """out and dq, dk, dv against float64 attention with the mask S_dmask reports (tolerance
    relative to stock PyTorch's eager math in the same dtype and mask); S_dmask's magnitudes
    are the softmax numerators; the mask is the specified function of the positions."""
    q, k, v, kw = make_inputs(sizes, kw, dtype, device, seed=5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(dtype).to(device)
    out, s, *grads = _run(q, k, v, dout, 11, **kw)
    keep = s >= 0
    assert not out.isnan().any() and all(not g.isnan().any() for g in grads)
    ref_kw = dict(kw, dropout_mask=keep, dropout_p=P)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, lse64 = attention_reference(q64, k64, v64, compute_dtype=torch.float64, **ref_kw)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    stock, _ = attention_reference(qs, ks, vs, compute_dtype=dtype, **ref_kw)
    stock_grads = torch.autograd.grad(stock, (qs, ks, vs), dout)
    err, err_stock = ((o.double() - ref).abs().max().item() for o in (out, stock))
    assert err <= 2 * err_stock + 4 * torch.finfo(dtype).eps, (err, err_stock)
    slack = flash_backward_slack(q, k, v, out.detach(), dout, **ref_kw)
    for name, a, r, st, extra in zip(("dq", "dk", "dv"), grads, ref_grads, stock_grads, slack):
        e = (a.double() - r).abs().max().item()
        es = (st.double() - r).abs().max().item()
        tol = 2 * es + 4 * torch.finfo(dtype).eps * r.abs().max().item() + extra
        assert e <= tol, f"{name}: {e:.3g} > {tol:.3g} (stock {es:.3g})"
    # S_dmask's magnitudes, normalised per row, are the probabilities: float64 attention
    # with v = the identity over keys returns them.
    B, Lk, Hk = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(Lk, dtype=torch.float64, device=q.device).view(1, Lk, 1, Lk).expand(B, Lk, Hk, Lk)
    probs64 = attention_reference(q64.detach(), k64.detach(), eye, compute_dtype=torch.float64, **kw)[0]
    mag = s.abs().double()
    p_from_s = mag / mag.sum(-1, keepdim=True).clamp_min(1e-300)
    err_p = (p_from_s - probs64.transpose(1, 2)).abs().max().item()
    assert err_p <= 4 * torch.finfo(dtype).eps, err_p


def _one_hot_rows(B, L, H, D, dtype, device):
    """[B, L, H, D] with row i = e_i (L <= D): a product with it reads one entry per element."""
    eye = torch.eye(L, D, dtype=dtype, device=device)
    return eye.view(1, L, 1, D).expand(B, L, H, D).contiguous()


def _dropout_terms(q, k, v, dout, keep, softmax_scale):
    """float64 (P, dP, delta, dS) of dropout attention with mask ``keep`` [B, H, Lq, Lk]."""
    q, k, v, dout = (t.double().transpose(1, 2) for t in (q, k, v, dout))   # B, H, L, D
    p = torch.softmax(q @ k.transpose(-1, -2) * softmax_scale, -1)
    pd = p * keep / (1 - P)
    out = pd @ v
    dp = dout @ v.transpose(-1, -2)
    delta = (dout * out).sum(-1, keepdim=True)
    ds = p * (dp * keep / (1 - P) - delta)
    return p, dp, delta, ds, out, dout


@pytest.mark.parametrize("L,D,dtype", [
    pytest.param(32, 32, torch.float16, id="fp16-32"),
    pytest.param(128, 128, torch.bfloat16, id="gpu-bf16-128", marks=pytest.mark.gpu),
    pytest.param(100, 128, torch.float16, id="gpu-fp16-100", marks=pytest.mark.gpu),
    pytest.param(64, 64, torch.bfloat16, id="gpu-bf16-64", marks=pytest.mark.gpu),
])
def test_every_kernel_drops_exactly_the_reported_entries(L, D, dtype, device):
    """One-hot rows make each output element one entry of a product, so the entries each
    kernel dropped can be read off: the forward's (out with v = one-hot keys), the dk/dv
    kernel's weights (dv with dout = one-hot queries) and scores (dk with q = one-hot), and
    the dq kernel's scores (dq with k = one-hot).  Each must be S_dmask's mask, entry by
    entry (on a GPU with 16-bit inputs the forward takes the packed keep test of
    kernels/dropout.py, the backward kernels the plain one)."""
    B, H = 2, 2
    scale = 1.0 / D ** 0.5
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(dtype).to(device)

    hot = _one_hot_rows(B, L, H, D, dtype, device)
    q, k, v, dout = r(B, L, H, D), r(B, L, H, D), r(B, L, H, D), r(B, L, H, D)
    eps = torch.finfo(dtype).eps

    # forward and dv: v and dout one-hot, out[q, j] = P[q, j] keep / (1 - p), dv[j, q] likewise
    out, s, dq, dk, dv = _run(q, k, hot, hot, 21)
    keep = s >= 0
    assert keep.float().mean().item() == pytest.approx(1 - P, abs=0.05)
    assert torch.equal(out[..., :L].transpose(1, 2) != 0, keep)
    assert torch.equal(dv[..., :L].permute(0, 2, 3, 1) != 0, keep)

    # dq with k one-hot (dq[q, j] = dS[q, j] scale), dk with q one-hot (dk[j, q] = dS[q, j] scale)
    for hot_k in (True, False):
        qq, kk = (q, hot) if hot_k else (hot, k)
        out, s, dq, dk, dv = _run(qq, kk, v, dout, 21)
        assert torch.equal(s >= 0, keep)
        p64, dp64, delta64, ds64, out64, do64 = _dropout_terms(qq, kk, v, dout, keep, scale)
        got = (dq[..., :L].transpose(1, 2) if hot_k else dk[..., :L].permute(0, 2, 3, 1)).double()
        want = ds64 * scale
        # each entry's rounding: the 16-bit output, fp32 products, delta from the 16-bit out
        # (a wrong keep bit moves an entry by P |dP| / (1 - p), tens of these bounds)
        bound = scale * p64 * (4 * eps * (do64.abs() * out64.abs()).sum(-1, keepdim=True)
                               + 1e-5 * (dp64.abs() / (1 - P) + delta64.abs())) + 2 * eps * want.abs()
        bad = (got - want).abs() > bound
        assert not bad.any(), f"{'dq' if hot_k else 'dk'}: {int(bad.sum())} entries off"


@pytest.mark.parametrize("shape", [pytest.param((2, 37, 2, 1, 32), id="cpu"),
                                   pytest.param((3, 1500, 8, 2, 128), id="gpu", marks=pytest.mark.gpu)])
def test_manual_seed_replays_and_the_generator_moves_on(shape, device):
    B, L, Hq, Hk, D = shape
    q, k, v, _ = make_inputs((B, L, L, Hq, Hk, D), {}, torch.float16, device, seed=1)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).half().to(device)
    a = _run(q, k, v, dout, 7, causal=True)
    b = _run(q, k, v, dout, 7, causal=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    torch.manual_seed(7)
    first = flash_attn_func(q, k, v, P, causal=True)
    second = flash_attn_func(q, k, v, P, causal=True)
    assert torch.equal(first, a[0]) and not torch.equal(first, second)
    if device == "cuda":   # flash-attn's increment: batch * nheads * 32 per call
        torch.manual_seed(7)
        gen = torch.cuda.default_generators[torch.cuda.current_device()]
        before = gen.get_offset()
        flash_attn_func(q, k, v, P)
        assert gen.get_offset() == before + B * Hq * 32


@pytest.mark.parametrize("shape", [pytest.param((3, 2, 1, 32, 29, 41), id="cpu"),
                                   pytest.param((4, 8, 2, 128, 900, 1300), id="gpu", marks=pytest.mark.gpu)])
def test_dropout_seeds_make_a_sequence_batch_invariant(shape, device):
    """With dropout_seeds, a sequence's out and gradients are the same bits alone and at
    another position of a larger batch (and in a varlen pack, keyed by the same seed)."""
    B, Hq, Hk, D, Lq, Lk = shape
    q, k, v, _ = make_inputs((B, Lq, Lk, Hq, Hk, D), {}, torch.float16, device, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).half().to(device)
    seeds = torch.tensor([11, -5, 1 << 33, 7][:B], device=device)
    full = _run(q, k, v, dout, 3, causal=True, dropout_seeds=seeds)
    i = 1
    alone = _run(q[i:i + 1], k[i:i + 1], v[i:i + 1], dout[i:i + 1], 3, causal=True,
                 dropout_seeds=seeds[i:i + 1])
    dk_full, dk_alone = full[3][i:i + 1], alone[3]
    for x, y in zip((full[0][i:i + 1], full[1][i:i + 1], full[2][i:i + 1], dk_full, full[4][i:i + 1]), alone):
        assert torch.equal(x, y)
    # The same sequence without its seed gets another mask (its batch index there: 0).
    no_seed = _run(q[i:i + 1], k[i:i + 1], v[i:i + 1], dout[i:i + 1], 3, causal=True)
    assert not torch.equal(no_seed[0], alone[0])
    # Varlen: the pack (sequence i, then sequence 0) keyed by the same seeds.
    cu_q = torch.tensor([0, Lq, 2 * Lq], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, Lk, 2 * Lk], dtype=torch.int32, device=device)
    torch.manual_seed(3)
    packed = flash_attn_varlen_func(torch.cat([q[i], q[0]]), torch.cat([k[i], k[0]]), torch.cat([v[i], v[0]]),
                                    cu_q, cu_k, Lq, Lk, P, causal=True, dropout_seeds=seeds[[i, 0]])
    assert torch.equal(packed[:Lq], full[0][i]) and torch.equal(packed[Lq:], full[0][0])


def test_varlen_default_keys_are_the_sequence_index(device):
    """Without dropout_seeds, packed sequence i is keyed by i, as batch row i of a dense call
    (same generator draw): the two calls give the same bits, and S_dmask agrees."""
    B, L, H, D = 2, 30, 2, 32
    q, k, v, _ = make_inputs((B, L, L, H, H, D), {}, torch.float16, device, seed=8)
    torch.manual_seed(5)
    dense, _, s_dense = flash_attn_func(q, k, v, P, causal=True, return_attn_probs=True)
    cu = torch.tensor([0, L, 2 * L], dtype=torch.int32, device=device)
    torch.manual_seed(5)
    packed, _, s_packed = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu,
                                                 L, L, P, causal=True, return_attn_probs=True)
    assert torch.equal(packed, dense.flatten(0, 1))
    assert torch.equal(s_packed, s_dense)


def test_s_dmask_marks_exactly_the_specified_mask(device):
    B, L, H, D = 2, 21, 2, 16
    q, k, v, _ = make_inputs((B, L, L, H, H, D), {}, torch.float32, device, seed=9)
    torch.manual_seed(0)
    _, _, s = flash_attn_func(q, k, v, P, return_attn_probs=True)
    torch.manual_seed(0)
    if device == "cuda":
        gen = torch.cuda.default_generators[torch.cuda.current_device()]
        stream = stream_key(gen.initial_seed(), gen.get_offset())
    else:
        stream = stream_key(int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item()), 0)
    want = keep_mask_reference(Dropout(P, stream, None), range(B), H, L, L)
    assert (s != 0).all()                      # no mask, finite scores: every entry is nonzero
    assert torch.equal((s > 0).cpu(), want)


def test_stock_path_uses_the_kernels_mask(device):
    """With the deterministic mode off, dropout runs eager math with the same mask: the
    output is close to the kernels' (not bitwise: another reduction order)."""
    B, L, H, D = 1, 25, 2, 32
    q, k, v, _ = make_inputs((B, L, L, H, H, D), {}, torch.float32, device, seed=2)
    torch.manual_seed(4)
    ours = flash_attn_func(q, k, v, P, causal=True)
    with set_deterministic_mode(False):
        torch.manual_seed(4)
        stock = flash_attn_func(q, k, v, P, causal=True)
    assert torch.allclose(ours, stock, atol=1e-5, rtol=1e-5)


def test_packed_variant_takes_dropout(device):
    B, L, H, D = 1, 20, 2, 16
    q, k, v, _ = make_inputs((B, L, L, H, H, D), {}, torch.float16, device, seed=1)
    torch.manual_seed(1)
    a = flash_attn_func(q, k, v, P)
    torch.manual_seed(1)
    b = flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), P)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_p must be in"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(dropout_p=0.1, dropout_seeds=[1, 2]), TypeError, "dropout_seeds must be a torch.Tensor"),
    (dict(dropout_p=0.1, dropout_seeds=torch.tensor([1.0, 2.0])), TypeError, "dropout_seeds must be int32"),
    (dict(dropout_p=0.1, dropout_seeds=torch.tensor([1, 2, 3])), ValueError, r"dropout_seeds must have shape \(2,\)"),
    (dict(dropout_p=0.0, dropout_seeds=torch.tensor([1, 2])), ValueError, "dropout_p is 0.0"),
])
def test_bad_dropout_arguments_raise_before_the_generator_moves(kw, exc, match, device):
    q, k, v, _ = make_inputs((2, 8, 8, 2, 2, 16), {}, torch.float16, device)
    if isinstance(kw.get("dropout_seeds"), torch.Tensor):
        kw = dict(kw, dropout_seeds=kw["dropout_seeds"].to(device))
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if device == "cuda" else None
    with pytest.raises(exc, match=match):
        flash_attn_func(q, k, v, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


def test_torch_compile_draws_a_fresh_mask_per_step_as_eager(device):
    """Under torch.compile the generator is read eagerly (a graph break): each compiled step
    equals the eager step from the same generator state bit for bit, steps differ from each
    other, and after the first recompile (the stream key becomes a symbolic int) further
    steps compile nothing."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    q, k, v, _ = make_inputs((1, 16, 16, 2, 2, 16), {}, torch.float16, device, seed=4)
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, P, causal=True) * 2, backend=counter)
    torch.manual_seed(0)
    compiled = [step(q, k, v) for _ in range(4)]
    frames = counter.frame_count
    step(q, k, v)
    assert counter.frame_count == frames, "a new compile after the stream key went symbolic"
    torch.manual_seed(0)
    eager = [flash_attn_func(q, k, v, P, causal=True) * 2 for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
    assert not torch.equal(compiled[0], compiled[1])


@pytest.mark.gpu
def test_dropout_compiles_one_variant_whatever_the_stream_key():
    """Each call draws a new stream key; Triton would specialise its two 32-bit halves on
    divisibility by 16 and compile up to four variants per kernel as keys come (seconds of
    stall each, seen on an H200 as 1.5-3.4 s calls long after the first).  The kernels mark
    them ``do_not_specialize``: after the first call no key compiles anything.  The keys
    here are chosen so that the low half is divisible by 16 for some calls and not others
    (seed 16, philox offsets 0, 4, 8, ...), so the test fails without the marks."""
    from bitstable.kernels.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
    from bitstable.kernels.attention_fwd import attention_fwd_kernel

    kernels = (attention_fwd_kernel, attention_bwd_dkdv_kernel, attention_bwd_dq_kernel)

    def variants():
        return [sum(len(c[0]) for c in k.device_caches.values()) for k in kernels]

    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    divisible, counts = set(), []
    for i in range(8):
        torch.manual_seed(16)
        gen.set_offset(4 * i)
        divisible.add(stream_key(gen.initial_seed(), gen.get_offset()) % 16 == 0)
        out = flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
        torch.autograd.grad(out.float().sum(), (q, k, v))
        counts.append(variants())
    assert divisible == {True, False}          # both specialisations would have been hit
    assert all(c == counts[0] for c in counts), counts
