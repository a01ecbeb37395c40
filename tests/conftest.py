"""Test setup: kernels run on CUDA when there is a GPU, else through Triton's interpreter.

``import bitstable`` sets TRITON_INTERPRET=1 before triton loads when no GPU is
present, so the same tests run on any machine.  Tests marked ``gpu`` need CUDA
and are skipped without it.  Every test runs with output poisoning on: output
buffers are NaN-filled before kernels write them.
"""

import os

import pytest
import torch

import bitstable  # noqa: F401  (must come before triton)
from bitstable._backend import interpreting, kernel_device_type
from bitstable.testing import poison_outputs

if interpreting():
    # The CPU suite runs one pytest-xdist worker per core: one intra-op thread each (torch's
    # and, through the environment, the processes the tests spawn), so that the workers do
    # not oversubscribe the cores (the KV-cache files ran 12% faster on 2 cores).  Thread
    # counts change no result a test compares: each comparison is within one process.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


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
