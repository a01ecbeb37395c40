"""``bitstable verify``: prove the invariance contract on this machine, next to stock PyTorch.

Runs every contract check of :mod:`bitstable.testing` (or the subset named by
``checks``: ``--checks`` on the command line) for bitstable and for stock PyTorch
(``scaled_dot_product_attention`` with its default backend choice) on the same
inputs, prints a table of which hold, optionally writes JSON, and exits non-zero
if any *bitstable* check fails.  Stock PyTorch is expected to fail some checks;
that is shown, not counted as an error.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import List

import torch

from .. import _backend
from ..attention import flash_attn_func, flash_attn_with_kvcache
from ..mode import set_deterministic
from ..testing import (CheckResult, Shape, check_backward_batch_invariance, check_backward_run_to_run,
                      check_batch_invariance, check_chunk_invariance, check_decode_batch_invariance,
                      check_decode_chunking, check_layout_invariance, check_run_to_run, ops_checks,
                      poison_outputs)

#: The checks ``checks`` (``--checks``) can name, in the order the table shows them: per
#: attention scenario the forward and backward checks, then the KV-cache decode checks,
#: then the batch-invariant ops' rows.
CHECKS = ("run-to-run", "batch", "chunk", "layout", "backward-run-to-run", "backward-batch",
          "decode", "decode-batch", "ops")
_ATTENTION = CHECKS[:6]


def _stock(q, k, v, *args, **kw):
    with set_deterministic(False):
        return flash_attn_func(q, k, v, *args, **kw)


def _stock_kvcache_call(*args, **kw):
    with set_deterministic(False):
        return flash_attn_with_kvcache(*args, **kw)


#: The dropout scenario's probability and generator seed (set before every call, so each
#: call draws the same stream key).
DROPOUT_P, DROPOUT_SEED = 0.1, 1234


def content_keys(q: torch.Tensor) -> torch.Tensor:
    """int64 [B]: a key per sequence from its queries' bits (an exact integer sum, so the
    same sequence gets the same key alone or in any batch)."""
    B = q.shape[0]
    bits = q.detach().contiguous().view(torch.int16 if q.element_size() == 2 else torch.int32)
    return bits.reshape(B, -1).long().sum(1)


def with_dropout(fn):
    """``fn`` with dropout: ``torch.manual_seed(DROPOUT_SEED)`` before each call and
    ``dropout_seeds`` from :func:`content_keys`, so a sequence's mask is its own: what batch
    invariance under dropout asks of the caller (README, Dropout)."""
    @functools.wraps(fn)
    def call(q, k, v, **kw):
        torch.manual_seed(DROPOUT_SEED)
        return fn(q, k, v, DROPOUT_P, dropout_seeds=content_keys(q), **kw)
    return call


def _attention_checks(fn, shape, dtype, device, runs, batch_sizes, chunk_sizes, selected,
                      **kw) -> List[CheckResult]:
    """The selected forward and backward checks of one scenario (all of them: what
    :func:`~bitstable.testing.forward_checks` and ``backward_checks`` run)."""
    table = {
        "run-to-run": lambda: check_run_to_run(fn, shape, dtype, device, runs=runs, **kw),
        "batch": lambda: check_batch_invariance(fn, shape, dtype, device, batch_sizes=batch_sizes, **kw),
        "chunk": lambda: check_chunk_invariance(fn, shape, dtype, device, chunk_sizes=chunk_sizes, **kw),
        "layout": lambda: check_layout_invariance(fn, shape, dtype, device, **kw),
        "backward-run-to-run": lambda: check_backward_run_to_run(fn, shape, dtype, device, runs=runs, **kw),
        "backward-batch": lambda: check_backward_batch_invariance(fn, shape, dtype, device,
                                                                  batch_sizes=batch_sizes, **kw),
    }
    return [run() for name, run in table.items() if name in selected]


def _decode_checks(kvcache_fn, full_fn, on_gpu: bool, device, selected=CHECKS) -> List[CheckResult]:
    if on_gpu:
        shape = Shape(batch=1, heads_q=32, heads_kv=8, seqlen_q=1, seqlen_k=8192, head_dim=128)
        chunks, batches = (1000, 1, 1, 3000, 1, 64), (2, 8, 64)
    else:
        shape = Shape(batch=1, heads_q=4, heads_kv=2, seqlen_q=1, seqlen_k=50, head_dim=32)
        chunks, batches = (5, 1, 1, 17, 1), (2, 3)
    dtype = torch.bfloat16
    out = []
    if "decode" in selected:
        out.append(check_decode_chunking(kvcache_fn, full_fn, shape, dtype, device, chunk_sizes=chunks))
    if "decode-batch" in selected:
        out.append(check_decode_batch_invariance(kvcache_fn, shape, dtype, device, batch_sizes=batches))
    return out


def _scenarios(on_gpu: bool):
    """(name, dtype, shape, kwargs, batch sizes, chunk sizes, runs) per table section.
    ``dropout=True`` in kwargs: the calls go through :func:`with_dropout`, and the chunk
    check is left out (a dropout mask is keyed by positions inside the call, so a query
    chunk is another call: chunking invariance is not promised under dropout)."""
    if on_gpu:
        big = Shape(batch=4, heads_q=16, heads_kv=4, seqlen_q=2048, seqlen_k=2048, head_dim=128)
        mid = Shape(batch=2, heads_q=8, heads_kv=8, seqlen_q=1000, seqlen_k=3000, head_dim=64)
        return [
            ("bf16 causal GQA d128", torch.bfloat16, big, dict(causal=True), (2, 3, 8), (1, 7, 64, 100, 1000), 20),
            ("fp16 non-causal d64", torch.float16, mid, {}, (2, 3, 8), (1, 65, 999), 20),
            ("bf16 window+softcap d64", torch.bfloat16, mid, dict(window_size=(256, 0), softcap=30.0),
             (2, 3, 8), (1, 130), 20),
            ("bf16 causal + learnable sink d64", torch.bfloat16, mid,
             dict(causal=True, learnable_sink=torch.linspace(-2.0, 2.0, 8, device="cuda")), (2, 3, 8), (1, 130), 20),
            (f"bf16 causal GQA d128 + dropout {DROPOUT_P}", torch.bfloat16, big, dict(causal=True, dropout=True),
             (2, 3, 8), (), 20),
        ]
    small = Shape(batch=2, heads_q=2, heads_kv=1, seqlen_q=33, seqlen_k=40, head_dim=32)
    return [
        ("fp16 causal GQA d32", torch.float16, small, dict(causal=True), (2, 3), (1, 17), 3),
        ("bf16 window+softcap d32", torch.bfloat16, small, dict(window_size=(12, 0), softcap=5.0),
         (2, 3), (1, 17), 3),
        (f"fp16 causal GQA d32 + dropout {DROPOUT_P}", torch.float16, small, dict(causal=True, dropout=True),
         (2, 3), (), 3),
    ]


def run_verify(json_path: str | None = None, stream=sys.stdout, checks=None) -> int:
    """Run all checks (or those of :data:`CHECKS` named in ``checks``); print the table;
    return the process exit code."""
    selected = CHECKS if checks is None else tuple(checks)
    unknown = [c for c in selected if c not in CHECKS]
    if unknown or not selected:
        raise ValueError(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    on_gpu = not _backend.interpreting()
    device = _backend.kernel_device_type()
    print(f"bitstable verify on {_backend.describe()}", file=stream)
    if not on_gpu:
        print("  (no GPU: kernels run through Triton's interpreter at small sizes)", file=stream)
    if checks is not None:
        print(f"  (checks: {', '.join(c for c in CHECKS if c in selected)})", file=stream)
    rows = []
    scenarios = _scenarios(on_gpu) if any(c in selected for c in _ATTENTION) else []
    t0 = time.time()
    with poison_outputs():
        for i, (name, dtype, shape, kw, bss, chunks, runs) in enumerate(scenarios, 1):
            results = {}
            kw = dict(kw)
            dropout = kw.pop("dropout", False)
            here = tuple(c for c in selected if not (dropout and c == "chunk"))
            impls = (("bitstable", flash_attn_func), ("stock", _stock))
            if dropout:
                impls = tuple((n, with_dropout(f)) for n, f in impls)
            for impl, fn in impls:
                print(f"[{i}/{len(scenarios)}] {name}: {impl} ... ({time.time() - t0:.0f}s)",
                      file=stream, flush=True)
                try:
                    results[impl] = _attention_checks(fn, shape, dtype, device, runs, bss, chunks, here,
                                                      **kw)
                except Exception as e:  # a crash is a failed check, shown as such
                    results[impl] = [CheckResult("crashed", False, f"{type(e).__name__}: {e}")]
            for ours, stock in zip(results["bitstable"], results["stock"] + [None] * 8):
                rows.append(dict(scenario=name, check=ours.name, bitstable=ours.passed,
                                 bitstable_detail=ours.detail,
                                 stock=None if stock is None else stock.passed,
                                 stock_detail="" if stock is None else stock.detail))
    if "decode" in selected or "decode-batch" in selected:
        name = "bf16 KV cache GQA d128" if on_gpu else "bf16 KV cache GQA d32"
        print(f"[decode] {name} ... ({time.time() - t0:.0f}s)", file=stream, flush=True)
        with poison_outputs():
            ours = _guard(lambda: _decode_checks(flash_attn_with_kvcache, flash_attn_func, on_gpu, device,
                                                 selected))
            stock = _guard(lambda: _decode_checks(_stock_kvcache_call, _stock, on_gpu, device, selected))
        for o, st in zip(ours, stock + [None] * 8):
            rows.append(dict(scenario=name, check=o.name, bitstable=o.passed, bitstable_detail=o.detail,
                             stock=None if st is None else st.passed,
                             stock_detail="" if st is None else st.detail))
    if "ops" in selected:
        print(f"[ops] batch-invariant ops ... ({time.time() - t0:.0f}s)", file=stream, flush=True)
        with poison_outputs():
            ours = _guard(lambda: ops_checks(device, on_gpu, stock=False))
            stock = _guard(lambda: ops_checks(device, on_gpu, stock=True))
        for o, st in zip(ours, stock + [None] * 8):
            rows.append(dict(scenario="batch-invariant ops", check=o.name, bitstable=o.passed,
                             bitstable_detail=o.detail, stock=None if st is None else st.passed,
                             stock_detail="" if st is None else st.detail))
    failed = [r for r in rows if not r["bitstable"]]
    _print_table(rows, stream)
    verdict = "ALL bitstable checks hold" if not failed else f"{len(failed)} bitstable check(s) FAILED"
    print(f"\n{verdict} ({time.time() - t0:.0f}s)", file=stream)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=_backend.describe(), checks=[c for c in CHECKS if c in selected], rows=rows,
                           ok=not failed), f, indent=2)
        print(f"wrote {json_path}", file=stream)
    return 1 if failed else 0


def _guard(fn) -> List[CheckResult]:
    try:
        return fn()
    except Exception as e:  # a crash is a failed check, shown as such
        return [CheckResult("crashed", False, f"{type(e).__name__}: {e}")]


def _print_table(rows: List[dict], stream) -> None:
    mark = {True: "holds", False: "FAILS", None: "-"}
    w0 = max(len(r["scenario"]) for r in rows)
    w1 = max(len(r["check"]) for r in rows)
    print(f"\n{'scenario':<{w0}}  {'check':<{w1}}  {'bitstable':<9}  {'stock PyTorch':<13}  stock detail",
          file=stream)
    for r in rows:
        detail = "" if r["stock"] in (True, None) else r["stock_detail"][:90]
        print(f"{r['scenario']:<{w0}}  {r['check']:<{w1}}  {mark[r['bitstable']]:<9}  "
              f"{mark[r['stock']]:<13}  {detail}", file=stream)
        if not r["bitstable"]:
            print(f"    bitstable: {r['bitstable_detail']}", file=stream)
