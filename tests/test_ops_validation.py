"""bitstable.ops and the batch-invariant mode on bad input: torch's IndexError for a bad dim,
TypeError / ValueError naming the argument, stock torch's semantics for addmm's bias, beta
and alpha, and the stock kernels for the dtypes the mode's kernels do not take."""

import pytest
import torch

import bitstable
from bitstable import ops

REDUCTIONS = (ops.softmax, ops.log_softmax, ops.sum, ops.mean)


def _x(device, *shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(device)


def test_reductions_bad_dim_raise_index_error_like_torch(device):
    x = _x(device, 3, 5)
    stock = (torch.softmax, torch.log_softmax, torch.sum, torch.mean)
    for op, ref in zip(REDUCTIONS, stock):
        for bad in (2, -3):
            with pytest.raises(IndexError, match=r"Dimension out of range \(expected to be in range of "
                                                 r"\[-2, 1\], but got " + str(bad)):
                op(x, bad)
            with pytest.raises(IndexError):
                ref(x, bad)
        assert torch.equal(op(x, -1), op(x, 1)) and torch.equal(op(x, -2), op(x, 0))
        torch.testing.assert_close(op(x, -1), ref(x, -1))
        with pytest.raises(IndexError, match=r"\[-1, 0\], but got 1"):   # a 0-d tensor takes -1, 0
            op(x[0, 0], 1)
        assert op(x[0, 0], -1).shape == ref(x[0, 0], -1).shape == ()
        with pytest.raises(TypeError, match="dim must be an int"):
            op(x, 1.0)
    with pytest.raises(ValueError, match="dim names a dimension more than once"):
        ops.sum(x, (1, -1))


def test_reductions_take_float_inputs_only(device):
    x = _x(device, 3, 5)
    for bad in (x.long(), x > 0, x.to(torch.complex64), x.double()):
        for op in REDUCTIONS:
            with pytest.raises(TypeError, match=f"x must be bfloat16, float16 or float32, got {bad.dtype}"):
                op(x=bad, dim=0)


def test_reductions_dtype_argument_must_be_a_kernel_float_dtype(device):
    x = _x(device, 3, 5)
    for op in REDUCTIONS:
        for bad in (torch.int64, torch.float64, torch.bool):
            with pytest.raises(TypeError, match=f"dtype must be bfloat16, float16 or float32 .*got {bad}"):
                op(x, 0, dtype=bad)
        with pytest.raises(TypeError, match="dtype must be a torch.dtype or None, got str"):
            op(x, 0, dtype="float32")
    assert ops.softmax(x.half(), -1, dtype=torch.float32).dtype == torch.float32


def test_mode_gives_non_float_reductions_to_stock(device):
    """Under the mode integer sums are stock's (bitwise), an integer mean raises what stock
    raises, and float reductions without a dim keep working."""
    xi = torch.arange(12, device=device).reshape(3, 4) * 1000003
    stock = (torch.sum(xi, 0), torch.sum(xi), torch.sum(xi > 5000000, 1))
    with pytest.raises(RuntimeError) as stock_err:
        torch.mean(xi, 0)
    with bitstable.set_batch_invariant_mode():
        got = (torch.sum(xi, 0), torch.sum(xi), torch.sum(xi > 5000000, 1))
        with pytest.raises(type(stock_err.value), match="mean"):
            torch.mean(xi, 0)
        with pytest.raises(type(stock_err.value), match="mean"):
            torch.mean(xi)
        means = (xi.float().mean(), xi.float().mean(1))
    for g, s in zip(got, stock):
        assert g.dtype == s.dtype and torch.equal(g, s)
    torch.testing.assert_close(means[0], xi.float().mean())
    torch.testing.assert_close(means[1], xi.float().mean(1))


def test_norms_check_normalized_shape_weight_and_bias(device):
    from bitstable.ops.norms import native_layer_norm

    x = _x(device, 3, 8)
    w = torch.ones(8, device=device)
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape \(8,\), got \(7,\)"):
        ops.layer_norm(x, (8,), w[:7])
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape \(8,\), got \(7,\)"):
        ops.rms_norm(x, (8,), w[:7])
    with pytest.raises(ValueError, match=r"bias must have shape normalized_shape \(8,\), got \(2, 8\)"):
        native_layer_norm(x, [8], w, torch.zeros(2, 8, device=device), 1e-5)
    with pytest.raises(TypeError, match="weight must be bfloat16, float16 or float32, got torch.int64"):
        ops.layer_norm(x, (8,), w.long())
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None"):
        ops.layer_norm(x, (8,), w, [0.0] * 8)
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.layer_norm(x, (8,), w.to("meta"))
    for bad in ((4,), (2, 3, 8), ()):
        with pytest.raises(ValueError, match="normalized_shape"):
            ops.layer_norm(x, bad)
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints"):
        ops.layer_norm(x, "8")
    with pytest.raises(TypeError, match="eps must be a float"):
        ops.layer_norm(x, (8,), eps="1e-5")
    with bitstable.set_batch_invariant_mode():   # the mode's layer norm: the same checks
        with pytest.raises(ValueError, match=r"weight must have shape normalized_shape \(8,\)"):
            torch.nn.functional.layer_norm(x, (8,), w[:7])
        with pytest.raises(ValueError, match=r"weight must have shape normalized_shape \(8,\)"):
            torch.nn.functional.rms_norm(x, (8,), w[:7])
    torch.testing.assert_close(ops.layer_norm(x, 8), torch.nn.functional.layer_norm(x, (8,)))


def _exact_mats(device):
    """Small integer-valued float32 matrices: every sum is exact, so stock's and bitstable's
    orders give the same bits."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-3, 4, (3, 4), generator=g).float().to(device)
    b = torch.randint(-3, 4, (4, 5), generator=g).float().to(device)
    return a, b, g


def test_addmm_follows_stock_bias_broadcast_beta_and_alpha(device):
    a, b, g = _exact_mats(device)
    full = torch.randint(-3, 4, (3, 5), generator=g).float().to(device)
    biases = (full[0, 0], full[0], full[:1], full[:, :1], full)     # 0-d, [N], [1, N], [M, 1], [M, N]
    for bias in biases:
        for beta in (0, 1, 0.5):
            for alpha in (1, 2):
                ref = torch.addmm(bias, a, b, beta=beta, alpha=alpha)
                got = ops.addmm(bias, a, b, beta=beta, alpha=alpha)
                assert torch.equal(got, ref), (tuple(bias.shape), beta, alpha)
    with bitstable.set_batch_invariant_mode():
        moded = [torch.addmm(bias, a, b, beta=0.5, alpha=2) for bias in biases]
    assert all(torch.equal(m, torch.addmm(bias, a, b, beta=0.5, alpha=2)) for m, bias in zip(moded, biases))
    nan = torch.full((5,), float("nan"), device=device)
    ref = torch.addmm(nan, a, b, beta=0)
    assert not ref.isnan().any() and torch.equal(ops.addmm(nan, a, b, beta=0), ref)
    with bitstable.set_batch_invariant_mode():
        assert torch.equal(torch.addmm(nan, a, b, beta=0), ref)
        assert torch.equal(torch.addmm(nan, a, b, beta=0, alpha=2), torch.addmm(nan, a, b, beta=0, alpha=2))


def test_addmm_bad_bias_and_scalars_name_the_argument(device):
    a, b, _ = _exact_mats(device)
    for bad in (torch.zeros(4, device=device), torch.zeros(3, device=device),
                torch.zeros(2, 5, device=device), torch.zeros(1, 3, 5, device=device)):
        with pytest.raises(ValueError, match=rf"bias of shape {tuple(bad.shape)} does not broadcast".replace(
                "(", r"\(").replace(")", r"\)")):
            ops.addmm(bad, a, b)
    for bad in (torch.zeros(5, dtype=torch.int64, device=device), torch.zeros(5, dtype=torch.bool, device=device),
                torch.zeros(5, dtype=torch.bfloat16, device=device)):
        with pytest.raises(TypeError, match=f"bias must have a and b's dtype torch.float32, got {bad.dtype}"):
            ops.addmm(bad, a, b)
        with pytest.raises(RuntimeError):   # stock refuses a bias of another dtype too
            torch.addmm(bad, a, b)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        ops.addmm(1.0, a, b)
    with pytest.raises(TypeError, match="beta must be a real number"):
        ops.addmm(torch.zeros(5, device=device), a, b, beta="1")
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ops.addmm(torch.zeros(5, device=device), a, b, alpha=1j)
    bf = a.to(torch.bfloat16), b.to(torch.bfloat16)
    with bitstable.set_batch_invariant_mode():   # the mode: the same errors, not stock's RuntimeError
        with pytest.raises(TypeError, match="bias must have a and b's dtype torch.bfloat16, got torch.int64"):
            torch.addmm(torch.zeros(5, dtype=torch.int64, device=device), *bf)
        with pytest.raises(ValueError, match=r"bias of shape \(4,\) does not broadcast"):
            torch.addmm(torch.zeros(4, device=device), a, b)


def test_mode_fallback_calls_stock_kernels_without_rebuilding_registrations(monkeypatch):
    """An input the kernels do not take (int64) runs the stock kernel captured at import;
    the overrides stay registered (no teardown/rebuild per fallback)."""
    from bitstable.ops import batch_invariant as bi

    if not bi._STOCK:
        pytest.skip("this torch has no torch.library.get_kernel: fallbacks take stock_ops()")
    calls = []
    real = bi._apply
    monkeypatch.setattr(bi, "_apply", lambda state: (calls.append(state), real(state)))
    x = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    with bitstable.set_batch_invariant_mode():
        entered = len(calls)
        s = torch.sum(x, 1)
        m = torch.mm(x, x.t())
        assert len(calls) == entered
    assert torch.equal(s, torch.tensor([6, 22, 38])) and torch.equal(m, x @ x.t())


def test_rows_of_no_elements_and_no_rows_give_stocks_results(device):
    """The row ops' edge shapes: rows with no elements and no rows at all, as stock gives them
    (the fast paths for the last dim of a contiguous tensor included)."""
    from bitstable import ops

    F = torch.nn.functional
    empty_rows, no_rows = torch.zeros(3, 0, device=device), torch.zeros(0, 4, device=device)
    for x in (empty_rows, no_rows):
        n = x.shape[-1]
        assert torch.equal(ops.softmax(x, -1), torch.softmax(x, -1))
        assert torch.equal(ops.sum(x, -1), x.sum(-1)) and ops.sum(x, -1, keepdim=True).shape == (x.shape[0], 1)
        assert ops.mean(x, -1).shape == x.mean(-1).shape
        assert torch.equal(ops.mean(x, -1).isnan(), x.mean(-1).isnan())
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, (n,), None, None, 1e-5)
        from bitstable.ops.norms import native_layer_norm
        oy, omean, orstd = native_layer_norm(x, (n,), None, None, 1e-5)
        assert oy.shape == y.shape and omean.shape == mean.shape and orstd.shape == rstd.shape
        assert torch.equal(omean, mean) and torch.equal(orstd.isnan(), rstd.isnan())
        assert ops.layer_norm(x, (n,)).shape == F.layer_norm(x, (n,)).shape


def test_the_last_dim_fast_paths_give_the_general_paths_bits(device):
    """softmax / log_softmax / sum / mean over the last dim of a contiguous tensor, and the
    norms, skip the general path's copies: the same bits as the general path on a
    non-contiguous copy of the same values (3-d, keepdim, a dtype argument)."""
    from bitstable import ops

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 40, generator=g).to(device)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)      # same values, not contiguous
    assert not strided.is_contiguous() and torch.equal(strided, x)
    for fn in (lambda t: ops.softmax(t, -1), lambda t: ops.log_softmax(t, 2),
               lambda t: ops.sum(t, -1), lambda t: ops.mean(t, -1, keepdim=True),
               lambda t: ops.sum(t, 2, dtype=torch.float32),
               lambda t: ops.layer_norm(t, (40,), t[0, 0], t[0, 1]), lambda t: ops.rms_norm(t, (5, 40))):
        fast, general = fn(x), fn(strided)
        assert fast.shape == general.shape and torch.equal(fast, general)
