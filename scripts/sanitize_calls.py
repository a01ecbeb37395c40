"""One call of every kernel family at small sizes, for ``compute-sanitizer`` (memcheck,
racecheck) on the GPU: dense forward + backward with a window and softcap, ALiBi, GQA;
dropout, a learnable sink, a value head dim below the q/k one, a head dim that is not a
multiple of 8; varlen forward + backward; KV-cache append + decode (contiguous, paged,
rotary, cache_leftpad, sink, Dv < D, head dim 59, the Hopper Gluon one-token kernel); the
batch-invariant matmul in three layouts; softmax, log-softmax, sum, RMS norm, layer norm.

    compute-sanitizer --tool memcheck python scripts/sanitize_calls.py
"""
import torch

import bitstable
from bitstable import launch_options, ops


def main() -> int:
    dev = "cuda"
    torch.manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(2, 200, 8, 64, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(2, 230, 2, 64, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(2, 230, 2, 64, device=dev, dtype=dt, requires_grad=True)
    out = bitstable.flash_attn_func(q, k, v, causal=True, window_size=(100, 0), softcap=20.0)
    out.float().sum().backward()
    slopes = torch.rand(8, device=dev, dtype=torch.float32)
    bitstable.flash_attn_func(q, k, v, alibi_slopes=slopes).float().sum().backward()
    bitstable.flash_attn_func(q, k, v, dropout_p=0.2, causal=True).float().sum().backward()
    sink = torch.randn(8, device=dev, dtype=torch.float32, requires_grad=True)
    bitstable.flash_attn_func(q, k, v, causal=True, learnable_sink=sink).float().sum().backward()
    q192 = torch.randn(2, 150, 4, 192, device=dev, dtype=dt, requires_grad=True)
    k192 = torch.randn(2, 150, 4, 192, device=dev, dtype=dt, requires_grad=True)
    v128 = torch.randn(2, 150, 4, 128, device=dev, dtype=dt, requires_grad=True)
    bitstable.flash_attn_func(q192, k192, v128, causal=True).float().sum().backward()
    q59, k59, v59 = (torch.randn(2, 90, 4, 59, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    bitstable.flash_attn_func(q59, k59, v59, causal=True).float().sum().backward()
    cu = torch.tensor([0, 70, 70, 200], device=dev, dtype=torch.int32)
    qp = torch.randn(200, 8, 64, device=dev, dtype=dt, requires_grad=True)
    kp = torch.randn(200, 2, 64, device=dev, dtype=dt, requires_grad=True)
    vp = torch.randn(200, 2, 64, device=dev, dtype=dt, requires_grad=True)
    bitstable.flash_attn_varlen_func(qp, kp, vp, cu, cu, 130, 130, causal=True).float().sum().backward()
    kc = torch.zeros(2, 512, 2, 128, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    qd = torch.randn(2, 1, 8, 128, device=dev, dtype=dt)
    kn = torch.randn(2, 1, 2, 128, device=dev, dtype=dt)
    lens = torch.tensor([300, 17], dtype=torch.int32)
    bitstable.flash_attn_with_kvcache(qd, kc, vc, kn, kn, cache_seqlens=lens, causal=True)
    pages = torch.zeros(10, 64, 2, 128, device=dev, dtype=dt)            # 5 pages of 64 per row
    table = torch.tensor([[3, 1, 5, 0, 8], [7, 2, 4, 6, 9]], device=dev, dtype=torch.int32)
    bitstable.flash_attn_with_kvcache(qd, pages, pages.clone(), kn, kn, cache_seqlens=lens,
                                      block_table=table, causal=True)
    cos, sin = torch.randn(600, 32, device=dev), torch.randn(600, 32, device=dev)
    bitstable.flash_attn_with_kvcache(qd, kc, vc, kn, kn, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
                                      causal=True, rotary_interleaved=False, learnable_sink=sink)
    leftpad = torch.tensor([5, 0], device=dev, dtype=torch.int32)
    bitstable.flash_attn_with_kvcache(qd, kc, vc, kn, kn, cache_seqlens=lens, cache_leftpad=leftpad, causal=True)
    kc192 = torch.zeros(2, 512, 2, 192, device=dev, dtype=dt)
    vc128 = torch.zeros(2, 512, 2, 128, device=dev, dtype=dt)
    bitstable.flash_attn_with_kvcache(torch.randn(2, 1, 8, 192, device=dev, dtype=dt), kc192, vc128,
                                      torch.randn(2, 1, 2, 192, device=dev, dtype=dt),
                                      torch.randn(2, 1, 2, 128, device=dev, dtype=dt), cache_seqlens=lens)
    kc59 = torch.zeros(2, 512, 2, 59, device=dev, dtype=dt)
    bitstable.flash_attn_with_kvcache(torch.randn(2, 1, 8, 59, device=dev, dtype=dt), kc59, kc59.clone(),
                                      cache_seqlens=lens)
    with launch_options.forced(decode_gluon=True):
        bitstable.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=torch.tensor([300, 511], dtype=torch.int32))
    a = torch.randn(300, 256, device=dev, dtype=dt)
    w = torch.randn(384, 256, device=dev, dtype=dt)
    ops.mm(a, w.t())
    ops.mm(a, w.t().contiguous())
    ops.mm(a.t().contiguous().t(), w.t().contiguous())
    x = torch.randn(300, 1000, device=dev, dtype=dt)
    ops.softmax(x, -1)
    ops.log_softmax(x, -1)
    ops.sum(x, -1)
    g = torch.randn(1000, device=dev, dtype=dt)
    ops.rms_norm(x, (1000,), g)
    ops.layer_norm(x, (1000,), g, g)
    torch.cuda.synchronize()
    print("sanitize_calls: every kernel family ran")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
