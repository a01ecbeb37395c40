"""Layout invariance of the batch-invariant matmul: the same product gives the same bits
whatever the layouts of A and B (row-major, column-major, padded rows, strided views with
no unit stride, batch strides of attention's views), and every row keeps its bits for
every M in each layout.  On CPU through the interpreter at small sizes; ``gpu`` cases at
real sizes (where the kernel's tiles, tensor-core paths and vector loads differ by layout).
"""

import pytest
import torch

import bitstable
from bitstable import ops

# (M, K, N): on CPU M crosses the interpreter's M-class boundary (16); on the GPU M crosses
# the sm90 classes (16, 32, 128, 384, 768) and K/N are real layer sizes.
SIZES = [pytest.param((40, 48, 32), id="cpu-40x48x32")] + [
    pytest.param(s, id="gpu-" + "x".join(map(str, s)), marks=pytest.mark.gpu)
    for s in ((1000, 4096, 4096), (300, 4096, 14336), (64, 14336, 4096))]
ROWS = (1, 7, 17, 33, 65, 129, 385, 769)


def _r(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _layouts(x: torch.Tensor):
    """The same matrix (same values) in the layouts PyTorch hands a matmul."""
    R, C = x.shape
    col = x.t().contiguous().t()                                       # column-major (a weight.t())
    padded = torch.zeros(R, C + 8, dtype=x.dtype, device=x.device)
    padded[:, :C] = x                                                  # row stride > C
    wide = torch.zeros(R, 2 * C, dtype=x.dtype, device=x.device)
    wide[:, ::2] = x                                                   # no unit stride at all
    return {"row": x, "col": col, "padded": padded[:, :C], "strided": wide[:, ::2]}


@pytest.mark.parametrize("mkn", SIZES)
# bf16 only on the GPU: the interpreter computes bf16 tiles as fp32 (the fp32 case's code).
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.gpu)],
                         ids=["fp16", "fp32", "bf16"])
def test_mm_bits_do_not_depend_on_layouts_and_rows_on_m(dtype, mkn, device):
    M, K, N = mkn
    a = _r(M, K, dtype=dtype, device=device, seed=0)
    b = _r(K, N, dtype=dtype, device=device, seed=1)
    ref = ops.mm(a, b)
    for la, av in _layouts(a).items():
        for lb, bv in _layouts(b).items():
            assert torch.equal(av, a) and torch.equal(bv, b)
            out = ops.mm(av, bv)
            assert torch.equal(out, ref), f"A {la}, B {lb}"
        # rows of every M class keep their bits in this layout (B column- and row-major)
        for lb in ("row", "col"):
            bv = _layouts(b)[lb]
            for m in ROWS:
                if m < M:
                    assert torch.equal(ops.mm(av[:m], bv), ref[:m]), f"A {la}, B {lb}, m={m}"
    exact = a.double() @ b.double()
    err = (ref.double() - exact).abs().max().item()
    stock = (torch.mm(a, b).double() - exact).abs().max().item()
    assert err <= 2 * stock + torch.finfo(dtype).eps * exact.abs().max().item()


