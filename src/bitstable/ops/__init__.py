"""Batch-invariant PyTorch ops as plain functions: a row's result never depends on
how many rows are computed with it (see ``bitstable.set_batch_invariant_mode``)."""

from .matmul import addmm, bmm, matmul, mm, tree_leaves, tree_mm, tree_partials, tree_sum
from .norms import layer_norm, rms_norm
from .reductions import log_softmax, mean, softmax, sum

__all__ = ["mm", "matmul", "bmm", "addmm", "softmax", "log_softmax", "sum", "mean",
           "layer_norm", "rms_norm", "tree_leaves", "tree_mm", "tree_partials", "tree_sum"]
