"""Where kernels run: a CUDA GPU, or Triton's interpreter on the CPU.

Importing this module before triton decides the mode: with no CUDA device and
``TRITON_INTERPRET`` unset, it sets ``TRITON_INTERPRET=1`` so that the same
kernels run (slowly) on CPU tensors.  The variable must be set before triton
is first imported, which is why ``bitstable/__init__.py`` imports this first.
"""

from __future__ import annotations

import os
import sys

import torch

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


#: Read once: triton reads the variable when it is first imported, so the mode is fixed
#: for the process from then on (and per-call reads of os.environ cost host time).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DEVICE_TYPE = "cpu" if _INTERPRETING else "cuda"


def interpreting() -> bool:
    """True when kernels run through Triton's interpreter on CPU tensors."""
    return _INTERPRETING


def kernel_device_type() -> str:
    """The tensor device type kernels accept: 'cpu' under the interpreter, else 'cuda'."""
    return _DEVICE_TYPE


_COMPUTE_DTYPES: dict = {}


_SM_COUNTS: dict = {}


def sm_count(device: torch.device) -> int:
    """The number of SMs of ``device`` (a persistent grid's size), read once per device;
    4 where kernels run through the interpreter (CPU tensors)."""
    n = _SM_COUNTS.get((device.type, device.index))
    if n is None:
        n = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        _SM_COUNTS[(device.type, device.index)] = n
    return n


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host ints (``triton.cdiv`` is a constexpr function in Triton 3.6
    and costs microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= ``n`` (0 for 0), as ``triton.next_power_of_2``, without
    its per-call wrapper."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


def compute_dtype(dtype: torch.dtype):
    """The triton dtype the kernels multiply tiles of ``dtype`` in.

    16-bit inputs multiply as themselves on a GPU (fp32 accumulate); float32 in IEEE fp32
    (never tf32).  Triton's interpreter computes bf16 ``tl.dot`` wrongly, so there bf16
    tiles are upcast to fp32 first.  (Triton is imported here lazily: this module must
    load before triton decides the interpreter mode.)
    """
    cd = _COMPUTE_DTYPES.get(dtype)
    if cd is None:
        import triton.language as tl

        table = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
        cd = tl.float32 if (dtype == torch.bfloat16 and _INTERPRETING) else table[dtype]
        _COMPUTE_DTYPES[dtype] = cd
    return cd


def describe() -> str:
    """One line naming where kernels run, for CLI output and result files."""
    import triton

    if interpreting():
        return f"Triton interpreter on CPU (torch {torch.__version__}, triton {triton.__version__})"
    name = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    return (f"{name} (sm_{cap[0]}{cap[1]}, torch {torch.__version__}, "
            f"triton {triton.__version__}, CUDA {torch.version.cuda})")
