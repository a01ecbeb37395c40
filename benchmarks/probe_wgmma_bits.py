"""Probe (offline): the Gluon decode kernel's split states against the Triton kernel's,
repeated, for pipeline depths that put one or several programs on an SM."""
import importlib

import torch

import bitstable

from bitstable import launch_options

kv_launch = importlib.import_module("bitstable.attention.kvcache.launch")
captured = []
_orig = kv_launch.launch_combine


def _capture(ws_acc, ws_ml, *args, **kw):
    captured.append((ws_acc.clone(), ws_ml.clone()))
    return _orig(ws_acc, ws_ml, *args, **kw)


kv_launch.launch_combine = _capture   # the decode launcher looks it up in its module
for B, L, D in ((1, 65536, 128), (8, 16384, 64)):
    kc = torch.randn(B, L, 8, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(B, L, 8, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, 1, 32, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")

    def run(force):
        captured.clear()
        with launch_options.forced(**force):
            bitstable.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True)
        torch.cuda.synchronize()
        return captured[0]
    ref_acc, ref_ml = run({"decode_gluon": False})          # [S, B, Hq, 1, D], [S, B, Hq, 1, 2]
    for stages in (3, 4):
        for rep in range(3):
            acc, ml = run({"decode_gluon": True, "decode_stages": stages})
            bad_ml = (ml != ref_ml).any(-1).any(-1)          # [S, B, Hq]
            bad_acc = (acc != ref_acc).any(-1).any(-1)
            bad = bad_ml | bad_acc
            idx = bad.nonzero().tolist()
            splits = sorted({i[0] for i in idx})
            heads = sorted({(i[1], i[2] // 4) for i in idx})
            print(f"B={B} L={L} D={D} stages={stages} rep={rep}: {len(idx)} bad (split,b,h) of {bad.numel()}; "
                  f"m/l bad {int(bad_ml.sum())}, acc bad {int(bad_acc.sum())}; splits {splits[:12]}; "
                  f"(b, kv head) {heads[:10]}", flush=True)
            if idx:
                s, b, h = idx[0]
                print("   first bad: m,l", ml[s, b, h, 0].tolist(), "ref", ref_ml[s, b, h, 0].tolist(),
                      "acc[:4]", acc[s, b, h, 0, :4].tolist(), "ref", ref_acc[s, b, h, 0, :4].tolist(), flush=True)
