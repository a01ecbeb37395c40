"""Column- and row-parallel linear layers whose bits do not depend on the TP size.

With the K tree of S leaves (``set_batch_invariant_mode(tp_tree=S)``), a product
over a K that tensor parallelism shards across t ranks (t divides S) is computed as:

- on rank r, the leaves of its contiguous K shard (``tree_leaves(K/t, S/t)`` float32
  partials, one kernel launch) summed to their subtree root (``tree_sum``): a node
  of the one-process tree;
- the t roots all-gathered (float32, rank order) and finished by the same
  ``tree_sum``; rounded once to the dtype.

That is exactly ``bitstable.ops.tree_mm`` on the whole K, so the one-process model
under the tree mode and every TP size give the same bits.  Which products have a
sharded K:

- row-parallel (o_proj, down_proj) forward: ``x[:, shard] @ W[:, shard]^T``;
- column-parallel (q/k/v, gate/up) backward, the input gradient
  ``dy[:, shard] @ W[shard, :]`` (the reduction over the sharded output dim).

Every other product (column-parallel forward, weight gradients, row-parallel input
gradient) has its full K on each rank and is a slice of the one-process product,
computed by the same ``ops.mm(..., tp_tree=S)`` call, so the same bits by batch and
layout invariance.  Weight gradients of sharded weights stay sharded; replicated
parameters get identical gradients on every rank (no gradient all-reduce is needed
for tensor parallelism alone).

``reduce="all_reduce"`` is the plain tensor-parallel baseline (Megatron-style: local
products in the dtype, the collective's all-reduce sum, no tree); it is for
benchmarks and negative controls, and its bits depend on the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops.batch_invariant import get_tp_tree, is_batch_invariant_mode_enabled
from ..ops.matmul import check_tp_tree, tree_leaves, tree_partials, tree_sum
from .comm import all_gather_stack, all_reduce_sum, tree_reduce_scatter_gather, world_and_rank

REDUCES = ("tree", "all_reduce")
COLLECTIVES = ("auto", "all_gather", "reduce_scatter")
#: ``collective="auto"``: results of fewer bytes than this (float32) take the all-gather
#: (one collective: latency-bound decode steps), larger ones the tree reduce-scatter
#: (1.5x a bf16 all-reduce's bytes at any TP size).  Launch-only: both give the same bits.
AUTO_REDUCE_SCATTER_BYTES = 1 << 20


@dataclass(frozen=True)
class TPConfig:
    """How a parallel layer reduces: its process group, world size and rank, the K tree's
    leaf count S (None for the plain baseline), ``reduce`` ("tree" or "all_reduce") and
    the tree's ``collective`` ("all_gather" of the float32 subtree roots, the tree
    "reduce_scatter" + all-gather of rounded chunks, or "auto": by size; same bits)."""

    group: Optional[object]
    world: int
    rank: int
    tp_tree: Optional[int]
    reduce: str = "tree"
    collective: str = "auto"

    @staticmethod
    def make(group=None, tp_tree: Optional[int] = None, reduce: str = "tree",
             collective: str = "auto") -> "TPConfig":
        if reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        if collective not in COLLECTIVES:
            raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
        world, rank = world_and_rank(group)
        if reduce == "tree":
            if tp_tree is None:
                raise ValueError("reduce='tree' needs tp_tree=S, a power of two >= the TP size")
            check_tp_tree(tp_tree)
            if tp_tree % world:
                raise ValueError(f"tp_tree={tp_tree} must be a multiple of the TP size {world} "
                                 f"(both powers of two): each rank holds tp_tree/{world} leaves")
        elif tp_tree is not None:
            raise ValueError("reduce='all_reduce' is the plain baseline: leave tp_tree None")
        return TPConfig(group, world, rank, tp_tree, reduce, collective)


def sharded_k_mm(a: torch.Tensor, b: torch.Tensor, cfg: TPConfig) -> torch.Tensor:
    """``sum over ranks of a_r @ b_r`` for this rank's K shard a [M, K/t], b [K/t, N],
    in a's dtype, on every rank.  Tree: bitwise ``ops.tree_mm`` of the whole K."""
    if cfg.reduce == "all_reduce":
        return all_reduce_sum(ops.mm(a, b), cfg.group)
    if cfg.world == 1:
        return ops.mm(a, b, tp_tree=cfg.tp_tree)
    leaves = tree_leaves(a.shape[1], cfg.tp_tree // cfg.world)
    root = tree_sum(tree_partials(a, b, leaves))              # this rank's subtree, float32
    collective = cfg.collective
    if collective == "auto":
        collective = "all_gather" if root.numel() * 4 < AUTO_REDUCE_SCATTER_BYTES else "reduce_scatter"
    if collective == "all_gather":
        return tree_sum(all_gather_stack(root, cfg.group)).to(a.dtype)   # the top of the tree
    return tree_reduce_scatter_gather(root, cfg.group, a.dtype)


def _check_mode(cfg: TPConfig) -> None:
    if cfg.reduce != "tree":
        return
    if not is_batch_invariant_mode_enabled() or get_tp_tree() != cfg.tp_tree:
        raise RuntimeError(
            f"a tensor-parallel layer with tp_tree={cfg.tp_tree} must run under "
            f"bitstable.set_batch_invariant_mode(tp_tree={cfg.tp_tree}) (the mode active here has "
            f"tp_tree={get_tp_tree()}, enabled={is_batch_invariant_mode_enabled()}): the replicated "
            f"layers must reduce in the same tree as the one-process model")


def _mm(a, b, cfg: TPConfig):
    """A product whose K is whole on this rank: the one-process op (tree or not)."""
    return ops.mm(a, b, tp_tree=cfg.tp_tree)


def _bias_grad(gy2, bias):
    return gy2.sum_to_size(bias.shape) if bias is not None else None


def _linear_forward(ctx, x, weight, bias, cfg: TPConfig, product):
    """``x @ weight^T (+ bias)`` through ``product`` (the plain or the sharded-K product),
    the bias added after the rounded product, as ops.addmm does; saves for the backward."""
    x2 = x.reshape(-1, x.shape[-1])
    y = product(x2, weight.t(), cfg)
    if bias is not None:
        y = y + bias
    ctx.save_for_backward(x2, weight, bias)
    ctx.cfg, ctx.x_shape = cfg, x.shape
    return y.view(*x.shape[:-1], weight.shape[0])


def _linear_backward(ctx, gy, input_product, input_grad_always: bool):
    """(gx, gw, gb, None): gx through ``input_product`` (computed on every rank when
    ``input_grad_always``: a sharded product's collectives must match across ranks),
    gw and gb through the plain product and the bias reduction."""
    x2, weight, bias = ctx.saved_tensors
    cfg = ctx.cfg
    need = ctx.needs_input_grad
    gy2 = gy.reshape(-1, gy.shape[-1])
    gx = input_product(gy2, weight, cfg).view(ctx.x_shape) if need[0] or input_grad_always else None
    gw = _mm(gy2.t(), x2, cfg) if need[1] else None
    gb = _bias_grad(gy2, bias) if need[2] else None
    return (gx if need[0] else None), gw, gb, None


class _ColumnParallel(torch.autograd.Function):
    """Output features sharded: the forward is a plain product; the input gradient reduces
    over the sharded output dim (the leaf tree + gather), on every rank."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg: TPConfig):
        return _linear_forward(ctx, x, weight, bias, cfg, _mm)

    @staticmethod
    def backward(ctx, gy):
        return _linear_backward(ctx, gy, sharded_k_mm, input_grad_always=True)


class _RowParallel(torch.autograd.Function):
    """Input features sharded: the forward reduces over the sharded K (the leaf tree);
    the gradients are plain products."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg: TPConfig):
        return _linear_forward(ctx, x, weight, bias, cfg, sharded_k_mm)

    @staticmethod
    def backward(ctx, gy):
        return _linear_backward(ctx, gy, _mm, input_grad_always=False)


class _ParallelLinear(nn.Module):
    #: which dim of the full weight [out, in] is sharded: 0 (column-parallel) or 1 (row-parallel)
    shard_dim = 0

    def __init__(self, linear: nn.Linear, cfg: TPConfig):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        full = linear.weight.shape[self.shard_dim]
        if full % cfg.world:
            raise ValueError(f"{type(self).__name__}: dim {self.shard_dim} of the weight "
                             f"{tuple(linear.weight.shape)} is not divisible by the TP size {cfg.world}")
        n = full // cfg.world
        self.cfg = cfg
        #: this rank's slice of the full weight's ``shard_dim``
        self.shard = slice(cfg.rank * n, (cfg.rank + 1) * n)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        w = w[self.shard] if self.shard_dim == 0 else w[:, self.shard]
        self.weight = nn.Parameter(w.clone(), requires_grad=linear.weight.requires_grad)
        b = linear.bias
        if b is None:
            self.bias = None
        else:
            b = b.detach()[self.shard] if self.shard_dim == 0 else b.detach()   # row: replicated
            self.bias = nn.Parameter(b.clone(), requires_grad=linear.bias.requires_grad)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"shard_dim={self.shard_dim}, shard={self.shard.start}:{self.shard.stop}, "
                f"tp_tree={self.cfg.tp_tree}, reduce={self.cfg.reduce}")


class ColumnParallelLinear(_ParallelLinear):
    """``nn.Linear`` with its output features sharded: rank r holds rows ``shard`` of the
    weight (and bias) and returns those output features.  The input is replicated; its
    gradient is reduced over the ranks through the K tree (or all-reduced: baseline)."""

    shard_dim = 0

    def forward(self, x):
        _check_mode(self.cfg)
        return _ColumnParallel.apply(x, self.weight, self.bias, self.cfg)


class RowParallelLinear(_ParallelLinear):
    """``nn.Linear`` with its input features sharded: rank r holds columns ``shard`` of the
    weight, takes its input shard and returns the full, replicated output, reduced over
    the ranks through the K tree (or all-reduced: baseline).  The bias is replicated and
    added after the reduction."""

    shard_dim = 1

    def forward(self, x):
        _check_mode(self.cfg)
        return _RowParallel.apply(x, self.weight, self.bias, self.cfg)
