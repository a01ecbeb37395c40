"""Invariance harness shared by the test suite and ``bitstable verify``.

Each check takes an attention callable ``attn(q, k, v, **kw) -> out`` (bitstable
or stock PyTorch) and compares outputs **bitwise** (``torch.equal``), never
with a tolerance.  A check returns a :class:`CheckResult`; it never raises on
a violation, so ``verify`` can show stock PyTorch failing next to bitstable.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from . import _poison


@dataclass
class CheckResult:
    """Outcome of one contract check."""

    name: str
    passed: bool
    detail: str = ""
    cases: int = 0


@dataclass
class Shape:
    """Sizes one check runs at: batch, q heads, kv heads, seqlen q/k, head dim."""

    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 2
    seqlen_q: int = 48
    seqlen_k: int = 48
    head_dim: int = 32


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """NaN-fill every output buffer before kernels write it, for the duration."""
    previous = _poison.set_enabled(enabled)
    try:
        yield
    finally:
        _poison.set_enabled(previous)


def random_qkv(shape: Shape, dtype, device, generator: torch.Generator, batch: Optional[int] = None):
    """Fresh random q, k, v (never zeros: zeros hide unwritten outputs)."""
    b = shape.batch if batch is None else batch

    def r(*s):
        return torch.randn(*s, generator=generator, dtype=torch.float32, device="cpu").to(dtype).to(device)

    q = r(b, shape.seqlen_q, shape.heads_q, shape.head_dim)
    k = r(b, shape.seqlen_k, shape.heads_kv, shape.head_dim)
    v = r(b, shape.seqlen_k, shape.heads_kv, shape.head_dim)
    return q, k, v


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes differ {tuple(a.shape)} vs {tuple(b.shape)}"
    d = (a.double() - b.double()).abs()
    d = torch.nan_to_num(d, nan=float("inf"))
    n = int((a != b).sum()) if not (a.isnan().any() or b.isnan().any()) else -1
    return f"{n if n >= 0 else 'some'} elements differ, max |diff| {d.max().item():.3g}"


def check_run_to_run(attn: Callable, shape: Shape, dtype, device, runs: int = 3, seed: int = 0,
                     **kw) -> CheckResult:
    """The same inputs give the same bits on every call."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(shape, dtype, device, g)
    first = attn(q, k, v, **kw)
    distinct = 1
    seen: List[torch.Tensor] = [first]
    for _ in range(runs - 1):
        out = attn(q, k, v, **kw)
        if not any(torch.equal(out, s) for s in seen):
            seen.append(out)
            distinct += 1
    ok = distinct == 1
    return CheckResult("run-to-run", ok, f"{distinct} distinct output(s) in {runs} runs", runs)


def check_batch_invariance(attn: Callable, shape: Shape, dtype, device,
                           batch_sizes: Sequence[int] = (2, 3, 8), seed: int = 1, **kw) -> CheckResult:
    """Each sequence alone equals the same sequence inside a batch, at every position.

    For a batch of size ``bs``, ``bs`` random sequences are each run alone and
    then together; position ``i`` holds sequence ``i`` among ``bs - 1`` others,
    so every position of every batch size is checked.  ``alibi_slopes`` of
    shape (batch, heads) are not supported here (pass (heads,)).
    """
    g = torch.Generator().manual_seed(seed)
    cases, bad = 0, []
    for bs in batch_sizes:
        q, k, v = random_qkv(shape, dtype, device, g, batch=bs)
        together = attn(q, k, v, **kw)
        for pos in range(bs):
            alone = attn(q[pos:pos + 1], k[pos:pos + 1], v[pos:pos + 1], **kw)
            cases += 1
            if not torch.equal(together[pos:pos + 1], alone):
                bad.append(f"batch {bs} pos {pos}: {_first_diff(together[pos:pos + 1], alone)}")
    ok = not bad
    return CheckResult("batch invariance", ok,
                       f"{cases} placements equal" if ok else "; ".join(bad[:3]), cases)


