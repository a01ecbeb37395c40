"""``flash_attn.flash_attn_interface`` for the upstream test file, mapped to bitstable.

The public functions are bitstable's.  Two names the test imports are flash-attn
internals, given stand-in values here:

* ``USE_TRITON_ROCM`` (flash-attn's ROCm switch): ``False``.
* ``_get_block_size_n(device, head_dim, is_dropout, is_causal)``: in flash-attn, the key
  block of its CUDA kernel, which the test uses only to read the S matrix that
  ``return_attn_probs=True`` returns under dropout (``normalize_flash_attn_S``: it
  rescales each key block of that matrix by ``exp(running max - lse)``).  bitstable's
  kernels visit keys in a different order, so no kernel block size reproduces that
  reading.  The stand-in returns one block spanning every key (``ONE_BLOCK``), with
  which the test reads the matrix as ``exp(scale * s - row max)`` with the row max over
  all keys (the dropped entries negated).  That is the format the test needs from
  bitstable's ``S_dmask``.  Set ``BITSTABLE_SHIM_BLOCK_SIZE_N`` to another value to
  read it per block.

Not provided, on purpose: ``flash_attn_gpu`` (flash-attn's compiled extension) and the
private ``_flash_attn_*_forward/backward`` entry points.  The two upstream tests that
import them test flash-attn's internals; the runner reports them as such.
"""

import os

from bitstable.flash_attn import (flash_attn_func, flash_attn_kvpacked_func,  # noqa: F401
                                  flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                  flash_attn_varlen_kvpacked_func,
                                  flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)

#: flash-attn internal (its ROCm backend switch).  bitstable has one code path.
USE_TRITON_ROCM = False

#: A block wider than any key sequence: the whole row is one block (see the module docstring).
ONE_BLOCK = 1 << 30


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """flash-attn internal stand-in: the key block the test reads ``S_dmask`` by."""
    if head_dim > 256:
        raise ValueError(f"head_dim must be <= 256, got {head_dim}")
    override = os.environ.get("BITSTABLE_SHIM_BLOCK_SIZE_N")
    return int(override) if override else ONE_BLOCK


__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache", "USE_TRITON_ROCM",
           "_get_block_size_n"]
