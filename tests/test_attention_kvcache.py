"""flash_attn_with_kvcache: training = prefill = decode, bit for bit; decode batch invariance;
bad input leaves the cache untouched."""

import random

import pytest
import torch

import bitstable
from bitstable import flash_attn_func, flash_attn_with_kvcache
from bitstable import launch_options
from bitstable._backend import interpreting
from bitstable.attention.kvcache import decode_plan

from cases import matrix

FEATURES = [
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(causal=True, window_size=(21, 0), softcap=3.0), id="window-softcap"),
    pytest.param(dict(causal=True, alibi=True), id="alibi"),
]
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float32, id="fp32")]
CPU = dict(L=60, Hq=4, Hk=2, D=32, pages=(16, 32), split=32)
GPU = dict(L=3000, Hq=32, Hk=8, D=128, pages=(16, 64, 256), split=512)
SIZES = [pytest.param(CPU, id="cpu-size"), pytest.param(GPU, id="gpu-size", marks=pytest.mark.gpu)]


def _seq(sz, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, sz["L"], sz["Hq"], sz["D"], generator=g).to(dtype).to(device)
    k = torch.randn(1, sz["L"], sz["Hk"], sz["D"], generator=g).to(dtype).to(device)
    v = torch.randn(1, sz["L"], sz["Hk"], sz["D"], generator=g).to(dtype).to(device)
    return q, k, v


