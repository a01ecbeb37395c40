"""``bitstable bench``: forward and forward+backward speed next to PyTorch's SDPA backends, in one process.

For each shape (B, H, L, D) and causal setting it times bitstable's
``flash_attn_func`` and SDPA restricted to its flash and cudnn backends, all on
the same random bf16 inputs, each in its native layout.  Reports median ms,
TFLOP/s, bitstable's speed as a ratio to each backend, and (forward) peak
extra memory (peak allocation during the call, minus the inputs and output).  Writes a
markdown table, JSON and a PNG plot.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _backend
from ..timing import fmt as _fmt, time_graph_ms as _time_graph_ms, time_ms as _time_ms  # noqa: F401
from ..timing import with_backward as _with_backward
from ..attention import flash_attn_func

DEFAULT_SHAPES: List[Tuple[int, int, int, int]] = [
    (8, 32, 4096, 64), (4, 16, 8192, 128), (16, 16, 2048, 128), (1, 32, 16384, 128),
]
SDPA_BACKENDS = ("flash", "cudnn")


def attention_flops(B: int, H: int, L: int, D: int, causal: bool, backward: bool = False) -> float:
    """Forward FLOPs: two matmuls of 2*L*L*D each per head; causal counts the visible half.
    With ``backward``: forward + backward, 2 + 5 such matmuls (3.5x the forward)."""
    pairs = L * (L + 1) / 2 if causal else L * L
    return 4.0 * B * H * pairs * D * (3.5 if backward else 1.0)


def _extra_memory(fn: Callable) -> Optional[int]:
    """Peak bytes allocated during ``fn()`` beyond what existed before and its output."""
    if _backend.interpreting():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return int(peak - base - out.numel() * out.element_size())


def sdpa_fn(backend: str, q, k, v, causal: bool, dout=None, dropout_p: float = 0.0) -> Optional[Callable]:
    """A call of SDPA's ``backend`` ('flash' or 'cudnn') on q/k/v ``[B, H, L, D]`` (with
    ``dout``: forward and backward; ``dropout_p``: SDPA's own, non-reproducible dropout),
    run once; None where the backend cannot take it."""
    if _backend.interpreting():
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def fwd():
        with sdpa_kernel(which):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                    dropout_p=dropout_p)

    fn = fwd if dout is None else _with_backward(fwd, dout, (q, k, v))

    try:
        fn()
    except Exception:  # backend unavailable for this shape / build
        return None
    return fn


def bench_forward(shapes: Sequence[Tuple[int, int, int, int]] = DEFAULT_SHAPES,
                  causal_options: Sequence[bool] = (False, True), dtype=torch.bfloat16,
                  reps: int = 100, stream=sys.stdout,
                  passes: Sequence[str] = ("fwd", "fwd+bwd")) -> List[Dict]:
    """Time every (pass, shape, causal); returns one row per case.  Pass "dropout" is
    fwd+bwd with dropout_p = DROPOUT_P for bitstable and SDPA alike (its rows also carry
    bitstable's fwd+bwd time without dropout, ``bitstable_no_dropout_ms``)."""
    device = _backend.kernel_device_type()
    rows = []
    cases = [(p, s, c) for p in passes for s in shapes for c in causal_options]
    t0 = time.time()
    for i, (pss, (B, H, L, D), causal) in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {pss} B={B} H={H} L={L} D={D} causal={causal} "
              f"({time.time() - t0:.0f}s)", file=stream, flush=True)
        bwd = pss in ("fwd+bwd", "dropout")
        p_drop = DROPOUT_P if pss == "dropout" else 0.0
        g = torch.Generator(device=device).manual_seed(i)
        q, k, v = (torch.randn(B, L, H, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))   # SDPA's native layout
        dout = dout_t = None
        if bwd:
            for t in (q, k, v, qt, kt, vt):
                t.requires_grad_(True)
            dout = torch.randn(B, L, H, D, device=device, dtype=dtype, generator=g)
            dout_t = dout.transpose(1, 2).contiguous()
        flops = attention_flops(B, H, L, D, causal, backward=bwd)
        row = dict(pass_=pss, B=B, H=H, L=L, D=D, causal=causal, dtype=str(dtype).replace("torch.", ""),
                   dropout_p=p_drop)

        def fwd(p=p_drop):
            return flash_attn_func(q, k, v, p, causal=causal)

        ours = _with_backward(fwd, dout, (q, k, v)) if bwd else fwd
        impls = {"bitstable": ours}
        if p_drop:
            impls["bitstable_no_dropout"] = _with_backward(lambda: fwd(0.0), dout, (q, k, v))
            # the forward alone, with and without dropout: what the forward kernel's mask costs
            impls["bitstable_fwd"] = _no_grad(fwd)
            impls["bitstable_fwd_no_dropout"] = _no_grad(lambda: fwd(0.0))
        for name in SDPA_BACKENDS:
            impls[f"sdpa_{name}"] = sdpa_fn(name, qt, kt, vt, causal, dout_t, p_drop)
        for name, fn in impls.items():
            if fn is None:
                row[f"{name}_ms"] = row[f"{name}_tflops"] = row[f"{name}_extra_bytes"] = None
                continue
            ms = _time_ms(fn, reps)
            row[f"{name}_ms"] = ms
            row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
            row[f"{name}_extra_bytes"] = None if bwd else _extra_memory(fn)
        for name in SDPA_BACKENDS:
            ref = row.get(f"sdpa_{name}_ms")
            row[f"ratio_vs_{name}"] = (ref / row["bitstable_ms"]) if ref else None
        if p_drop:
            row["dropout_cost"] = row["bitstable_ms"] / row["bitstable_no_dropout_ms"]
            row["dropout_cost_fwd"] = row["bitstable_fwd_ms"] / row["bitstable_fwd_no_dropout_ms"]
        if impls.get("sdpa_flash") is not None and not p_drop:
            with torch.no_grad():
                diff = (fwd().transpose(1, 2).float() - sdpa_fn("flash", qt, kt, vt, causal)().float())
            row["max_abs_diff_vs_flash"] = diff.abs().max().item()
        row["lse_bytes"] = B * H * L * 4
        rows.append(row)
        del q, k, v, qt, kt, vt
    return rows


