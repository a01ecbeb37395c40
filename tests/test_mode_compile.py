"""The batch-invariant mode under torch.compile: the compiled graph keeps bitstable's ops.

Without the autograd-key entries (ops/traced.py), AOTAutograd traces aten.mm & co. and the
compiled graph runs inductor's / cuBLAS's kernels: the mode silently does not apply.  On
CPU the backend is ``aot_eager`` (the interpreter's kernels cannot be compiled), on the GPU
``inductor`` as well.
"""

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from bitstable import ops
from bitstable.ops.batch_invariant import set_batch_invariant_mode

#: aten ops that must not appear in a compiled graph under the mode (bitstable's stand in)
REPLACED = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten._softmax.", "aten._log_softmax.",
            "aten.native_layer_norm.", "aten.native_layer_norm_backward.", "aten._softmax_backward_data.",
            "aten._log_softmax_backward_data.", "aten.sum.dim_IntList", "aten.mean.dim")


class Block(torch.nn.Module):
    """Linear, LayerNorm, RMSNorm, an attention-like bmm + softmax, reductions over a dim."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = torch.nn.Linear(d, 3 * d)
        self.ln = torch.nn.LayerNorm(d)
        self.rms = torch.nn.RMSNorm(d)
        self.out = torch.nn.Linear(d, 8, bias=False)

    def forward(self, x):                                  # x [B, L, d]
        q, k, v = self.inp(self.ln(x)).chunk(3, dim=-1)
        p = torch.softmax(q @ k.transpose(1, 2), dim=-1)
        h = self.rms(x + p @ v)
        y = self.out(h)
        return torch.log_softmax(y, -1).sum(-1).mean(0) + y.mean(dim=(0, 1)).sum(0)


def _step(model, x):
    model.zero_grad()
    loss = model(x).sum()
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def test_compiled_step_under_the_mode_equals_eager(device):
    """aot_eager (aten ops run eagerly): loss and every gradient of a compiled step equal
    eager's bitwise, and the recorded graphs hold bitstable's custom ops and none of the aten
    ops they replace."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block().to(device)
    x = torch.randn(3, 5, 16, device=device)
    recorder = AotEagerAndRecordGraphs()
    with set_batch_invariant_mode():
        eager = _step(model, x)
        compiled = _step(torch.compile(model, backend=recorder, fullgraph=True), x)
    for i, (a, b) in enumerate(zip(eager, compiled)):
        assert torch.equal(a, b), f"output {i} (0 = loss, then parameter grads) differs"
    code = "\n".join(g.code for g in recorder.fw_graphs + recorder.bw_graphs)
    assert "bitstable.mode_mm" in code and "bitstable.mode_layer_norm" in code
    present = [op for op in REPLACED if "torch.ops." + op in code]
    assert not present, f"stock ops left in the compiled graph: {present}"


class Rows(Block):
    """Block without the batch reductions: per-row outputs [B, L, 8]."""

    def forward(self, x):
        q, k, v = self.inp(self.ln(x)).chunk(3, dim=-1)
        p = torch.softmax(q @ k.transpose(1, 2), dim=-1)
        return torch.log_softmax(self.out(self.rms(x + p @ v)), -1)


@pytest.mark.gpu
def test_inductor_under_the_mode_is_batch_invariant_and_repeatable(device):
    """inductor: its fused elementwise code (and the composite RMS-norm backward it compiles)
    need not round like eager (an H200 run found one parameter gradient that differed), so the contract
    under inductor is the mode's own: every row's output and a step's gradients are the same
    run to run, and a sequence's rows alone equal its rows inside a batch."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Rows().to(device)
    x = torch.randn(4, 5, 16, device=device)
    fn = torch.compile(model, backend="inductor", fullgraph=True)
    with set_batch_invariant_mode():
        batched = fn(x)
        alone = fn(x[2:3])
        assert torch.equal(alone[0], batched[2])
        steps = []
        for _ in range(2):
            model.zero_grad()
            fn(x).sum().backward()
            steps.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*steps):
        assert torch.equal(a, b)
    eager = model(x)
    assert (batched - eager).abs().max().item() < 1e-4


def test_compiled_graph_without_the_mode_keeps_stock_ops(device):
    """The negative control: outside the mode the same model's graph has aten.mm."""
    torch._dynamo.reset()
    model = Block().to(device)
    recorder = AotEagerAndRecordGraphs()
    _step(torch.compile(model, backend=recorder, fullgraph=True), torch.randn(2, 3, 16, device=device))
    code = "\n".join(g.code for g in recorder.fw_graphs + recorder.bw_graphs)
    assert "bitstable.mode_" not in code and "torch.ops.aten.mm." in code


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.gpu)])
def test_dynamic_shapes_take_the_runtime_m(backend, device):
    """torch.compile(dynamic=True): one graph for every M, and each call's rows are those of
    the eager kernel at that M (the matmul's shape class follows the runtime M, not the M
    seen at trace time: on the GPU M 1-64 and M > 64 take different tiles)."""
    torch._dynamo.reset()
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g).to(dtype).to(device)
    fn = torch.compile(lambda x: torch.nn.functional.linear(x, w), backend=backend, dynamic=True, fullgraph=True)
    counts = []
    with set_batch_invariant_mode():
        for m in (300, 1, 7, 64, 65):
            x = torch.randn(m, 64, generator=g).to(dtype).to(device)
            assert torch.equal(fn(x), ops.mm(x, w.t())), f"M={m}"
            counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[-1] == counts[1], f"recompiled for a new M: {counts}"


def test_inference_mode_still_takes_the_mode(device):
    """Inference tensors skip the autograd key: the backend-key override still applies."""
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(9, 33, generator=g).to(device) for _ in range(2))
    with set_batch_invariant_mode(), torch.inference_mode():
        assert torch.equal(a @ b.t(), ops.mm(a, b.t()))


def test_tracing_tells_fake_from_real_tensors_through_wrappers():
    """ops/traced.py's ``tracing``: a real tensor (plain, a Parameter, inside vmap, inside
    functionalize) is computed; a fake one (bare, or under a functionalization or
    functorch wrapper) is traced."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bitstable.ops.traced import tracing

    real = torch.randn(3, 4)
    seen = []
    assert not tracing(real) and not tracing(torch.nn.Parameter(real)) and not tracing(3)
    torch.vmap(lambda r: seen.append(tracing(r)) or r)(real)
    torch.func.functionalize(lambda r: seen.append(tracing(r)) or r)(real)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
        assert tracing(fake)
        torch.vmap(lambda r: seen.append(not tracing(r)) or r)(fake)
        torch.func.functionalize(lambda r: seen.append(not tracing(r)) or r)(fake)
    assert seen == [False, False, False, False], seen