def _split(sz, dtype, device):
    """The size's split, rounded up to a multiple of this device's key block (the
    interpreter's block is 16 keys, the GPU's up to 64)."""
    from bitstable.configs import arch_key, attention_config

    bn = attention_config(arch_key(torch.device(device)), dtype, sz["D"]).block_n
    return -(-sz["split"] // bn) * bn


def _kw(feature, sz, device):
    kw = dict(feature)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.linspace(0.05, 0.4, sz["Hq"], device=device)
    return kw


def _chunks(L, rng, decode_tail):
    """Random chunk sizes covering L; the last ``decode_tail`` tokens one at a time."""
    sizes, left = [], L - decode_tail
    while left > 0:
        c = min(left, rng.randint(1, max(1, L // 3)))
        sizes.append(c)
        left -= c
    return sizes + [1] * decode_tail


def _run_through_cache(q, k, v, sizes, kw, cache, block_table=None, start=0, plans=None):
    """The outputs of calls of ``sizes`` new tokens each, from position ``start`` (the
    cache already holding the keys and values before it); ``plans``: a list that receives
    each call's launch plan (kvcache.decode_plan with the call's arguments)."""
    k_cache, v_cache = cache
    pos, outs = start, []
    for c in sizes:
        seqlens = torch.tensor([pos], dtype=torch.int32, device=q.device)
        args = dict(k=k[:, pos:pos + c], v=v[:, pos:pos + c], cache_seqlens=seqlens, block_table=block_table, **kw)
        if plans is not None:
            plans.append(decode_plan(q[:, pos:pos + c], k_cache, v_cache, **args))
        outs.append(flash_attn_with_kvcache(q[:, pos:pos + c], k_cache, v_cache, **args))
        pos += c
    return torch.cat(outs, dim=1)


def _one_token_steps(L, block_n, split):
    """Steps of a token-by-token decode from the first token.  At GPU sizes every step is
    one token; through the interpreter one token at a time only around the places where
    the decode kernel's work changes (the empty cache, the first key block boundary, the
    first split boundary, the last token) and chunks in between, which the chunked legs
    cover token for token.  At a boundary b: the step whose keys end a whole block or
    split (b - 1) and the first step past it (b, one live key in a new block); a step at
    b + 1 runs b's code with one more live key."""
    singles = sorted({p for b in (0, block_n, split) for p in (b - 1, b) if 0 <= p < L} | {L - 1})
    steps, pos = [], 0
    for p in singles:
        if p > pos:
            steps.append(p - pos)
        steps.append(1)
        pos = p + 1
    if pos < L:
        steps.append(L - pos)
    return steps


# bf16 through the interpreter for one feature only (cases.cpu_bf16_gpu_marked), and fp32 for
# the others (that bf16 case runs the fp32 arithmetic there)
@pytest.mark.parametrize("dtype,feature,sz", matrix(DTYPES, FEATURES, SIZES, bf16_on_cpu=("window-softcap",),
                                                    fp32_off_cpu=("window-softcap",)))
def test_prefill_chunks_and_decode_equal_the_full_forward(dtype, feature, sz, device):
    rng = random.Random(0)
    q, k, v = _seq(sz, dtype, device, seed=1)
    kw = _kw(feature, sz, device)
    with bitstable.set_deterministic_mode(True, split_size=_split(sz, dtype, device)):
        full = flash_attn_func(q, k, v, **kw)
        L = sz["L"]
        shape = (1, L + 7, sz["Hk"], sz["D"])
        # (a) chunked prefill then (b) token-by-token decode, contiguous cache
        cache = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        got = _run_through_cache(q, k, v, _chunks(L, rng, decode_tail=6), kw, cache)
        assert torch.equal(got, full), "contiguous cache: chunked prefill + decode differ from the full forward"
        # pure token-by-token decode from the first token (every dtype and token at GPU
        # sizes; fp16 only, one token at a time across the first block and split boundaries,
        # through the slow interpreter)
        if sz is GPU or dtype == torch.float16:
            from bitstable.configs import arch_key, attention_config

            bn = attention_config(arch_key(torch.device(device)), dtype, sz["D"]).block_n
            steps = [1] * L if sz is GPU else _one_token_steps(L, bn, _split(sz, dtype, device))
            cache = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            got = _run_through_cache(q, k, v, steps, kw, cache)
            assert torch.equal(got, full), "token-by-token decode differs from the full forward"
        # (c) paged caches, several page sizes, pages in random order
        for ps in sz["pages"]:
            n_pages = -(-L // ps) + 3
            perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(ps))
            table = perm.to(torch.int32)[None].to(device)
            pshape = (n_pages, ps, sz["Hk"], sz["D"])
            cache = (torch.zeros(pshape, dtype=dtype, device=device), torch.zeros(pshape, dtype=dtype, device=device))
            got = _run_through_cache(q, k, v, _chunks(L, rng, decode_tail=4), kw, cache, table)
            assert torch.equal(got, full), f"paged cache (page size {ps}) differs from the full forward"


# (head dim, GQA group, dtype): padded head dims (80; 111, 59, 3: not multiples of 8, which the
# full forward zero-pads and decode masks), groups filling 1..16 rows per token
DECODE_CASES = [pytest.param(dict(L=72, split=64, cases=((32, 4, torch.float16), (24, 1, torch.float16))),
                             id="cpu-size"),
                pytest.param(dict(L=2600, split=512, cases=((128, 4, torch.bfloat16), (128, 8, torch.float16),
                                                           (80, 4, torch.bfloat16), (64, 1, torch.bfloat16),
                                                           (32, 8, torch.bfloat16), (16, 4, torch.float16),
                                                           (111, 4, torch.bfloat16), (59, 2, torch.float16),
                                                           (3, 1, torch.float16))),
                             id="gpu-size", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("sz", DECODE_CASES)
@pytest.mark.parametrize("feature", [pytest.param(dict(causal=True), id="causal"),
                                     pytest.param(dict(causal=True, window_size=(700, 0), softcap=3.0,
                                                       alibi=True), id="window-softcap-alibi")])
def test_decode_steps_equal_the_full_forward_per_head_dim(sz, feature, device):
    """Decode steps of one and two tokens after a prefix written into the cache, for several
    head dims (80 and 24: padded) and GQA groups: the steps' outputs equal the full forward's,
    with whole key blocks loaded through the copy engine (where the GPU has one) or not,
    and one-token steps through the Hopper Gluon kernel (where the config table enables it)
    or not."""
    from bitstable.configs import arch_key, attention_config

    L = sz["L"]
    for D, group, dtype in sz["cases"]:
        size = dict(L=L, Hq=2 * group, Hk=2, D=D, split=sz["split"])
        q, k, v = _seq(size, dtype, device, seed=D + group)
        kw = _kw(feature, size, device)
        pre, steps = L - 8, [1, 2, 1, 2, 1, 1]
        with bitstable.set_deterministic_mode(True, split_size=_split(size, dtype, device)):
            full = flash_attn_func(q, k, v, **kw)
            # Under the interpreter there is neither a Gluon kernel nor a copy engine: the
            # forced variants would rerun the default launch.
            for force in ({},) if interpreting() else ({}, {"decode_gluon": False}, {"decode_tma": False}):
                plans = []
                with launch_options.forced(**force):
                    shape = (1, L + 3, 2, D)
                    cache = (torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device))
                    # the prefix as a prefill chunk appends it (its outputs are another test's)
                    cache[0][:, :pre], cache[1][:, :pre] = k[:, :pre], v[:, :pre]
                    got = _run_through_cache(q, k, v, steps, kw, cache, start=pre, plans=plans)
                assert torch.equal(got, full[:, pre:]), \
                    f"D={D} group={group} {dtype} {force}: decode steps differ from the full forward"
                gluon_ran = any(p.kernel == "gluon" for p in plans)
                expected = (not force and device != "cpu" and "softcap" not in kw and D in (64, 128)
                            and arch_key(torch.device(device)) == "sm90"
                            and bool(attention_config("sm90", dtype, D).decode_wgmma_waves))
                assert gluon_ran == expected, f"D={D} {force}: Gluon kernel ran {gluon_ran}, expected {expected}"
                if force.get("decode_tma") is False:
                    assert not any(p.tma for p in plans), f"D={D}: forced pointer loads, planned copy-engine ones"


@pytest.mark.parametrize("n_splits,split", [pytest.param(21, 16, id="cpu-size"),
                                             pytest.param(41, 512, id="gpu-size", marks=pytest.mark.gpu)])
def test_decode_over_many_splits_equals_the_full_forward(n_splits, split, device):
    """Decode steps against caches of 22 (CPU) and 42 (GPU) splits: the combine kernel
    loads and merges them sixteen at a time, four loads of four splits each, so after
    whole groups the last group is partial (a four-split load wholly live, one partly
    live, the rest dead): the last queries' outputs and LSE equal the full forward's,
    bitwise."""
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    # Through the interpreter one kv head of two query heads (GQA): the full forward over
    # 22 splits is the cost, and the combine's split groups do not depend on the heads.
    sz = dict(Hq=2, Hk=1, D=32, split=split) if device == "cpu" else dict(Hq=4, Hk=2, D=128, split=split)
    split = _split(sz, dtype, device)            # a multiple of this device's key block
    L = n_splits * split + 5
    sz["L"] = L
    q, k, v = _seq(sz, dtype, device, seed=11)
    with bitstable.set_deterministic_mode(True, split_size=split):
        full, lse_full, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        for n_new in (1, 2):
            before = L - n_new
            shape = (1, L + 3, sz["Hk"], sz["D"])
            kc = torch.zeros(shape, dtype=dtype, device=device)
            vc = torch.zeros(shape, dtype=dtype, device=device)
            kc[:, :before], vc[:, :before] = k[:, :before], v[:, :before]
            out, lse = flash_attn_with_kvcache(q[:, before:], kc, vc, k=k[:, before:], v=v[:, before:],
                                               cache_seqlens=torch.tensor([before], dtype=torch.int32,
                                                                          device=device),
                                               causal=True, return_softmax_lse=True)
            assert torch.equal(out, full[:, before:]), f"{n_new} new tokens: outputs differ"
            assert torch.equal(lse, lse_full[:, :, before:]), f"{n_new} new tokens: LSE differs"


@pytest.mark.parametrize("sz,batches", [pytest.param(CPU, (3,), id="cpu-size"),
                                        pytest.param(GPU, (2, 8, 64), id="gpu-size", marks=pytest.mark.gpu)])
def test_decode_is_batch_invariant(sz, batches, device):
    """One request's decode step alone equals the same step inside batches of other requests
    with random cache lengths, at every position (through the interpreter one batch of 3:
    first, middle and last position)."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(7)
    Lmax, Hq, Hk, D = sz["L"], sz["Hq"], sz["Hk"], sz["D"]
    with bitstable.set_deterministic_mode(True, split_size=_split(sz, dtype, device)):
        for bs in batches:
            lens = torch.randint(1, Lmax, (bs,), generator=g).to(torch.int32)
            kc = torch.randn(bs, Lmax + 1, Hk, D, generator=g).to(dtype).to(device)
            vc = torch.randn(bs, Lmax + 1, Hk, D, generator=g).to(dtype).to(device)
            q = torch.randn(bs, 1, Hq, D, generator=g).to(dtype).to(device)
            together = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens.to(device), causal=True)
            for pos in range(bs):
                alone = flash_attn_with_kvcache(q[pos:pos + 1], kc[pos:pos + 1], vc[pos:pos + 1],
                                                cache_seqlens=lens[pos:pos + 1].to(device), causal=True)
                assert torch.equal(together[pos:pos + 1], alone), f"batch {bs} position {pos} differs"


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    pytest.param(dict(B=64, L=5000, Hq=16, Hk=4, D=128, dtype=torch.bfloat16, stages=(3, 4)), id="b64-d128"),
    pytest.param(dict(B=64, L=5000, Hq=16, Hk=4, D=64, dtype=torch.float16, stages=(3, 4)), id="b64-d64"),
    pytest.param(dict(B=1, L=65536, Hq=32, Hk=8, D=128, dtype=torch.bfloat16, stages=(3,)), id="b1-64k"),
    pytest.param(dict(B=16, L=9000, Hq=64, Hk=8, D=128, dtype=torch.bfloat16, stages=(3, 4)), id="b16-group8"),
    pytest.param(dict(B=16, L=9000, Hq=4, Hk=4, D=64, dtype=torch.bfloat16, stages=(4,)), id="b16-group1")])
def test_gluon_decode_kernel_equals_the_triton_kernel(case, device):
    """The Hopper Gluon one-token kernel against the Triton partial kernel, bitwise (outputs
    and LSE), forced onto grids of several programs per SM, at 3 and 4 pipeline stages
    (3 stages once exposed a register race: wrong accumulators in ~3% of the split
    states of the batch-1 64k case): lengths include 1, a block multiple, a split
    multiple and random ones, a permuted cache_batch_idx and one appended token; GQA
    groups of 1, 4 and 8."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is Hopper-only")
    g = torch.Generator().manual_seed(17)
    B, Lmax, Hq, Hk, D, dtype = (case[k] for k in ("B", "L", "Hq", "Hk", "D", "dtype"))
    lens = torch.randint(0, Lmax, (B,), generator=g).to(torch.int32)
    if B >= 4:
        lens[:4] = torch.tensor([0, 63, 1023, 2048], dtype=torch.int32)
    else:
        lens[:] = Lmax - 1
    kc = torch.randn(B + 3, Lmax, Hk, D, generator=g).to(dtype).to(device)
    vc = torch.randn(B + 3, Lmax, Hk, D, generator=g).to(dtype).to(device)
    q = torch.randn(B, 1, Hq, D, generator=g).to(dtype).to(device)
    k_new = torch.randn(B, 1, Hk, D, generator=g).to(dtype).to(device)
    v_new = torch.randn(B, 1, Hk, D, generator=g).to(dtype).to(device)
    idx = torch.randperm(B + 3, generator=g)[:B].to(torch.int32).to(device)

    def step(force):
        args = dict(k=k_new, v=v_new, cache_seqlens=lens.to(device), cache_batch_idx=idx, causal=True,
                    return_softmax_lse=True)
        with launch_options.forced(**force):
            kc2, vc2 = kc.clone(), vc.clone()
            plan = decode_plan(q, kc2, vc2, **args)
            out = flash_attn_with_kvcache(q, kc2, vc2, **args)
        assert (plan.kernel == "gluon") == force["decode_gluon"], f"{force}: planned {plan.kernel}"
        if force["decode_gluon"]:
            assert plan.stages == force["decode_stages"], f"{force}: planned {plan.stages} stages"
        return out

    with bitstable.set_deterministic_mode(True, split_size=1024):
        ref = step({"decode_gluon": False})
        for stages in case["stages"]:
            for rep in range(2):
                got = step({"decode_gluon": True, "decode_stages": stages})
                assert torch.equal(got[0], ref[0]), f"{stages} stages, run {rep}: outputs differ"
                assert torch.equal(got[1], ref[1]), f"{stages} stages, run {rep}: LSE differs"


def test_cache_batch_idx_and_lse(device):
    g = torch.Generator().manual_seed(3)
    kc = torch.randn(4, 40, 2, 32, generator=g).half().to(device)
    vc = torch.randn(4, 40, 2, 32, generator=g).half().to(device)
    q = torch.randn(2, 3, 4, 32, generator=g).half().to(device)
    idx = torch.tensor([3, 1], dtype=torch.int32, device=device)
    lens = torch.tensor([30, 17], dtype=torch.int32, device=device)
    out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=idx, causal=True,
                                       return_softmax_lse=True)
    for b in range(2):
        L = lens[b].item()
        ref, ref_lse, _ = flash_attn_func(q[b:b + 1], kc[idx[b]:idx[b] + 1, :L], vc[idx[b]:idx[b] + 1, :L],
                                          causal=True, return_attn_probs=True)
        assert torch.equal(out[b:b + 1], ref) and torch.equal(lse[b:b + 1], ref_lse)


def test_bad_input_leaves_the_cache_untouched(device):
    """Host-checked values (an int or CPU lengths; every tensor on the CPU) raise before the
    cache is written.  GPU-resident batch indices and page ids are the kernels' to check
    (tests/test_kvcache_device_checks.py), so those two raise where they are on the CPU."""
    from bitstable.attention.kvcache.validation import host_readable

    g = torch.Generator().manual_seed(4)
    kc = torch.randn(2, 32, 2, 32, generator=g).half().to(device)
    vc = torch.randn(2, 32, 2, 32, generator=g).half().to(device)
    q = torch.randn(2, 4, 4, 32, generator=g).half().to(device)
    k = torch.randn(2, 4, 2, 32, generator=g).half().to(device)
    before = (kc.clone(), vc.clone())
    lens = torch.tensor([10, 30], dtype=torch.int32)      # CPU lengths: checked on the host
    with pytest.raises(ValueError, match="cache too small: sequence 1 needs 34 slots"):
        flash_attn_with_kvcache(q, kc, vc, k=k, v=k, cache_seqlens=lens)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        flash_attn_with_kvcache(q, kc, vc, k=k, v=k, cache_seqlens=lens.long())
    with pytest.raises(ValueError, match="k and v must be given together"):
        flash_attn_with_kvcache(q, kc, vc, k=k, cache_seqlens=lens)
    pages_k = torch.randn(3, 16, 2, 32, generator=g).half().to(device)
    pages_v = pages_k.clone()
    pbefore = pages_k.clone()
    table = torch.tensor([[0, 1], [2, 7]], dtype=torch.int32, device=device)
    if host_readable(table):
        with pytest.raises(ValueError, match="block_table row 1 names pages outside"):
            flash_attn_with_kvcache(q, pages_k, pages_v, k=k, v=k, cache_seqlens=torch.tensor(
                [0, 14], dtype=torch.int32), block_table=table)
    with pytest.raises(ValueError, match="cache too small: .*needs 34 slots after the append, block_table gives 32"):
        flash_attn_with_kvcache(q, pages_k, pages_v, k=k, v=k, cache_seqlens=torch.tensor(
            [0, 30], dtype=torch.int32, device=device), block_table=table)
    with pytest.raises(ValueError, match="page size .* must be a multiple of 16"):
        flash_attn_with_kvcache(q, pages_k[:, :8], pages_v[:, :8], cache_seqlens=0,
                                block_table=table[:, :1] * 0)
    idx = torch.tensor([0, 5], dtype=torch.int32, device=device)
    if host_readable(idx):
        with pytest.raises(ValueError, match="cache_batch_idx entries must be in"):
            flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=idx)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1]) and torch.equal(pages_k, pbefore)