def check_chunk_invariance(attn: Callable, shape: Shape, dtype, device,
                           chunk_sizes: Sequence[int] = (1, 5, 17), seed: int = 2, **kw) -> CheckResult:
    """The last ``c`` queries alone equal the last ``c`` rows of the full causal forward."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(shape, dtype, device, g)
    kw = dict(kw, causal=True)
    full = attn(q, k, v, **kw)
    bad = []
    for c in chunk_sizes:
        c = min(c, shape.seqlen_q)
        part = attn(q[:, -c:].contiguous(), k, v, **kw)
        if not torch.equal(part, full[:, -c:]):
            bad.append(f"chunk {c}: {_first_diff(part, full[:, -c:])}")
    ok = not bad
    return CheckResult("chunk invariance (causal)", ok,
                       f"{len(chunk_sizes)} chunk sizes equal" if ok else "; ".join(bad), len(chunk_sizes))


def check_layout_invariance(attn: Callable, shape: Shape, dtype, device, seed: int = 3,
                            **kw) -> CheckResult:
    """Contiguous inputs, head-major (transposed) views, sliced views and expanded
    GQA heads all give the same bits."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(shape, dtype, device, g)
    ref = attn(q, k, v, **kw)
    variants = {
        "head-major views": tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)),
        "sliced from wider": tuple(torch.cat([t, t], dim=-1)[..., : t.shape[-1]] for t in (q, k, v)),
        "non-unit head-dim stride": tuple(
            torch.stack([t, t], dim=-1)[..., 0] for t in (q, k, v)),
    }
    if shape.heads_kv != shape.heads_q:
        grp = shape.heads_q // shape.heads_kv
        variants["GQA heads expanded"] = (q, k.repeat_interleave(grp, dim=2), v.repeat_interleave(grp, dim=2))
    bad = []
    for name, (a, b, c) in variants.items():
        out = attn(a, b, c, **kw)
        if not torch.equal(out, ref):
            bad.append(f"{name}: {_first_diff(out, ref)}")
    ok = not bad
    return CheckResult("layout invariance", ok,
                       f"{len(variants)} layouts equal" if ok else "; ".join(bad), len(variants))


def _grads(attn: Callable, q, k, v, dout, **kw):
    """(dq, dk, dv) of ``sum(attn(q, k, v) * dout)``."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = attn(q, k, v, **kw)
    return torch.autograd.grad(out, (q, k, v), dout)


def check_backward_run_to_run(attn: Callable, shape: Shape, dtype, device, runs: int = 3, seed: int = 4,
                              **kw) -> CheckResult:
    """The same inputs and output gradient give the same (dq, dk, dv) bits every time."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(shape, dtype, device, g)
    dout = torch.randn(q.shape, generator=g).to(dtype).to(device)
    seen = [_grads(attn, q, k, v, dout, **kw)]
    for _ in range(runs - 1):
        grads = _grads(attn, q, k, v, dout, **kw)
        if not any(all(torch.equal(a, b) for a, b in zip(grads, s)) for s in seen):
            seen.append(grads)
    ok = len(seen) == 1
    return CheckResult("backward run-to-run", ok, f"{len(seen)} distinct (dq, dk, dv) in {runs} runs", runs)


