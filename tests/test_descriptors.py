"""bitstable/_descriptors.py: a descriptor copied from a checked template equals the one the
class builds, pins no earlier tensor, and still refuses a misaligned base."""

import gc
import weakref

import pytest
import torch

from bitstable import _descriptors

TensorDescriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor


def test_a_copied_descriptor_equals_the_built_one_and_pins_no_tensor(monkeypatch):
    monkeypatch.setattr(_descriptors, "_TEMPLATES", {})
    first = torch.zeros(64, 128, dtype=torch.float16)
    built = _descriptors.descriptor(TensorDescriptor, first, first.shape, first.stride(), (16, 64))
    assert built == TensorDescriptor(first, [64, 128], [128, 1], [16, 64])
    second = torch.ones(64, 128, dtype=torch.float16)
    copied = _descriptors.descriptor(TensorDescriptor, second, second.shape, second.stride(), (16, 64))
    assert type(copied) is TensorDescriptor and copied.base is second
    fresh = TensorDescriptor(second, [64, 128], [128, 1], [16, 64])
    assert {k: v for k, v in vars(copied).items() if k != "base"} == \
        {k: v for k, v in vars(fresh).items() if k != "base"}
    dead = weakref.ref(first)
    del first, built
    gc.collect()
    assert dead() is None, "the template kept the first tensor alive"


def test_a_misaligned_base_and_a_bad_geometry_are_refused(monkeypatch):
    monkeypatch.setattr(_descriptors, "_TEMPLATES", {})
    t = torch.zeros(64 * 128 + 8, dtype=torch.float16)
    aligned = t[:64 * 128].view(64, 128)
    _descriptors.descriptor(TensorDescriptor, aligned, (64, 128), (128, 1), (16, 64))
    shifted = t[1:64 * 128 + 1].view(64, 128)
    assert shifted.data_ptr() % 16
    with pytest.raises(AssertionError, match="16-byte aligned"):
        _descriptors.descriptor(TensorDescriptor, shifted, (64, 128), (128, 1), (16, 64))
    with pytest.raises(AssertionError):     # the class's own check: 3 * 2 bytes is no 16-byte stride
        _descriptors.descriptor(TensorDescriptor, aligned, (64, 128), (3, 1), (16, 64))
