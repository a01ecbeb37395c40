#!/usr/bin/env python3
"""Side by side: the bitstable rows of two or more ``bench.json`` files (table tool).

For an A/B of two trees timed in one device call (each next to SDPA in its own process):

    python benchmarks/compare_bench.py base=OUT/base/bench.json new=OUT/new/bench.json

Rows pair up by (pass, B, H, L, D, causal, dropout_p).  Per row and file: bitstable's median
ms, its ratio to SDPA-cudnn and SDPA-flash measured in the same process (the ratios
control for clock drift between the processes), and ``x base``: that file's ms over the first
file's (below 1 = faster; rows match on their key, and a
row only some files have shows ``-`` in the others).  Dropout rows also give ``x own``: the time over the same
process's bitstable time without dropout (issue 16's target: at most 1.15).
"""

from __future__ import annotations

import json
import sys

KEY = ("pass_", "B", "H", "L", "D", "causal", "dropout_p")


def _rows(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    rows = data["rows"] if isinstance(data, dict) else data
    return {tuple(r.get(k) for k in KEY): r for r in rows if r.get("bitstable_ms") is not None}


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main(argv) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv):
        print(__doc__)
        return 2
    runs = [(a.split("=", 1)[0], _rows(a.split("=", 1)[1])) for a in argv]
    base_label, base = runs[0]
    head = ["pass", "B,H,L,D", "causal"]
    for label, _ in runs:
        head += [f"{label} ms", f"{label} /cudnn", f"{label} /flash"]
        if label != base_label:
            head.append(f"{label} x {base_label}")
        head.append(f"{label} x own")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    keys = list(dict.fromkeys(k for _, rows in runs for k in rows))     # every row, first file's order first
    for key in keys:
        cells = [str(key[0]), ",".join(str(k) for k in key[1:5]), str(key[5])]
        for label, rows in runs:
            r = rows.get(key)
            if r is None:
                cells += ["-"] * (4 if label == base_label else 5)
                continue
            cells += [_fmt(r["bitstable_ms"]), _fmt(r.get("ratio_vs_cudnn")), _fmt(r.get("ratio_vs_flash"))]
            if label != base_label:
                cells.append(_fmt(r["bitstable_ms"] / base[key]["bitstable_ms"]) if key in base else "-")
            own = r.get("bitstable_no_dropout_ms")
            cells.append(_fmt(r["bitstable_ms"] / own if own else None))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