def check_backward_batch_invariance(attn: Callable, shape: Shape, dtype, device,
                                    batch_sizes: Sequence[int] = (2, 3, 8), seed: int = 5,
                                    **kw) -> CheckResult:
    """A sequence's own dq, dk, dv are the same alone and at every position of a batch."""
    g = torch.Generator().manual_seed(seed)
    cases, bad = 0, []
    for bs in batch_sizes:
        q, k, v = random_qkv(shape, dtype, device, g, batch=bs)
        dout = torch.randn(q.shape, generator=g).to(dtype).to(device)
        together = _grads(attn, q, k, v, dout, **kw)
        for pos in range(bs):
            sl = slice(pos, pos + 1)
            alone = _grads(attn, q[sl], k[sl], v[sl], dout[sl], **kw)
            cases += 1
            for name, a, t in zip(("dq", "dk", "dv"), alone, together):
                if not torch.equal(t[sl], a):
                    bad.append(f"batch {bs} pos {pos} {name}: {_first_diff(t[sl], a)}")
    ok = not bad
    return CheckResult("backward batch invariance", ok,
                       f"{cases} placements equal" if ok else "; ".join(bad[:3]), cases)


def forward_checks(attn: Callable, shape: Shape, dtype, device, runs: int = 3,
                   batch_sizes: Sequence[int] = (2, 3, 8), chunk_sizes: Sequence[int] = (1, 5, 17),
                   **kw) -> List[CheckResult]:
    """Every forward contract check, in the order ``verify`` prints them."""
    return [
        check_run_to_run(attn, shape, dtype, device, runs=runs, **kw),
        check_batch_invariance(attn, shape, dtype, device, batch_sizes=batch_sizes, **kw),
        check_chunk_invariance(attn, shape, dtype, device, chunk_sizes=chunk_sizes, **kw),
        check_layout_invariance(attn, shape, dtype, device, **kw),
    ]


def backward_checks(attn: Callable, shape: Shape, dtype, device, runs: int = 3,
                    batch_sizes: Sequence[int] = (2, 3, 8), **kw) -> List[CheckResult]:
    """Every backward contract check, in the order ``verify`` prints them."""
    return [
        check_backward_run_to_run(attn, shape, dtype, device, runs=runs, **kw),
        check_backward_batch_invariance(attn, shape, dtype, device, batch_sizes=batch_sizes, **kw),
    ]


