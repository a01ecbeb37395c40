"""Tensor parallelism for Llama-style transformers models (LlamaForCausalLM and models
with the same module names: Mistral, Qwen2, ...).

``shard_llama(model, group, tp_tree=S)`` replaces, in place, each decoder layer's

- ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` and ``mlp.gate_proj`` / ``up_proj`` by
  :class:`ColumnParallelLinear` (output rows sharded: whole attention heads, whole
  key/value heads, a contiguous block of the MLP's intermediate features);
- ``self_attn.o_proj`` and ``mlp.down_proj`` by :class:`RowParallelLinear`.

transformers' attention reshapes the projections with ``view(..., -1, head_dim)`` and
keeps ``num_key_value_groups`` (query heads per key/value head), which sharding by
whole key/value groups leaves unchanged, so each rank attends over its own heads with
bitstable's kernels and no attention code changes.  Embeddings, norms, rotary
tables and ``lm_head`` stay replicated.  Run the sharded model under
``bitstable.set_batch_invariant_mode(tp_tree=S)``: its logits and gradients are then
bitwise those of the unsharded model under the same mode, at every TP size t that
divides S, the number of key/value heads and the MLP width.
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from .comm import world_and_rank
from .layers import ColumnParallelLinear, RowParallelLinear, TPConfig, _ParallelLinear

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


def _layers(model: nn.Module):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers (expected a Llama-style causal LM)")
    return layers


def shard_llama(model: nn.Module, group=None, *, tp_tree: Optional[int] = None,
                reduce: str = "tree", collective: str = "auto") -> nn.Module:
    """Shard ``model`` (every rank passes the same full model) over ``group`` (default:
    the default process group; none initialised: a group of one) in place and return it.

    ``tp_tree``: the K tree's leaf count S, a power of two that the TP size divides
    (the largest TP size the model will ever run at: 8 on one 8-GPU node).
    ``reduce="all_reduce"`` (with ``tp_tree=None``) builds the plain baseline instead.
    ``collective``: how the tree's top runs across ranks ("auto", "all_gather",
    "reduce_scatter"; ``TPConfig``), a speed choice that changes no bits.
    """
    world, rank = world_and_rank(group)
    cfg = TPConfig.make(group, tp_tree, reduce, collective)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % world or kv_heads % world:
        raise ValueError(f"num_attention_heads={heads} and num_key_value_heads={kv_heads} must both "
                         f"be divisible by the TP size {world} (heads are sharded by whole key/value groups)")
    if config.intermediate_size % world:
        raise ValueError(f"intermediate_size={config.intermediate_size} is not divisible by the TP size {world}")
    for layer in _layers(model):
        for names, cls in ((COLUMN, ColumnParallelLinear), (ROW, RowParallelLinear)):
            for name in names:
                parent_name, attr = name.split(".")
                parent = getattr(layer, parent_name)
                setattr(parent, attr, cls(getattr(parent, attr), cfg))
    model.tp_config = cfg
    return model


def shard_slices(model: nn.Module) -> Dict[str, tuple]:
    """``{parameter name: (dim, slice)}`` for every sharded parameter: the part of the
    unsharded model's parameter (and gradient) of the same name that this rank holds.
    Parameters not listed are replicated."""
    out = {}
    for mname, module in model.named_modules():
        if isinstance(module, _ParallelLinear):
            out[f"{mname}.weight"] = (module.shard_dim, module.shard)
            if module.bias is not None and module.shard_dim == 0:
                out[f"{mname}.bias"] = (0, module.shard)
    return out
