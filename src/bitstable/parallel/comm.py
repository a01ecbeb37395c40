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


def _bit_reverse(r: int, bits: int) -> int:
    out = 0
    for _ in range(bits):
        out, r = (out << 1) | (r & 1), r >> 1
    return out


def tree_reduce_scatter_gather(root: torch.Tensor, group: Optional[object], out_dtype: torch.dtype) -> torch.Tensor:
    """The top of the K tree over the ranks' float32 subtree ``root``s, rounded to
    ``out_dtype``, on every rank: bitwise ``tree_sum(all_gather_stack(root)).to(out_dtype)``
    with less traffic.

    A reduce-scatter in float32 whose step j pairs rank r with r ^ 2^j (the tree's own
    pairing: step j adds the roots of aligned groups of 2^j ranks, each element once, on
    the rank that keeps it), then an all-gather of the rounded chunks.  Bytes sent per
    rank: 4n(t-1)/t + b*n(t-1)/t for n elements (b: out_dtype's size), against (t-1)*4n
    for the all-gather of roots.  The world size must be a power of two."""
    world, rank = world_and_rank(group)
    if world == 1:
        return root.to(out_dtype)
    bits = world.bit_length() - 1
    if 1 << bits != world:
        raise ValueError(f"the tree reduce-scatter needs a power-of-two group, got {world} ranks")
    flat = root.reshape(-1)
    n = flat.numel()
    chunk = -(-n // world)
    buf = torch.zeros(chunk * world, dtype=torch.float32, device=root.device)
    buf[:n] = flat
    lo, size = 0, chunk * world
    for j in range(bits):
        partner = rank ^ (1 << j)
        half = size // 2
        keep_first = (rank >> j) & 1 == 0
        keep = buf[lo:lo + half] if keep_first else buf[lo + half:lo + size]
        send = buf[lo + half:lo + size] if keep_first else buf[lo:lo + half]
        recv = torch.empty_like(keep)
        peer = dist.get_global_rank(group, partner) if group is not None else partner
        # one batch (an NCCL group call): both peers send and receive without ordering deadlock
        for q in dist.batch_isend_irecv([dist.P2POp(dist.isend, send.contiguous(), peer, group),
                                         dist.P2POp(dist.irecv, recv, peer, group)]):
            q.wait()
        keep += recv                      # node = left + right (IEEE addition commutes)
        lo, size = (lo if keep_first else lo + half), half
    mine = buf[lo:lo + size].to(out_dtype)       # chunk _bit_reverse(rank) of the result
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    out = torch.empty(chunk * world, dtype=out_dtype, device=root.device)
    for r, part in enumerate(parts):
        c = _bit_reverse(r, bits)
        out[c * chunk:(c + 1) * chunk] = part
    return out[:n].view(root.shape)
