"""Tensor parallelism whose bits do not depend on the TP size (docs/TENSOR_PARALLEL.md).

- :func:`shard_llama`: column-/row-parallel Llama-style transformers models over a
  ``torch.distributed`` group (NCCL on GPUs, gloo on CPU);
- :class:`ColumnParallelLinear`, :class:`RowParallelLinear`: the layers, for other models;
- :func:`sharded_k_mm`: a product over a K sharded across the group, reduced as the K
  tree (subtree roots all-gathered in float32 and finished in the tree's order).

Run under ``bitstable.set_batch_invariant_mode(tp_tree=S)``: the unsharded model under
the same mode and every TP size t dividing S give the same logits and gradients.
"""

from .comm import all_gather_stack, tree_reduce_scatter_gather, world_and_rank
from .layers import ColumnParallelLinear, RowParallelLinear, TPConfig, sharded_k_mm
from .llama import shard_llama, shard_slices

__all__ = ["shard_llama", "shard_slices", "ColumnParallelLinear", "RowParallelLinear", "TPConfig",
           "sharded_k_mm", "all_gather_stack", "tree_reduce_scatter_gather", "world_and_rank"]
