"""Test setup: kernels run on CUDA when there is a GPU, else through Triton's interpreter.

``import bitstable`` sets TRITON_INTERPRET=1 before triton loads when no GPU is
present, so the same tests run on any machine.  Tests marked ``gpu`` need CUDA
and are skipped without it.  Every test runs with output poisoning on: output
buffers are NaN-filled before kernels write them.
"""

import pytest
import torch

import bitstable  # noqa: F401  (must come before triton)
from bitstable._backend import interpreting, kernel_device_type
from bitstable.testing import poison_outputs


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not interpreting():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on the device: scripts/gpu_run.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison():
    with poison_outputs():
        yield


@pytest.fixture
def device():
    return kernel_device_type()