def test_copy_engine_kernel_runs_where_descriptors_fit_with_the_pointer_kernels_bits(monkeypatch):
    """fp16 products of M > 16 take kernels/matmul_tma.py under the interpreter (as M >= 256
    does on sm90) in every layout with a unit stride; an operand the copy engine cannot take
    (a row stride of 90 bytes) falls back to the pointer kernel; either way the bits are the
    pointer kernel's (rows against M <= 16, and against the pointer kernel forced)."""
    import importlib

    mm_mod = importlib.import_module("bitstable.ops.matmul")
    used = []
    real = mm_mod._launch_tma
    monkeypatch.setattr(mm_mod, "_launch_tma", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    a = _r(40, 48, dtype=torch.float16, device="cpu", seed=0)
    b = _r(48, 32, dtype=torch.float16, device="cpu", seed=1)
    outs = {}
    for la, av in _layouts(a).items():
        for lb, bv in _layouts(b).items():
            used.clear()
            outs[la, lb] = ops.mm(av, bv)
            assert used == [True], (la, lb, used)
    monkeypatch.setattr(mm_mod, "TensorDescriptor", None)      # the pointer kernel, same tiles' class
    used.clear()
    pointer = ops.mm(a, b)
    assert used == [False]
    for key, out in outs.items():
        assert torch.equal(out, pointer), key
    monkeypatch.undo()
    assert torch.equal(ops.mm(a[:16], b), pointer[:16])           # the M <= 16 class: pointer kernel
    odd = _r(40, 45, dtype=torch.float16, device="cpu", seed=2)   # 90-byte rows: no descriptor
    w = _r(45, 32, dtype=torch.float16, device="cpu", seed=3)
    used.clear()
    monkeypatch.setattr(mm_mod, "_launch_tma", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    out = ops.mm(odd, w)
    assert used == [False]
    exact = odd.double() @ w.double()
    assert (out.double() - exact).abs().max() <= 2 * (torch.mm(odd, w).double() - exact).abs().max() + 1e-3


@pytest.mark.parametrize("size", [pytest.param((2, 24, 3, 16), id="cpu"),
                                  pytest.param((4, 1024, 8, 128), id="gpu", marks=pytest.mark.gpu)])
def test_bmm_views_of_attention_give_the_bits_of_contiguous_operands(size, device):
    """``q @ k^T`` and ``p @ v`` on [B, L, H, D] tensors viewed as [B*H, L, D] batches:
    batch strides, transposed operands, and each batch entry alone."""
    B, L, H, D = size
    dtype = torch.float16
    q = _r(B, L, H, D, dtype=dtype, device=device, seed=0)
    k = _r(B, L, H, D, dtype=dtype, device=device, seed=1)
    qv = q.transpose(1, 2).flatten(0, 1)                               # [B*H, L, D], batch-strided view
    kt = k.transpose(1, 2).flatten(0, 1).transpose(1, 2)              # [B*H, D, L], strided
    s = ops.bmm(qv, kt)
    assert torch.equal(s, ops.bmm(qv.contiguous(), kt.contiguous()))
    assert torch.equal(ops.bmm(qv[3:4], kt[3:4]), s[3:4])
    p = torch.softmax(s.float(), -1).to(dtype)
    v = _r(B, L, H, D, dtype=dtype, device=device, seed=2).transpose(1, 2).flatten(0, 1)
    o = ops.bmm(p, v)
    assert torch.equal(o, ops.bmm(p.contiguous(), v.contiguous()))
    assert torch.equal(ops.bmm(p.transpose(1, 2).contiguous().transpose(1, 2), v), o)


def test_linear_forward_and_backward_under_the_mode_are_row_and_layout_invariant(device):
    """nn.Linear's three products (x @ W^T, dY @ W, dY^T @ X) under the mode: the rows of a
    sub-batch equal the rows of the full batch in the forward and in dX; dW is the same
    for the same batch whatever the layout of x (a transposed copy of the same values)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40, bias=True).to(device)
    x = _r(30, 24, dtype=torch.float32, device=device, seed=3)
    dy = _r(30, 40, dtype=torch.float32, device=device, seed=4)

    def run(xin, dyin):
        xin = xin.detach().requires_grad_(True)
        lin.zero_grad()
        with bitstable.set_batch_invariant_mode():
            y = lin(xin)
            y.backward(dyin)
        return y.detach(), xin.grad, lin.weight.grad.clone(), lin.bias.grad.clone()

    y, dx, dw, db = run(x, dy)
    y5, dx5, _, _ = run(x[:5], dy[:5])
    assert torch.equal(y5, y[:5]) and torch.equal(dx5, dx[:5])
    yc, dxc, dwc, dbc = run(x.t().contiguous().t(), dy.t().contiguous().t())
    assert torch.equal(yc, y) and torch.equal(dxc, dx) and torch.equal(dwc, dw) and torch.equal(dbc, db)
    torch.testing.assert_close(dw, dy.t() @ x, rtol=1e-5, atol=1e-5)


def test_n_major_b_tiles_replace_named_classes_only():
    """The row-major-B tiles (configs._MATMUL_N_MAJOR_B) replace classes that exist, and only
    where block_k is free (sm90 16-bit: the tensor cores add K in steps of 16)."""
    from bitstable.configs import _MATMUL, _MATMUL_N_MAJOR_B, matmul_config

    for key, overrides in _MATMUL_N_MAJOR_B.items():
        assert key[0] == "sm90" and key[1] in ("bf16", "fp16"), key
        bounds = [b for b, _ in _MATMUL[key]]
        for bound, cfg in overrides.items():
            assert bound in bounds and cfg.chunk_blocks == 0 and cfg.block_k % 16 == 0, (key, bound)
    big = 10 ** 6
    assert matmul_config("sm90", torch.bfloat16, big, True) == _MATMUL_N_MAJOR_B[("sm90", "bf16")][None]
    assert matmul_config("sm90", torch.bfloat16, big, False) == _MATMUL[("sm90", "bf16")][-1][1]
    assert matmul_config("interpreter", torch.float16, big, True) == matmul_config("interpreter", torch.float16, big)
