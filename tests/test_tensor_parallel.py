"""Tensor-parallel invariance: the K tree (``set_batch_invariant_mode(tp_tree=S)``) and
``bitstable.parallel`` give the same bits at TP=1, 2 and 4 (docs/TENSOR_PARALLEL.md).

(a) one process: the tree-option products equal the sharded computation simulated
    in-process (each rank's leaves, its subtree root, the roots stacked as an
    all-gather returns them, the top of the tree), for mm / addmm / nn.Linear
    forward and backward;
(b) gloo, 2 and 4 spawned processes: a tiny Llama's logits, loss, KV-cache decode and
    every parameter gradient (sharded ones as slices) bitwise equal to TP=1;
(c) negative controls: another summation order and the plain all-reduce TP path are
    seen to differ, so the comparisons cannot pass vacuously.
"""

import pytest
import torch
import torch.nn.functional as F

import bitstable
from bitstable import ops
from bitstable.ops.matmul import tree_leaves, tree_partials, tree_sum

S = 4   # the tree's leaf count in the CPU tests: TP sizes 1, 2 and 4


def _simulated(a, b, tp_tree, t):
    """What ``bitstable.parallel.sharded_k_mm`` computes at TP=t, in one process: rank r's
    K shard, its ``tree_leaves(K/t, S/t)`` float32 leaves and subtree root, the t roots in
    rank order (what the all-gather returns), finished by the same tree, rounded once."""
    K = a.shape[1]
    kl = K // t
    roots = [tree_sum(tree_partials(a[:, r * kl:(r + 1) * kl], b[r * kl:(r + 1) * kl],
                                    tree_leaves(kl, tp_tree // t))) for r in range(t)]
    return tree_sum(torch.stack(roots)).to(a.dtype)


def _tp_sizes(K, tp_tree):
    """Every TP size that can shard this K evenly: the powers of two dividing gcd(K, S)."""
    g = tree_leaves(K, tp_tree)
    return [t for t in (1, 2, 4, 8, 16) if g % t == 0]


# --- (a) one process ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,tp_tree", [(6, 64, 24, 4), (1, 32, 16, 4), (5, 24, 8, 8), (3, 7, 8, 4)])
def test_tree_mm_equals_the_sharded_computation(device, dtype, M, K, N, tp_tree):
    """K=24 with S=8: 8 leaves of 3; K=7: one leaf (the plain product); TP sizes are the
    ones that divide gcd(K, S)."""
    g = torch.Generator().manual_seed(M * 1000 + K)
    a = torch.randn(M, K, generator=g).to(device, dtype)
    b = torch.randn(K, N, generator=g).to(device, dtype)
    full = ops.tree_mm(a, b, tp_tree)
    assert full.dtype == dtype
    for t in _tp_sizes(K, tp_tree):
        assert torch.equal(_simulated(a, b, tp_tree, t), full), t
    # the K shards in the layouts the layers pass them: W[:, shard].t() of a row-major W
    w = b.t().contiguous()
    for t in _tp_sizes(K, tp_tree):
        kl = K // t
        parts = [tree_sum(tree_partials(a[:, r * kl:(r + 1) * kl].contiguous(),
                                        w[:, r * kl:(r + 1) * kl].contiguous().t(),
                                        tree_leaves(kl, tp_tree // t))) for r in range(t)]
        assert torch.equal(tree_sum(torch.stack(parts)).to(dtype), full), t
    # float32 leaves of 16-bit inputs hold the unrounded sums: the tree is not the sum of
    # rounded leaves, and a one-leaf tree is the plain product
    if tree_leaves(K, tp_tree) == 1:
        assert torch.equal(full, ops.mm(a, b))


def test_tree_mode_routes_mm_addmm_and_linear(device):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 64, generator=g).to(device)
    b = torch.randn(64, 24, generator=g).to(device)
    bias = torch.randn(24, generator=g).to(device)
    with bitstable.set_batch_invariant_mode(tp_tree=S):
        assert bitstable.get_tp_tree() == S
        mm = a @ b
        am = torch.addmm(bias, a, b)
        lin = F.linear(a.view(2, 3, 64), b.t(), bias)
        with bitstable.set_batch_invariant_mode():     # an inner block without the tree
            assert bitstable.get_tp_tree() is None
            plain = a @ b
        assert bitstable.get_tp_tree() == S
    assert bitstable.get_tp_tree() is None
    for t in (1, 2, 4):
        sim = _simulated(a, b, S, t)
        assert torch.equal(mm, sim)
        assert torch.equal(am, sim + bias)          # the bias after the tree, as ops.addmm
        assert torch.equal(lin.view(6, 24), sim + bias)
    assert torch.equal(plain, ops.mm(a, b))


def test_linear_forward_and_backward_equal_column_and_row_sharding(device):
    """nn.Linear under the tree mode, forward and backward, against both shardings:
    column-parallel (output rows sliced: forward and weight gradient are slices, the input
    gradient is the sharded-K tree over the output dim) and row-parallel (input columns
    sliced: the forward is the sharded-K tree)."""
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(32, 64, bias=True).to(device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 32, generator=g))
        lin.bias.copy_(torch.randn(64, generator=g))
    x = torch.randn(2, 3, 32, generator=g).to(device).requires_grad_()
    gy = torch.randn(2, 3, 64, generator=g).to(device)
    with bitstable.set_batch_invariant_mode(tp_tree=S):
        y = lin(x)
        y.backward(gy)
    W, x2, gy2 = lin.weight.detach(), x.detach().reshape(6, 32), gy.reshape(6, 64)
    for t in (1, 2, 4):
        n = 64 // t
        # column-parallel: rank r's output rows
        cols = [ops.tree_mm(x2, W[r * n:(r + 1) * n].t(), S) + lin.bias.detach()[r * n:(r + 1) * n]
                for r in range(t)]
        assert torch.equal(torch.cat(cols, 1), y.detach().reshape(6, 64)), t
        assert torch.equal(_simulated(gy2, W, S, t), x.grad.reshape(6, 32)), t
        for r in range(t):
            assert torch.equal(ops.tree_mm(gy2[:, r * n:(r + 1) * n].t(), x2, S), lin.weight.grad[r * n:(r + 1) * n])
        # row-parallel: the same product with its K (the 32 input features) sharded
        assert torch.equal(_simulated(x2, W.t(), S, t) + lin.bias.detach(), y.detach().reshape(6, 64)), t
    with bitstable.set_batch_invariant_mode(tp_tree=S):
        assert torch.equal(gy2.sum_to_size(64), lin.bias.grad)


def test_a_different_order_is_detected(device):
    """(c), one process: the comparisons see a change of summation order.  A sequential
    sum of the same float32 leaves, and the default (no tree) product, differ from the
    tree somewhere for K=128 (interpreter: 4 leaves of 32 against 4 chunks of 32 added
    in sequence)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(16, 128, generator=g).to(device)
    b = torch.randn(128, 32, generator=g).to(device)
    leaves = tree_partials(a, b, 4)
    tree = tree_sum(leaves)
    sequential = ((leaves[0] + leaves[1]) + leaves[2]) + leaves[3]
    assert torch.equal(tree, ops.tree_mm(a, b, 4))
    assert not torch.equal(tree, sequential)
    assert not torch.equal(tree, ops.mm(a, b))


def test_out_dtype_float32_keeps_default_bits(device):
    g = torch.Generator().manual_seed(6)
    a = torch.randn(5, 40, generator=g).to(device, torch.float16)
    b = torch.randn(40, 24, generator=g).to(device, torch.float16)
    wide = ops.mm(a, b, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    assert torch.equal(wide.to(torch.float16), ops.mm(a, b))
    assert torch.equal(ops.bmm(a[None], b[None], out_dtype=torch.float32)[0], wide)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.mm(a, b, out_dtype=torch.bfloat16)


def test_tree_arguments_are_checked(device):
    assert [tree_leaves(k, 8) for k in (64, 24, 12, 6, 7)] == [8, 8, 4, 2, 1]
    with pytest.raises(ValueError, match="power of two"):
        bitstable.set_batch_invariant_mode(tp_tree=3)
    with pytest.raises(TypeError, match="tp_tree"):
        bitstable.set_batch_invariant_mode(tp_tree="4")
    with pytest.raises(ValueError, match="enabled=True"):
        bitstable.set_batch_invariant_mode(False, tp_tree=4)
    with pytest.raises(ValueError, match="dividing K"):
        tree_partials(torch.ones(2, 6, device=device), torch.ones(6, 2, device=device), 4)
    with pytest.raises(ValueError, match="power-of-two"):
        tree_sum(torch.ones(3, 2))


def test_parallel_layer_checks_the_mode(device):
    from bitstable.parallel import ColumnParallelLinear, TPConfig

    layer = ColumnParallelLinear(torch.nn.Linear(8, 4).to(device), TPConfig.make(None, tp_tree=S))
    x = torch.randn(2, 8, device=device)
    with pytest.raises(RuntimeError, match="tp_tree=4"):
        layer(x)
    with bitstable.set_batch_invariant_mode(tp_tree=S):
        assert torch.equal(layer(x), ops.tree_mm(x, layer.weight.t(), S) + layer.bias)
    with pytest.raises(ValueError, match="tp_tree"):
        TPConfig.make(None, tp_tree=None)
    with pytest.raises(ValueError, match="reduce"):
        TPConfig.make(None, tp_tree=S, reduce="ring")


# --- (b) gloo processes, a tiny Llama ----------------------------------------------------------

SEQ, DECODE_FROM = 6, 5
_RUNS = {}


def _tp1():
    """TP=1: the unsharded transformers model in this process, with and without the tree."""
    from bitstable.parallel import harness

    if "tp1" not in _RUNS:
        ids = harness.inputs(seq=SEQ)
        model = harness.tiny_llama()
        _RUNS["tp1"] = harness.run_step(model, ids, S)
        _RUNS["tp1_plain"] = harness.run_step(model, ids, None)
    return _RUNS["tp1"], _RUNS["tp1_plain"]


def _tp(world):
    from bitstable.parallel import harness

    if world not in _RUNS:
        # the tree's top as the all-gather of float32 roots at TP=4, as the tree
        # reduce-scatter + all-gather of rounded chunks at TP=2 (the same bits by design)
        runs = {"tree": (S, "tree", "reduce_scatter" if world == 2 else "all_gather")}
        if world == 4:
            runs["plain"] = (None, "all_reduce")     # (c): the plain all-reduce TP path
        # the negative control compares logits, loss and gradients; its decode would add nothing
        _RUNS[world] = harness.run_tp(world, {"runs": runs, "seq": SEQ, "decode_from": DECODE_FROM,
                                              "no_decode": ("plain",), "check_collectives": True},
                                      timeout=240)
    return _RUNS[world]


def test_tiny_llama_logits_and_gradients_equal_tp1():
    """The tree path at TP=2 and 4 equals the unsharded model bitwise (logits, loss, every
    gradient, decode).  At TP=4 also (c): the same harness on the plain TP path (local
    products, gloo's all-reduce sum, no tree) reports differences against the unsharded
    model with and without the tree.  (One test for both world sizes: the TP=1 reference
    is computed once, where pytest-xdist would compute it again in every worker.)"""
    pytest.importorskip("transformers")
    from bitstable.parallel.harness import compare

    ref, ref_plain = _tp1()
    assert len(ref["grads"]) == 2 * 9 + 3          # every parameter got a gradient
    for world in (2, 4):
        ranks = _tp(world)
        assert compare(ref, [r["tree"] for r in ranks]) == [], world
        # both collectives, on a product alone (fp32 and fp16, padded element count)
        assert all(all(r["collectives"].values()) for r in ranks), (world, [r["collectives"] for r in ranks])
        # the sharded parameters are the sharded ones (7 per layer), the rest replicated
        assert len(ranks[0]["tree"]["slices"]) == 2 * 7, world
        assert all("decode" in r["tree"] for r in ranks), world
    ranks = _tp(4)
    assert all("decode" not in r["plain"] for r in ranks)
    assert compare(ref_plain, [r["plain"] for r in ranks]) != []
    assert compare(ref, [r["plain"] for r in ranks]) != []


# --- one GPU: a real-size product ----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tp_tree", [8])
def test_real_size_sharded_simulation_equals_unsharded_gpu(tp_tree):
    """1024 x 4096 x 4096 bf16 (a 1B-7B model's projection), the tree of 8 leaves: TP=2,
    4 and 8 simulated on one GPU equal the unsharded tree product, for the forward
    (row-parallel) and the column-parallel input gradient (K = the sharded output dim),
    and the tree is as accurate as the plain product against a float64 reference."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(1024, 4096, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(4096, 4096, device="cuda", generator=g) / 64).to(torch.bfloat16)
    gy = torch.randn(1024, 4096, device="cuda", generator=g).to(torch.bfloat16)
    fwd = ops.tree_mm(a, w.t(), tp_tree)
    bwd = ops.tree_mm(gy, w, tp_tree)
    with bitstable.set_batch_invariant_mode(tp_tree=tp_tree):
        assert torch.equal(F.linear(a, w), fwd)
    for t in (1, 2, 4, 8):
        assert torch.equal(_simulated(a, w.t(), tp_tree, t), fwd), t
        assert torch.equal(_simulated(gy, w, tp_tree, t), bwd), t
    ref = a.double() @ w.t().double()
    err_tree = (fwd.double() - ref).abs().max().item()
    err_plain = (ops.mm(a, w.t()).double() - ref).abs().max().item()
    assert err_tree <= 1.5 * err_plain + 1e-6


def test_compiled_linear_under_the_tree_equals_eager(device):
    """torch.compile (aot_eager on CPU) inside ``set_batch_invariant_mode(tp_tree=4)``: the
    traced mm / addmm carry the tree, so a compiled Linear step equals the eager one, and
    differs from the same step compiled without the tree (K = 128: 4 leaves of 32)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(128, 32), torch.nn.Linear(32, 8, bias=False)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(3, 128, generator=g).to(device)

    def step(fn):
        model.zero_grad()
        loss = fn(x).square().sum()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    with bitstable.set_batch_invariant_mode(tp_tree=S):
        eager = step(model)
        compiled = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    with bitstable.set_batch_invariant_mode():
        plain = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert not all(torch.equal(a, b) for a, b in zip(eager, plain))
