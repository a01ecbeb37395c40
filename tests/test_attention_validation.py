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


@pytest.mark.parametrize("D", [264, 512])
def test_bad_head_dim(device, D):
    """Any head dim from 1 to 256 runs (not a multiple of 8: zero-padded inside,
    tests/test_flash_attn_api.py); past 256 raises."""
    q, k, v = qkv(device, D=D)
    with pytest.raises(ValueError, match=r"head dim \(q.shape\[-1\]\) must be in \[1, 256\]"):
        flash_attn_func(q, k, v)


def test_heads_must_divide(device):
    q, k, v = qkv(device, Hq=3, Hk=2)
    with pytest.raises(ValueError, match=r"number of q heads \(3\) must be a multiple of the number of k/v heads \(2\)"):
        flash_attn_func(q, k, v)


def test_bad_options(device):
    q, k, v = qkv(device)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        flash_attn_func(q, k, v, dropout_p=1.5)
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


# --- flash_attn_with_kvcache: every check runs before the append -------------------------

def _kv_args(device, dtype=torch.float16, B=2, L=32, Hq=4, Hk=2, D=32, Lq=2, n_new=2):
    """A contiguous cache call that appends ``n_new`` tokens (valid as given)."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    return dict(q=r(B, Lq, Hq, D), k_cache=r(B, L, Hk, D), v_cache=r(B, L, Hk, D),
                k=r(B, n_new, Hk, D), v=r(B, n_new, Hk, D),
                cache_seqlens=torch.tensor([3, 10], dtype=torch.int32, device=device))


def _raises_cache_untouched(exc, match, args, **kw):
    """The call raises ``exc`` (message matching ``match``) and leaves every real cache
    tensor bit for bit as it was; returns the message."""
    caches = [t for t in (args["k_cache"], args["v_cache"])
              if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    before = [t.clone() for t in caches]
    with pytest.raises(exc, match=match) as err:
        bitstable.flash_attn_with_kvcache(**{**args, **kw})
    for t, b in zip(caches, before):
        assert torch.equal(t, b), f"{err.value!r} was raised after the cache was written"
    return str(err.value)


def test_kvcache_option_errors_leave_the_cache_untouched(device):
    args = _kv_args(device)
    _raises_cache_untouched(TypeError, "causal must be a bool", args, causal="yes")
    _raises_cache_untouched(TypeError, "causal must be a bool", args, causal=1)
    _raises_cache_untouched(ValueError, "window_size entries must be >= -1", args, window_size=(-2, 0))
    _raises_cache_untouched(ValueError, "softcap must be >= 0", args, softcap=-1.0)
    _raises_cache_untouched(ValueError, "softmax_scale must be finite", args, softmax_scale=float("inf"))
    _raises_cache_untouched(ValueError, "alibi_slopes must have shape", args,
                            alibi_slopes=torch.ones(3, device=device))
    _raises_cache_untouched(TypeError, "k must be a torch.Tensor", args, k=[0.0])


def test_kvcache_split_size_is_checked_before_the_append(device):
    from bitstable.attention.launch import resolve_split_size
    from bitstable.configs import arch_key, attention_config

    args = _kv_args(device)
    for bad, exc in ((0, ValueError), (-16, ValueError), (24, ValueError), (16.0, TypeError),
                     ("32", TypeError), (True, TypeError)):
        _raises_cache_untouched(exc, "split_size", args, split_size=bad)
    bn = attention_config(arch_key(torch.device(device)), torch.float16, 32).block_n
    if bn > 16:   # a multiple of 16 that is not one of the key block (GPU configs)
        _raises_cache_untouched(ValueError, f"split_size=16 must be a multiple of the key block "
                                f"block_n={bn}", args, split_size=16)
    with pytest.raises(ValueError, match="split_size"):
        resolve_split_size(16, -32)
    assert resolve_split_size(16, None) == bitstable.get_deterministic_mode().split_size


def test_kvcache_errors_name_k_cache_and_v_cache(device):
    args = _kv_args(device)
    msg = _raises_cache_untouched(TypeError, r"k_cache dtype torch.float16 must match q's torch.float32",
                                  args, q=args["q"].float())
    assert "q, k, v" not in msg
    _raises_cache_untouched(TypeError, r"v_cache dtype torch.float32 must match q's torch.float16",
                            args, v_cache=args["v_cache"].float())
    _raises_cache_untouched(TypeError, "k_cache must be bfloat16, float16 or float32", args,
                            k_cache=args["k_cache"].double(), v_cache=args["v_cache"].double())
    _raises_cache_untouched(ValueError, "v_cache is on meta", args, v_cache=args["v_cache"].to("meta"))
    _raises_cache_untouched(ValueError, r"k_cache/v_cache head dim 16 does not match q's 32", args,
                            k_cache=args["k_cache"][..., :16], v_cache=args["v_cache"][..., :16])
    _raises_cache_untouched(ValueError, r"number of q heads \(4\) must be a multiple of the number of "
                            r"k_cache/v_cache heads \(3\)", args,
                            k_cache=torch.cat([args["k_cache"], args["k_cache"][:, :, :1]], 2),
                            v_cache=torch.cat([args["v_cache"], args["v_cache"][:, :, :1]], 2))
    _raises_cache_untouched(TypeError, "k_cache must be a torch.Tensor", args, k_cache=None)


def test_kvcache_two_rows_appending_to_one_cache_row_raise(device):
    from bitstable.attention.kvcache.validation import host_readable

    args = _kv_args(device)
    idx = torch.tensor([1, 1], dtype=torch.int32, device=device)
    if host_readable(idx):   # GPU-resident indices: the kernels check (test_kvcache_device_checks.py)
        _raises_cache_untouched(ValueError, r"cache_batch_idx names cache rows \[1\] for more than one batch row",
                                args, cache_batch_idx=idx)
    # Reading one cache row from two batch rows (no append) is fine.
    q = args["q"][:, :1]
    out = bitstable.flash_attn_with_kvcache(q, args["k_cache"], args["v_cache"], cache_seqlens=3,
                                            cache_batch_idx=idx)
    assert out.shape == q.shape and not out.isnan().any()


# --- NaN: what the documented behaviour (README "What bad input gets") rests on ----------

def test_nan_in_v_reaches_every_row_of_the_query_tiles_that_fold_its_key_block(device):
    """A NaN in v at key j (one element) turns NaN that element's column in the rows of every
    query tile (block_m rows) that folds j's key block (block_n keys), also in the rows of those
    tiles that cannot see key j (their weight for it is exactly 0, and 0 x NaN is NaN); tiles
    that never load the block stay finite."""
    from bitstable.configs import arch_key, attention_config

    cfg = attention_config(arch_key(torch.device(device)), torch.float16, 32)
    bm, bn = cfg.block_m, cfg.block_n
    jb = -(-bm // bn)                       # first key block the first query tile never loads
    j = jb * bn + bn // 2                   # a key inside it, not at its start
    L = 3 * max(bm, bn)
    q, k, v = qkv(device, Lq=L, Lk=L)
    v[0, j, 0, 3] = float("nan")            # one element, KV head 0
    out = flash_attn_func(q, k, v, causal=True)
    last_row_of_tile = [min((r // bm + 1) * bm, L) - 1 for r in range(L)]
    expect_nan = torch.tensor([last >= jb * bn for last in last_row_of_tile], device=device)
    nan = out[0, :, 0].isnan()
    assert torch.equal(nan[:, 3], expect_nan)
    assert not nan[:, :3].any() and not nan[:, 4:].any()   # only the NaN's own head-dim column
    assert expect_nan[:j].any(), "the test must cover rows that do not see key j but are NaN"
    assert not out[0, :, 1].isnan().any()   # the other head never reads the NaN


def test_nan_in_the_cache_past_seqlens_or_in_unused_pages_changes_no_bits(device):
    """Slots past cache_seqlens and pages no sequence uses are never read; NaN in a cached k
    reaches only the rows that see that key (the others keep their bits)."""
    g = torch.Generator().manual_seed(8)
    n, Hk, D = 20, 2, 32
    q = torch.randn(1, 4, 4, D, generator=g).half().to(device)
    kc = torch.randn(1, 48, Hk, D, generator=g).half().to(device)
    vc = torch.randn(1, 48, Hk, D, generator=g).half().to(device)
    ref = flash_attn_func(q, kc[:, :n], vc[:, :n], causal=True)
    nan = float("nan")
    kn, vn = kc.clone(), vc.clone()
    kn[:, n:], vn[:, n:] = nan, nan
    assert torch.equal(bitstable.flash_attn_with_kvcache(q, kn, vn, cache_seqlens=n, causal=True), ref)
    # Pages: the sequence's keys 0..15 in page 2, keys 16..19 in page 0 (its slots 4.. unused);
    # pages 1 and 3 belong to nobody.
    kp = torch.full((4, 16, Hk, D), nan, dtype=torch.float16, device=device)
    vp = kp.clone()
    kp[2], vp[2] = kc[0, :16], vc[0, :16]
    kp[0, :4], vp[0, :4] = kc[0, 16:n], vc[0, 16:n]
    table = torch.tensor([[2, 0]], dtype=torch.int32, device=device)
    assert torch.equal(bitstable.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=n, block_table=table,
                                                         causal=True), ref)
    # NaN in key 18 of KV head 0: the queries at positions 16, 17 cannot see it.
    kn = kc.clone()
    kn[0, 18, 0, 5] = nan
    out = bitstable.flash_attn_with_kvcache(q, kn, vc, cache_seqlens=n, causal=True)
    assert out[0, 2:, :2].isnan().all()                                  # query heads of KV head 0
    assert torch.equal(out[0, :2], ref[0, :2]) and torch.equal(out[:, :, 2:], ref[:, :, 2:])
