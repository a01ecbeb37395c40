"""The dropout keep test's inline PTX (kernels/dropout.py), run through a small emulator of
the PTX it uses, against the plain path it replaces (``tl.where(draw >= threshold, x, 0)``).

The interpreter never runs inline assembly, so the CPU suite checks the assembly text
itself: every draw byte against every threshold, in every byte position, with values that
round (bf16, fp16) and special values (negative zero, inf, NaN).  The GPU tests in
test_dropout.py check the kernels that use it against the torch spec.
"""

import re

import numpy as np
import pytest
import torch

from bitstable.kernels import dropout as kd

U32 = np.uint32


def _prmt(a, b, sel):
    """``prmt.b32`` in its default mode: selector nibble i picks result byte i from the
    bytes of {b, a} (a: 0-3, b: 4-7); bit 3 of the nibble replicates that byte's sign."""
    out = np.zeros_like(a)
    for i in range(4):
        n = (sel >> (4 * i)) & 0xF
        src = a if (n & 7) < 4 else b
        byte = (src >> U32(8 * (n & 3))) & U32(0xFF)
        if n & 8:
            byte = np.where(byte & U32(0x80), U32(0xFF), U32(0))
        out |= byte << U32(8 * i)
    return out


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for bit in range(8):          # truth-table index: a * 4 + b * 2 + c
        if (lut >> bit) & 1:
            ta = a if bit & 4 else ~a
            tb = b if bit & 2 else ~b
            tc = c if bit & 1 else ~c
            out |= ta & tb & tc
    return out


def _cvt_x2(hi, lo, dtype):
    """``cvt.rn.{bf16x2,f16x2}.f32 d, hi, lo``: hi's rounding in the upper half."""
    def half(x):
        f = torch.from_numpy(x.view(np.float32).copy()).to(dtype)
        return f.view(torch.int16).numpy().astype(np.uint16).astype(U32)
    return (half(hi) << U32(16)) | half(lo)


def run_ptx(asm: str, operands: dict) -> dict:
    """Run ``asm`` (the subset of PTX that kernels/dropout.py writes) over numpy uint32 arrays:
    ``operands`` maps "$N" to arrays; returns every register written."""
    regs = dict(operands)

    def val(tok):
        tok = tok.strip()
        return U32(int(tok, 0)) if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", tok) else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        dst, src = args[0], [val(a) for a in args[1:]]
        if op == "or.b32":
            regs[dst] = src[0] | src[1]
        elif op == "and.b32":
            regs[dst] = src[0] & src[1]
        elif op == "sub.u32":
            regs[dst] = src[0] - src[1]
        elif op == "lop3.b32":
            regs[dst] = _lop3(src[0], src[1], src[2], int(src[3]))
        elif op == "prmt.b32":
            regs[dst] = _prmt(src[0], src[1] + np.zeros_like(src[0]), int(src[2]))
        elif op == "cvt.rn.bf16x2.f32":
            regs[dst] = _cvt_x2(src[0], src[1], torch.bfloat16)
        elif op == "cvt.rn.f16x2.f32":
            regs[dst] = _cvt_x2(src[0], src[1], torch.float16)
        else:
            raise AssertionError(f"the emulator does not know {op!r}")
    return regs


def _draws_and_thresholds():
    """Every (draw, threshold) pair, each draw in each of the four byte positions, the other
    bytes random: draws [n, 4] uint8, thresholds [n]."""
    g = np.random.default_rng(0)
    x, t = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    x, t = x.ravel(), t.ravel()
    n = x.size
    draws = g.integers(0, 256, size=(4 * n, 4))
    for j in range(4):
        draws[j * n:(j + 1) * n, j] = x
    return draws.astype(np.uint8), np.tile(t, 4).astype(U32)


def _values(n):
    g = np.random.default_rng(1)
    v = g.standard_normal((n, 4)).astype(np.float32) * 3
    v[::7, 0] = -0.0
    v[::11, 1] = np.inf
    v[::13, 2] = np.nan
    v[::17, 3] = 1.00390625 + 2.0 ** -12          # rounds (bf16: tie region)
    return v


def _operands(values, draws, t, first):
    """The asm's operand map: values at $first.., then the draw word, 4 x threshold, 4 x t & 0x7f."""
    ops = {f"${first + j}": values[:, j].copy().view(U32) for j in range(4)}
    word = draws.astype(U32) @ (U32(1) << (U32(8) * np.arange(4, dtype=U32)))
    ops[f"${first + 4}"] = word.astype(U32)
    tw = t * U32(0x01010101)
    for j in range(4):
        ops[f"${first + 5 + j}"] = tw
        ops[f"${first + 9 + j}"] = tw & U32(0x7F7F7F7F)
    return ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_weights_asm_equals_where_then_round(dtype):
    draws, t = _draws_and_thresholds()
    values = _values(len(t))
    asm = (kd._WEIGHTS_BF16 if dtype == torch.bfloat16 else kd._WEIGHTS_F16).value
    assert kd._WEIGHTS_CONSTRAINTS.value.count("=r") == 2 and kd._WEIGHTS_CONSTRAINTS.value.count(",") == 14
    regs = run_ptx(asm, _operands(values, draws, t, 2))
    got = np.stack([regs["$0"] & U32(0xFFFF), regs["$0"] >> U32(16),
                    regs["$1"] & U32(0xFFFF), regs["$1"] >> U32(16)], 1).astype(np.uint16)
    keep = torch.from_numpy(draws.astype(np.int64) >= t[:, None].astype(np.int64))
    want = torch.where(keep, torch.from_numpy(values), 0.0).to(dtype).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got, want)