def _no_grad(fn: Callable) -> Callable:
    """``fn`` called under ``torch.no_grad()`` (a forward that saves nothing for backward)."""
    def run():
        with torch.no_grad():
            return fn()
    return run


#: The dropout pass's probability (flash-attn's tests use 0.17; training recipes 0.0-0.1).
DROPOUT_P = 0.1

DECODE_BATCHES = (1, 8, 64)
DECODE_LENGTHS = (4096, 16384, 65536, 131072)


def copy_bandwidth_gbs() -> Optional[float]:
    """Device-to-device copy bandwidth (bytes read + written per second), the decode ceiling."""
    if _backend.interpreting():
        return None
    import triton

    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_decode(batches: Sequence[int] = DECODE_BATCHES, lengths: Sequence[int] = DECODE_LENGTHS,
                 heads_q: int = 32, heads_kv: int = 8, head_dim: int = 128, dtype=torch.bfloat16,
                 reps: int = 100, stream=sys.stdout) -> List[Dict]:
    """One new query token against a KV cache of each length: bitstable's split-KV decode
    (bandwidth over K and V bytes, vs the copy bandwidth) next to SDPA-flash."""
    from ..attention import flash_attn_with_kvcache

    device = _backend.kernel_device_type()
    copy_bw = copy_bandwidth_gbs()
    rows = []
    cases = [(b, L) for L in lengths for b in batches]
    t0 = time.time()
    for i, (B, L) in enumerate(cases, 1):
        print(f"[decode {i}/{len(cases)}] B={B} L={L} ({time.time() - t0:.0f}s)", file=stream, flush=True)
        g = torch.Generator(device=device).manual_seed(i)
        kc = torch.randn(B, L, heads_kv, head_dim, device=device, dtype=dtype, generator=g)
        vc = torch.randn(B, L, heads_kv, head_dim, device=device, dtype=dtype, generator=g)
        q = torch.randn(B, 1, heads_q, head_dim, device=device, dtype=dtype, generator=g)
        lens = torch.full((B,), L, dtype=torch.int32, device=device)
        if not _backend.interpreting():
            torch.cuda.synchronize()   # the timers run on a side stream: inputs must be ready

        def ours():
            return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)

        ms = _time_graph_ms(ours, reps)
        eager_ms = _time_ms(ours, reps)
        kv_bytes = 2 * kc.numel() * kc.element_size()
        row = dict(pass_="decode", B=B, L=L, Hq=heads_q, Hkv=heads_kv, D=head_dim,
                   bitstable_ms=ms, bitstable_eager_ms=eager_ms, bitstable_gbs=kv_bytes / (ms * 1e-3) / 1e9, copy_gbs=copy_bw,
                   bitstable_extra_bytes=_extra_memory(ours),
                   input_bytes=kv_bytes + q.numel() * q.element_size())
        row["fraction_of_copy"] = row["bitstable_gbs"] / copy_bw if copy_bw else None
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        flash = None
        if not _backend.interpreting():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
            try:
                flash()
            except Exception:
                flash = None
        row["sdpa_flash_ms"] = _time_graph_ms(flash, reps) if flash else None
        row["ratio_vs_flash"] = (row["sdpa_flash_ms"] / ms) if flash else None
        rows.append(row)
        del kc, vc, q, qt, kt, vt, ours, flash    # free this case's cache before the next
        if not _backend.interpreting():
            torch.cuda.empty_cache()
    return rows


