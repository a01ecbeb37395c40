"""A stand-in ``flash_attn`` package that maps flash-attn's public names to bitstable.

Not part of the library: it exists so that flash-attn's own test file
(``tests/test_flash_attn.py``, unmodified) can run against bitstable through
``scripts/run_flash_attn_upstream.py``, which puts ``scripts/flash_attn_shim`` first
on ``PYTHONPATH``.  Every function here is bitstable's own, re-exported as is: the
shim adapts no argument, so a keyword bitstable lacks fails the way it would for a
user who switched the import.

Module paths provided (the ones the test file imports at the pinned commit):
``flash_attn``, ``flash_attn.flash_attn_interface``, ``flash_attn.bert_padding``,
``flash_attn.layers.rotary``.  The helpers that are not attention (``pad_input``,
``unpad_input``, ``apply_rotary_emb``) are written here from flash-attn's documented
semantics; none of flash-attn's code is copied.
"""

from bitstable.flash_attn import (flash_attn_func, flash_attn_kvpacked_func,  # noqa: F401
                                  flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                  flash_attn_varlen_kvpacked_func,
                                  flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)

#: The flash-attn commit whose test file, interface and helpers this shim was written
#: against (Dao-AILab/flash-attention; tests/test_flash_attn.py is blob UPSTREAM_TEST_BLOB).
UPSTREAM_COMMIT = "0251105a2fb19d2957484b7f023cd8c115286ced"
#: ``git hash-object`` of tests/test_flash_attn.py at UPSTREAM_COMMIT: the runner checks the
#: file it is given against it, so a run says whether the test file was the unmodified one.
UPSTREAM_TEST_BLOB = "a728e1192bd4aafcee21ec06d2d4bb4004d2e7b5"
#: flash-attn's version at that commit, with a local tag saying what this really is.
__version__ = "2.8.4+bitstable.shim"

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
