"""The collectives of the tensor-parallel path: an all-gather of float32 subtree roots
(the invariant path) and, for the plain baseline only, an all-reduce.

Both run on a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPU) and are
called by every rank of the group in the same order (the layers' forward and backward
run in the same order everywhere).  ``group=None`` with no process group initialised
is a group of one: nothing is sent.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def world_and_rank(group) -> tuple:
    """(size, rank) of ``group``; (1, 0) without torch.distributed initialised."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather_stack(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """[world, *x.shape]: every rank's ``x`` in rank order (the same tensor on every rank).

    No arithmetic: the finishing sum runs afterwards on each rank, in the tree's order
    (``bitstable.ops.tree_sum``), never inside the collective."""
    world, _ = world_and_rank(group)
    if world == 1:
        return x.unsqueeze(0)
    x = x.contiguous()
    out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
    if dist.get_backend(group) == "gloo":
        dist.all_gather(list(out.unbind(0)), x, group=group)
    else:
        dist.all_gather_into_tensor(out, x, group=group)
    return out


def all_reduce_sum(x: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """The plain tensor-parallel reduction (the baseline): the collective's own sum, whose
    order depends on the algorithm, the channel count and the world size."""
    world, _ = world_and_rank(group)
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x