def check_decode_chunking(kvcache_fn: Callable, full_fn: Callable, shape: Shape, dtype, device,
                          chunk_sizes: Sequence[int] = (5, 1, 1, 17, 1), seed: int = 6,
                          **kw) -> CheckResult:
    """Training = prefill = decode: chunked prefill and single-token decode through a KV
    cache give the full causal forward's bits for every query."""
    g = torch.Generator().manual_seed(seed)
    one = Shape(1, shape.heads_q, shape.heads_kv, shape.seqlen_k, shape.seqlen_k, shape.head_dim)
    q, k, v = random_qkv(one, dtype, device, g)
    kw = dict(kw, causal=True)
    full = full_fn(q, k, v, **kw)
    L = shape.seqlen_k
    sizes = list(chunk_sizes)
    while sum(sizes) < L:
        sizes.append(min(L - sum(sizes), max(1, L // 4)))
    cache_k = torch.zeros(1, L, shape.heads_kv, shape.head_dim, dtype=dtype, device=device)
    cache_v = torch.zeros_like(cache_k)
    pos, bad = 0, []
    for c in sizes:
        c = min(c, L - pos)
        if c <= 0:
            break
        lens = torch.tensor([pos], dtype=torch.int32, device=device)
        out = kvcache_fn(q[:, pos:pos + c], cache_k, cache_v, k=k[:, pos:pos + c], v=v[:, pos:pos + c],
                         cache_seqlens=lens, **kw)
        if not torch.equal(out, full[:, pos:pos + c]):
            bad.append(f"tokens {pos}..{pos + c - 1}: {_first_diff(out, full[:, pos:pos + c])}")
        pos += c
    ok = not bad
    return CheckResult("prefill/decode = training", ok,
                       f"{len(sizes)} chunks equal" if ok else "; ".join(bad[:3]), len(sizes))


def check_decode_batch_invariance(kvcache_fn: Callable, shape: Shape, dtype, device,
                                  batch_sizes: Sequence[int] = (2, 8), seed: int = 7,
                                  **kw) -> CheckResult:
    """One decode step alone equals the same step inside batches of other requests with random
    cache lengths, at every position."""
    g = torch.Generator().manual_seed(seed)
    L, Hq, Hk, D = shape.seqlen_k, shape.heads_q, shape.heads_kv, shape.head_dim
    cases, bad = 0, []
    for bs in batch_sizes:
        lens = torch.randint(1, L, (bs,), generator=g).to(torch.int32).to(device)
        kc = torch.randn(bs, L, Hk, D, generator=g).to(dtype).to(device)
        vc = torch.randn(bs, L, Hk, D, generator=g).to(dtype).to(device)
        q = torch.randn(bs, 1, Hq, D, generator=g).to(dtype).to(device)
        together = kvcache_fn(q, kc, vc, cache_seqlens=lens, causal=True, **kw)
        for pos in range(bs):
            sl = slice(pos, pos + 1)
            alone = kvcache_fn(q[sl], kc[sl], vc[sl], cache_seqlens=lens[sl], causal=True, **kw)
            cases += 1
            if not torch.equal(together[sl], alone):
                bad.append(f"batch {bs} pos {pos}: {_first_diff(together[sl], alone)}")
    ok = not bad
    return CheckResult("decode batch invariance", ok,
                       f"{cases} placements equal" if ok else "; ".join(bad[:3]), cases)


def check_rows_batch_invariant(name: str, fn: Callable, x: torch.Tensor, row_counts: Sequence[int],
                               *args) -> CheckResult:
    """``fn(x[:m], *args) == fn(x, *args)[:m]`` bitwise for every m: a row's result does not
    depend on how many rows are computed with it (matmul, softmax, norms)."""
    full = fn(x, *args)
    bad = []
    for m in row_counts:
        if m <= x.shape[0] and not torch.equal(fn(x[:m], *args), full[:m]):
            diff = (fn(x[:m], *args).double() - full[:m].double()).abs().max().item()
            bad.append(f"m={m} (max diff {diff:.3g})")
    return CheckResult(name, not bad, "rows differ alone vs in the batch: " + ", ".join(bad) if bad else "",
                       cases=len(row_counts))


def ops_checks(device, on_gpu: bool, stock: bool) -> List[CheckResult]:
    """Batch invariance of matmul (bf16), softmax, log-softmax and RMS norm rows, for
    bitstable's ops or (``stock``) PyTorch's own kernels."""
    from . import ops

    g = torch.Generator(device="cpu").manual_seed(0)
    M, K, N, C = (2048, 4096, 4096, 32000) if on_gpu else (70, 48, 40, 300)
    rows = (1, 2, 3, 7, 16, 64, 100, 256, 1000) if on_gpu else (1, 2, 7, 33)
    a = torch.randn(M, K, generator=g).to(torch.bfloat16).to(device)
    b = torch.randn(N, K, generator=g).to(torch.bfloat16).to(device).t()
    x = torch.randn(M, C, generator=g).to(torch.bfloat16).to(device)
    w = torch.randn(C, generator=g).to(torch.bfloat16).to(device)
    if stock:
        mm, sm, lsm = torch.mm, torch.softmax, torch.log_softmax
        rms = lambda t, w_: torch.nn.functional.rms_norm(t, (t.shape[-1],), w_, 1e-6)  # noqa: E731
    else:
        mm, sm, lsm = ops.mm, ops.softmax, ops.log_softmax
        rms = lambda t, w_: ops.rms_norm(t, (t.shape[-1],), w_, 1e-6)  # noqa: E731
    return [check_rows_batch_invariant(f"matmul rows (bf16 {M}x{K}x{N})", mm, a, rows, b),
            check_rows_batch_invariant("softmax rows", sm, x, rows, -1),
            check_rows_batch_invariant("log_softmax rows", lsm, x, rows, -1),
            check_rows_batch_invariant("rms_norm rows", rms, x, rows, w)]
