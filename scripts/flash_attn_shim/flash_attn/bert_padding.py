"""``flash_attn.bert_padding``: padded <-> packed (varlen) token layouts.

Written here from flash-attn's documented semantics (no code taken from it):

* ``unpad_input(hidden_states, attention_mask, unused_mask=None)`` returns the 5-tuple
  ``(packed, indices, cu_seqlens, max_seqlen_in_batch, seqused)``:
  ``packed`` (total, ...) holds the rows of ``hidden_states`` (batch, seqlen, ...) that
  ``attention_mask`` (or ``unused_mask``) selects, in batch-major order;
  ``indices`` (total,) int64 are their positions in the flattened (batch * seqlen)
  layout; ``cu_seqlens`` (batch + 1,) int32 the cumulative selected counts per sequence
  (those of ``attention_mask + unused_mask``); ``max_seqlen_in_batch`` a Python int;
  ``seqused`` (batch,) int32 the counts of ``attention_mask`` alone.
* ``pad_input(hidden_states, indices, batch, seqlen)`` scatters packed rows back into a
  zero-filled (batch, seqlen, ...) tensor.

Both are differentiable (gradients gather/scatter back through ``indices``).
"""

import torch
import torch.nn.functional as F


def index_first_axis(x, indices):
    """Rows ``indices`` of ``x`` along dim 0 (differentiable)."""
    return x.index_select(0, indices)


def index_put_first_axis(values, indices, first_axis_dim):
    """A zero tensor of ``first_axis_dim`` rows with ``values`` at rows ``indices``."""
    out = values.new_zeros((first_axis_dim,) + tuple(values.shape[1:]))
    return out.index_put((indices,), values)


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    if hidden_states.dim() < 2:
        raise ValueError("hidden_states must be (batch, seqlen, ...)")
    if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"attention_mask must have shape {tuple(hidden_states.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")
    used = attention_mask.to(torch.int32)
    selected = used + unused_mask.to(torch.int32) if unused_mask is not None else used
    seqlens = selected.sum(dim=-1, dtype=torch.int32)
    seqused = used.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(selected.flatten() != 0, as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape((-1,) + tuple(hidden_states.shape[2:]))
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states, indices, batch, seqlen):
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.reshape((batch, seqlen) + tuple(hidden_states.shape[1:]))


__all__ = ["unpad_input", "pad_input", "index_first_axis", "index_put_first_axis"]
