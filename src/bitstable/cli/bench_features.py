"""``bitstable bench --passes features``: what each model feature costs over the same call
without it, in one process (issue 16's speed targets).

Rows (``pass_ = "features"``), each a pair of bitstable calls on the same inputs:

* ``sink``: ``flash_attn_func`` forward + backward with a learnable sink (float32 [H],
  its gradient included) against the same call without it; target cost <= 1.05.
* ``dv<d``: q/k head dim 192 with a value head dim of 128 (DeepSeek MLA prefill) against
  the same call with value head dim 192 (``Dv = D``), forward + backward; target <= 1.05.
* ``rotary-decode``: one decode step of ``flash_attn_with_kvcache`` that appends the new
  k / v and applies rotary (``rotary_cos`` / ``rotary_sin``, rotary dim = head dim) against
  the same append without rotary; CUDA-graph replay (kernel time) and eager (host time
  included); target <= 1.05.

``cost`` = feature ms / base ms (eager CUDA-event timings for the dense rows, graph replay
for the decode row; ``cost_eager`` the eager decode ratio).  bf16 throughout; the dense
rows are causal.  Not covered: varlen, paged caches, softcap or windows combined with them.
"""

from __future__ import annotations

import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

from .. import _backend
from ..attention import flash_attn_func
from ..timing import fmt as _fmt, time_graph_ms, time_ms, with_backward

#: (B, H, L, D) of the dense rows; the value-dim rows use D = 192 and Dv = 128 / 192.
FEATURE_SHAPES: Tuple[Tuple[int, int, int, int], ...] = ((4, 16, 4096, 128), (2, 32, 8192, 128))
#: (B, cache length) of the rotary decode rows (32 query heads, 8 kv heads, D 128).
ROTARY_DECODE: Tuple[Tuple[int, int], ...] = ((1, 16384), (8, 8192), (64, 4096))


def bench_features(shapes: Sequence[Tuple[int, int, int, int]] = FEATURE_SHAPES,
                   decode_cases: Sequence[Tuple[int, int]] = ROTARY_DECODE, reps: int = 100,
                   dtype=torch.bfloat16, stream=sys.stdout, value_dims: Tuple[int, int] = (192, 128),
                   decode_heads: Tuple[int, int, int] = (32, 8, 128)) -> List[Dict]:
    """One row per (feature, shape): ``base_ms``, ``bitstable_ms`` (with the feature) and
    ``cost`` = their ratio; decode rows also ``base_eager_ms``, ``bitstable_eager_ms``,
    ``cost_eager``.  ``value_dims`` = (D, Dv) of the value-dim rows, ``decode_heads`` =
    (query heads, kv heads, head dim) of the decode rows (smaller in the CPU test)."""
    from ..attention import flash_attn_with_kvcache

    device = _backend.kernel_device_type()
    rows: List[Dict] = []
    cases = [("sink", s) for s in shapes] + [("dv<d", s) for s in shapes] + [("rotary-decode", c)
                                                                             for c in decode_cases]
    t0 = time.time()
    for i, (feature, shape) in enumerate(cases, 1):
        print(f"[features {i}/{len(cases)}] {feature} {shape} ({time.time() - t0:.0f}s)", file=stream, flush=True)
        g = torch.Generator(device=device).manual_seed(i)

        def rnd(*s, grad=False):
            return torch.randn(*s, device=device, dtype=dtype, generator=g).requires_grad_(grad)

        if feature in ("sink", "dv<d"):
            B, H, L, D = shape
            if feature == "sink":
                q, k, v = (rnd(B, L, H, D, grad=True) for _ in range(3))
                sink = torch.randn(H, device=device, dtype=torch.float32, generator=g).requires_grad_(True)
                dout = rnd(B, L, H, D)
                base = with_backward(lambda: flash_attn_func(q, k, v, causal=True), dout, (q, k, v))
                feat = with_backward(lambda: flash_attn_func(q, k, v, causal=True, learnable_sink=sink), dout,
                                (q, k, v, sink))
                row = dict(B=B, H=H, L=L, D=D, Dv=D)
            else:
                Dq, Dv = value_dims
                q, k = (rnd(B, L, H, Dq, grad=True) for _ in range(2))
                v_full, v_small = rnd(B, L, H, Dq, grad=True), rnd(B, L, H, Dv, grad=True)
                d_full, d_small = rnd(B, L, H, Dq), rnd(B, L, H, Dv)
                base = with_backward(lambda: flash_attn_func(q, k, v_full, causal=True), d_full, (q, k, v_full))
                feat = with_backward(lambda: flash_attn_func(q, k, v_small, causal=True), d_small, (q, k, v_small))
                row = dict(B=B, H=H, L=L, D=Dq, Dv=Dv)
            row.update(base_ms=time_ms(base, reps), bitstable_ms=time_ms(feat, reps), causal=True)
        else:
            B, L = shape
            Hq, Hk, D = decode_heads
            kc, vc = rnd(B, L + 1, Hk, D), rnd(B, L + 1, Hk, D)
            q, kn, vn = rnd(B, 1, Hq, D), rnd(B, 1, Hk, D), rnd(B, 1, Hk, D)
            lens = torch.full((B,), L, dtype=torch.int32, device=device)
            ang = torch.rand(L + 1, D // 2, device=device, generator=g, dtype=torch.float32) * 6.28
            cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
            if not _backend.interpreting():
                torch.cuda.synchronize()

            def base():   # the same slot is rewritten each call: the cache length stays L + 1
                return flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True)

            def feat():
                return flash_attn_with_kvcache(q, kc, vc, kn, vn, rotary_cos=cos, rotary_sin=sin,
                                               cache_seqlens=lens, causal=True, rotary_interleaved=False)

            row = dict(B=B, H=Hq, Hkv=Hk, L=L, D=D, Dv=D, causal=True,
                       base_ms=time_graph_ms(base, reps), bitstable_ms=time_graph_ms(feat, reps),
                       base_eager_ms=time_ms(base, reps), bitstable_eager_ms=time_ms(feat, reps))
            row["cost_eager"] = row["bitstable_eager_ms"] / row["base_eager_ms"]
        row = dict(pass_="features", feature=feature, dtype=str(dtype).replace("torch.", ""), **row)
        row["cost"] = row["bitstable_ms"] / row["base_ms"]
        rows.append(row)
        if not _backend.interpreting():
            torch.cuda.empty_cache()
    return rows


def features_table(rows: List[Dict]) -> str:
    """The features rows as markdown: cost = with / without the feature (target <= 1.05)."""
    lines = ["| feature | B | H | L | D | Dv | without ms | with ms | cost | eager cost |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['feature']} | {r['B']} | {r['H']} | {r['L']} | {r['D']} | {r['Dv']} | "
                     f"{_fmt(r['base_ms'], '.3f')} | {_fmt(r['bitstable_ms'], '.3f')} | {_fmt(r['cost'], '.3f')} | "
                     f"{_fmt(r.get('cost_eager'), '.3f')} |")
    return "\n".join(lines)


def plot_features(rows: List[Dict], ax) -> None:
    """Bars of each row's cost (with / without the feature), the 1.05 target as a line."""
    labels = [f"{r['feature']}\nB{r['B']} L{r['L']}" for r in rows]
    ax.bar(range(len(rows)), [r["cost"] for r in rows], 0.6, label="cost (kernel time)")
    ax.axhline(1.05, color="k", linestyle="--", linewidth=1, label="target 1.05")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("time with / without")
    ax.set_title("features: cost over the same call without")
    ax.legend(fontsize=8)
