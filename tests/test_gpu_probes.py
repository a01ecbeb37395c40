"""Probes of DESIGN.md's measured facts, re-checked on every GPU the suite runs on.

On Hopper, a query row's output bits were measured to be the same for query
tiles of 64 and 128 rows with 4 or 8 warps (the wgmma path).  The decode and
chunked-prefill kernels rely on that to share bits with the prefill kernel.
"""

import pytest
import torch

from bitstable.attention.launch import attention_forward
from bitstable.configs import AttentionConfig, arch_key, attention_config


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_row_bits_do_not_depend_on_query_tile(head_dim, causal):
    if arch_key(torch.device("cuda")) != "sm90":
        pytest.skip("probe recorded for Hopper (sm_90) only")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, L, H = 2, 1000, 4
    q, k, v = (torch.randn(B, L, H, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    base = attention_config("sm90", torch.bfloat16, head_dim)
    right = 0 if causal else -1
    ref, ref_lse = attention_forward(q, k, v, head_dim ** -0.5, -1, right, 0.0, None)
    for bm, warps, stages in [(64, 4, 2), (64, 8, 2), (128, 4, 2), (128, 8, 2)]:
        cfg = AttentionConfig(block_m=bm, block_n=base.block_n, num_warps=warps, num_stages=stages)
        out, lse = attention_forward(q, k, v, head_dim ** -0.5, -1, right, 0.0, None, config=cfg)
        assert torch.equal(out, ref), f"BLOCK_M={bm} warps={warps}: output bits differ"
        assert torch.equal(lse, ref_lse), f"BLOCK_M={bm} warps={warps}: lse bits differ"