def test_stock_path_is_close(device):
    """set_deterministic(False) routes the KV-cache call to stock PyTorch (SDPA over the padded
    caches), paged and contiguous alike."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 4, 32, generator=g).to(device)
    kc = torch.randn(2, 48, 2, 32, generator=g).to(device)
    vc = torch.randn(2, 48, 2, 32, generator=g).to(device)
    lens = torch.tensor([20, 41], dtype=torch.int32, device=device)
    for kw in (dict(causal=True), dict(causal=True, softcap=2.0), dict(window_size=(9, 0))):
        ours, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, return_softmax_lse=True, **kw)
        with bitstable.set_deterministic(False):
            stock, stock_lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,
                                                       return_softmax_lse=True, **kw)
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse, stock_lse, rtol=1e-4, atol=1e-5)
    pages = kc.reshape(6, 16, 2, 32)
    vpages = vc.reshape(6, 16, 2, 32)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=device)
    ours = flash_attn_with_kvcache(q, pages, vpages, cache_seqlens=lens, block_table=table, causal=True)
    with bitstable.set_deterministic(False):
        stock = flash_attn_with_kvcache(q, pages, vpages, cache_seqlens=lens, block_table=table, causal=True)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_decode_step_captures_in_a_cuda_graph_and_host_lengths_need_no_sync(device):
    """A decode step (append + attention) replayed from a CUDA graph equals the eager call;
    cache_seqlens given as a CPU tensor gives the same bits as a device tensor."""
    g = torch.Generator().manual_seed(3)
    B, L, Hq, Hk, D = 3, 5000, 8, 2, 128
    kc = torch.randn(B, L, Hk, D, generator=g).to(torch.bfloat16).to(device)
    vc = torch.randn(B, L, Hk, D, generator=g).to(torch.bfloat16).to(device)
    q = torch.randn(B, 1, Hq, D, generator=g).to(torch.bfloat16).to(device)
    kn = torch.randn(B, 1, Hk, D, generator=g).to(torch.bfloat16).to(device)
    vn = torch.randn(B, 1, Hk, D, generator=g).to(torch.bfloat16).to(device)
    lens_host = torch.tensor([4000, 17, 2500], dtype=torch.int32)
    lens = lens_host.to(device)
    k2, v2 = kc.clone(), vc.clone()
    eager = flash_attn_with_kvcache(q, k2, v2, k=kn, v=vn, cache_seqlens=lens, causal=True)
    k3, v3 = kc.clone(), vc.clone()
    host = flash_attn_with_kvcache(q, k3, v3, k=kn, v=vn, cache_seqlens=lens_host, causal=True)
    assert torch.equal(host, eager) and torch.equal(k3, k2)
    k4, v4 = kc.clone(), vc.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):   # warm up (compiles) outside the capture
        flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k=kn, v=vn, cache_seqlens=lens, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_attn_with_kvcache(q, k4, v4, k=kn, v=vn, cache_seqlens=lens, causal=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(k4, k2) and torch.equal(v4, v2)


# The interpreter ignores num_warps and num_stages, has no copy engine (USE_TMA is False)
# and no programmatic launch (USE_PDL is False off sm90), and its combine tile is (16, 4):
# there, only masked-d loads and a combine block_m of 1 are code of their own.
_DECODE_LAUNCH_FORCES = ([{}, {"decode_even_d": False}, {"decode_combine": (1, 4)}] if interpreting() else
                         [{}, {"decode_even_d": False}, {"decode_stages": 2}, {"decode_combine": (1, 1)},
                          {"decode_combine": (1, 4)}, {"decode_combine": (16, 4)}, {"decode_tma": False},
                          {"decode_pdl": False}])
#: What each forced option reads as in a DecodePlan.
_PLAN_FIELDS = {"decode_even_d": "even_d", "decode_stages": "stages", "decode_combine": "combine",
                "decode_tma": "tma", "decode_pdl": "pdl"}


@pytest.mark.parametrize("sz", SIZES)
def test_decode_launch_options_change_no_bits(sz, device):
    """The launch-only options of the decode kernels (16-byte or masked-d loads, pipeline
    depth, the combine kernel's tile, copy-engine loads or not, the combine launched as
    the partial kernel's programmatic dependent or after it) give the same bits."""
    dtype = torch.bfloat16 if device != "cpu" else torch.float16
    q, k, v = _seq(sz, dtype, device, seed=3)
    L = sz["L"]
    shape = (1, L + 7, sz["Hk"], sz["D"])
    kw = dict(causal=True, window_size=(L // 2, 0))
    sizes = _chunks(L, random.Random(5), decode_tail=3)
    results = []
    with bitstable.set_deterministic_mode(True, split_size=_split(sz, dtype, device)):
        for force in _DECODE_LAUNCH_FORCES:
            plans = []
            with launch_options.forced(**force):
                cache = (torch.zeros(shape, dtype=dtype, device=device),
                         torch.zeros(shape, dtype=dtype, device=device))
                results.append((force, _run_through_cache(q, k, v, sizes, kw, cache, plans=plans)))
            for name, value in force.items():   # the forced variant is the one that ran
                got = {getattr(p, _PLAN_FIELDS[name]) for p in plans}
                assert got == {value}, f"forced {name}={value}, the calls planned {got}"
        full = flash_attn_func(q, k, v, **kw)
    for force, got in results:
        assert torch.equal(got, full), f"decode with launch options {force} differs from the full forward"


def test_torch_compile_fullgraph_traces_the_kvcache_op(device):
    """``torch.compile(fullgraph=True)`` of a decode step (append, then attention) traces
    ``bitstable::attn_kvcache`` with no graph break: same output bits and same caches as
    eager, for a tensor and an int ``cache_seqlens``."""
    torch._dynamo.reset()
    dtype = torch.float16
    sz = dict(L=24, Hq=4, Hk=2, D=32)
    q, k, v = _seq(sz, dtype, device, seed=21)
    pre = 21

    def step(q, k_cache, v_cache, k, v, seqlens):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens, causal=True,
                                       return_softmax_lse=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    with bitstable.set_deterministic_mode(True, split_size=_split(dict(sz, split=16), dtype, device)):
        for seqlens in (torch.tensor([pre], dtype=torch.int32, device=device), pre):
            got = []
            for fn in (step, compiled):
                kc = torch.zeros(1, sz["L"], sz["Hk"], sz["D"], dtype=dtype, device=device)
                vc = torch.zeros_like(kc)
                kc[:, :pre], vc[:, :pre] = k[:, :pre], v[:, :pre]
                out, lse = fn(q[:, pre:pre + 2], kc, vc, k[:, pre:pre + 2], v[:, pre:pre + 2], seqlens)
                got.append((out, lse, kc, vc))
            for name, a, b in zip(("out", "lse", "k_cache", "v_cache"), *got):
                assert torch.equal(a, b), f"cache_seqlens={type(seqlens).__name__}: compiled {name} differs"


def test_num_splits_changes_no_bits(device):
    """flash-attn's ``num_splits`` is accepted and ignored: the splits are fixed by
    ``split_size``, so outputs, LSE and the appended cache are the same bits for every
    value; a bad value raises before the cache is touched."""
    dtype = torch.float16
    sz = dict(L=40, Hq=4, Hk=2, D=32, split=16)
    q, k, v = _seq(sz, dtype, device, seed=23)
    pre = 37
    with bitstable.set_deterministic_mode(True, split_size=_split(sz, dtype, device)):
        got = []
        for n in (0, 1, 3, 16):
            kc = torch.zeros(1, sz["L"], sz["Hk"], sz["D"], dtype=dtype, device=device)
            vc = torch.zeros_like(kc)
            kc[:, :pre], vc[:, :pre] = k[:, :pre], v[:, :pre]
            out, lse = flash_attn_with_kvcache(q[:, pre:], kc, vc, k=k[:, pre:], v=v[:, pre:], cache_seqlens=pre,
                                               causal=True, return_softmax_lse=True, num_splits=n)
            got.append((n, out, lse, kc))
        for n, out, lse, kc in got[1:]:
            assert torch.equal(out, got[0][1]) and torch.equal(lse, got[0][2]) and torch.equal(kc, got[0][3]), \
                f"num_splits={n} changed the bits"
        for bad, err in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
            before = kc.clone()
            with pytest.raises(err, match="num_splits"):
                flash_attn_with_kvcache(q[:, pre:], kc, vc, k=k[:, pre:], v=v[:, pre:], cache_seqlens=pre,
                                        causal=True, num_splits=bad)
            assert torch.equal(kc, before), f"num_splits={bad!r} raised after writing the cache"