def decode_table(rows: List[Dict]) -> str:
    """Decode rows as markdown (ratio > 1: bitstable faster than SDPA-flash).  Times are CUDA-graph
    replays (kernel time, as engines run decode); "eager" is a plain Python call, host overhead included."""
    lines = ["| B | KV len | bitstable ms | K+V GB/s | of copy BW | SDPA-flash ms | vs flash | eager ms "
             "| extra MiB (inputs MiB) |",
             "|" + "|".join(["---"] * 9) + "|"]
    for r in rows:
        extra = r.get("bitstable_extra_bytes")
        lines.append(
            f"| {r['B']} | {r['L']} | {_fmt(r['bitstable_ms'], '.3f')} | {_fmt(r['bitstable_gbs'], '.0f')} "
            f"| {_fmt(r['fraction_of_copy'], '.0%')} | {_fmt(r['sdpa_flash_ms'], '.3f')} "
            f"| {_fmt(r['ratio_vs_flash'], '.2f')}x | {_fmt(r.get('bitstable_eager_ms'), '.3f')} "
            f"| {_fmt(None if extra is None else extra / 2**20, '.1f')} "
            f"({r['input_bytes'] / 2**20:.0f}) |")
    return "\n".join(lines)


def markdown_table(rows: List[Dict]) -> str:
    """The results as a markdown table (ratios > 1 mean bitstable is faster)."""
    head = ("| pass | B | H | L | D | causal | bitstable ms | TFLOP/s | SDPA-flash TFLOP/s | SDPA-cudnn TFLOP/s "
            "| vs flash | vs cudnn | extra MiB (LSE MiB) |")
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    for r in rows:
        extra = r.get("bitstable_extra_bytes")
        label = r["pass_"]
        if r.get("dropout_p"):
            label += (f" p={r['dropout_p']} (bitstable without: {_fmt(r.get('bitstable_no_dropout_ms'), '.3f')} ms,"
                      f" cost {_fmt(r.get('dropout_cost'), '.3f')}x; forward alone"
                      f" {_fmt(r.get('dropout_cost_fwd'), '.3f')}x)")
        lines.append(
            f"| {label} | {r['B']} | {r['H']} | {r['L']} | {r['D']} | {'yes' if r['causal'] else 'no'} "
            f"| {_fmt(r['bitstable_ms'], '.3f')} | {_fmt(r['bitstable_tflops'], '.0f')} "
            f"| {_fmt(r['sdpa_flash_tflops'], '.0f')} | {_fmt(r['sdpa_cudnn_tflops'], '.0f')} "
            f"| {_fmt(r['ratio_vs_flash'], '.2f')}x | {_fmt(r['ratio_vs_cudnn'], '.2f')}x "
            f"| {_fmt(None if extra is None else extra / 2**20, '.1f')} ({r['lse_bytes'] / 2**20:.1f}) |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str, title: str) -> None:
    """Grouped bars of TFLOP/s per case and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = [("bitstable", "bitstable"), ("sdpa_flash", "SDPA flash"), ("sdpa_cudnn", "SDPA cudnn")]
    passes = list(dict.fromkeys(r["pass_"] for r in rows))
    width = 0.27
    n = max(sum(r["pass_"] == p for r in rows) for p in passes)
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(8, 1.3 * n), 4.2 * len(passes)), squeeze=False)
    for ax, pss in zip(axes[:, 0], passes):
        sub = [r for r in rows if r["pass_"] == pss]
        if pss == "ops":
            from .bench_ops import plot_ops

            plot_ops(sub, ax)
            continue
        if pss == "model":
            from .bench_model import plot_model

            plot_model(sub, ax)
            continue
        if pss == "features":
            from .bench_features import plot_features

            plot_features(sub, ax)
            continue
        if pss == "decode":
            labels = [f"B{r['B']}\nKV {r['L']}" for r in sub]
            ax.bar([i - width / 2 for i in range(len(sub))], [r["bitstable_gbs"] or 0.0 for r in sub],
                   width, label="bitstable decode (K+V bytes)")
            ax.bar([i + width / 2 for i in range(len(sub))], [r["copy_gbs"] or 0.0 for r in sub],
                   width, label="device copy")
            ax.set_xticks(range(len(sub)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel("GB/s (decode)")
            ax.legend()
            continue
        labels = [f"B{r['B']} H{r['H']}\nL{r['L']} D{r['D']}\n{'causal' if r['causal'] else 'full'}"
                  for r in sub]
        for j, (key, name) in enumerate(impls):
            vals = [r.get(f"{key}_tflops") or 0.0 for r in sub]
            ax.bar([i + (j - 1) * width for i in range(len(sub))], vals, width, label=name)
        ax.set_xticks(range(len(sub)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(f"TFLOP/s ({pss})")
        ax.legend()
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(out_dir: str, shapes=DEFAULT_SHAPES, reps: int = 100, stream=sys.stdout,
              passes: Sequence[str] = ("fwd", "fwd+bwd", "decode", "ops"),
              decode_sizes: Optional[Dict] = None, ops_sizes: Optional[Dict] = None,
              model_sizes: Optional[Dict] = None, features_sizes: Optional[Dict] = None) -> List[Dict]:
    """Run the benchmark and write bench.json, bench.md and bench.png into ``out_dir``.
    The "model" pass (opt-in) takes ``model_sizes``: keyword arguments of
    ``bench_model.bench_model``; the "features" pass (opt-in) ``features_sizes``, those of
    ``bench_features.bench_features``."""
    os.makedirs(out_dir, exist_ok=True)
    device = _backend.describe()
    print(f"bitstable bench on {device}", file=stream, flush=True)
    dense_passes = [p for p in passes if p in ("fwd", "fwd+bwd", "dropout")]
    rows = bench_forward(shapes, reps=reps, stream=stream, passes=dense_passes) if dense_passes else []
    table = markdown_table(rows) if rows else ""
    if "decode" in passes:
        dec = bench_decode(reps=reps, stream=stream, **(decode_sizes or {}))
        rows += dec
        table += ("\n\n" if table else "") + ("Decode (one token, KV cache, split-KV; CUDA-graph replay times):\n\n"
                                              + decode_table(dec))
    if "ops" in passes:
        from .bench_ops import bench_ops, ops_table

        op_rows = [dict(r, pass_="ops") for r in bench_ops(reps=reps, stream=stream, **(ops_sizes or {}))]
        rows += op_rows
        table += ("\n\n" if table else "") + "Batch-invariant ops (bf16) vs stock PyTorch:\n\n" + ops_table(op_rows)
    if "features" in passes:
        from .bench_features import bench_features, features_table

        feat = bench_features(reps=reps, stream=stream, **(features_sizes or {}))
        rows += feat
        table += ("\n\n" if table else "") + ("What each feature costs over the same call without it (bf16, "
                                              "causal; decode: CUDA-graph replay, eager cost beside):\n\n"
                                              + features_table(feat))
    if "model" in passes:
        from .bench_model import bench_model, model_tables

        model_rows = bench_model(**(model_sizes or {}))
        rows += model_rows
        table += ("\n\n" if table else "") + model_tables(model_rows)
    meta = dict(device=device, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                command="bitstable " + " ".join(sys.argv[1:]), torch=torch.__version__)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        dtype = "bf16" + ("; the model pass in the dtype its table names" if "model" in passes else "")
        f.write(f"bitstable bench ({', '.join(passes)}), {dtype}. {device}. {meta['date']}. "
                f"Command: `{meta['command']}`\n\n{table}\n")
    try:
        plot(rows, os.path.join(out_dir, "bench.png"), f"bitstable vs SDPA - {device}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'bitstable[bench]')", file=stream)
    print("\n" + table, file=stream)
    return rows
