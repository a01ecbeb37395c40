"""Shared test cases: the feature matrix, at CPU (interpreter) and GPU sizes."""

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (id, sizes B, Lq, Lk, Hq, Hk, D, flash_attn_func kwargs)
CPU_FEATURES = [
    ("dense", (2, 40, 40, 4, 4, 32), {}),
    ("causal-gqa-d40-lq<lk", (2, 23, 57, 4, 2, 40), dict(causal=True)),
    ("causal-lq>lk", (1, 50, 30, 2, 2, 32), dict(causal=True)),
    ("mqa-d64-ragged", (1, 37, 45, 4, 1, 64), {}),
    ("window", (1, 45, 60, 2, 1, 32), dict(window_size=(10, 5))),
    ("window-causal", (1, 60, 60, 2, 2, 32), dict(window_size=(15, 0))),
    ("softcap-causal", (2, 33, 41, 2, 1, 32), dict(softcap=3.0, causal=True)),
    ("alibi-per-head", (2, 30, 30, 4, 2, 32), dict(alibi=(4,), causal=True)),
    ("alibi-per-batch-head", (2, 20, 35, 2, 2, 32), dict(alibi=(2, 2))),
    ("scale", (1, 30, 30, 2, 2, 32), dict(softmax_scale=0.3)),
    ("d8", (1, 20, 20, 2, 2, 8), {}),
    ("d256-causal", (1, 20, 36, 2, 1, 256), dict(causal=True)),
]

GPU_FEATURES = [
    ("dense-d64", (2, 1024, 1024, 8, 8, 64), {}),
    ("causal-d128", (2, 2048, 2048, 8, 8, 128), dict(causal=True)),
    ("causal-gqa-d128-lq<lk", (2, 777, 2100, 8, 2, 128), dict(causal=True)),
    ("causal-lq>lk", (1, 1500, 1000, 4, 4, 64), dict(causal=True)),
    ("mqa-d96-ragged", (1, 1111, 1333, 8, 1, 96), {}),
    ("window-causal-d128", (2, 2048, 2048, 4, 2, 128), dict(window_size=(300, 0))),
    ("window-both", (1, 1000, 1500, 4, 4, 64), dict(window_size=(200, 100))),
    ("softcap-causal-d256", (1, 1024, 1024, 4, 2, 256), dict(softcap=30.0, causal=True)),
    ("alibi-causal-d128", (2, 1024, 1024, 8, 4, 128), dict(alibi=(8,), causal=True)),
    ("d256", (1, 1024, 1024, 4, 4, 256), {}),
    ("d8", (1, 1000, 1000, 4, 4, 8), dict(causal=True)),
]


def params(cpu_cases, gpu_cases, dtypes=DTYPES):
    """pytest params over dtype x case; GPU cases carry the ``gpu`` marker."""
    out = []
    for dt in dtypes:
        dname = str(dt).replace("torch.", "")
        out += [pytest.param(dt, sizes, kw, id=f"{dname}-{name}") for name, sizes, kw in cpu_cases]
        out += [pytest.param(dt, sizes, kw, id=f"gpu-{dname}-{name}", marks=pytest.mark.gpu)
                for name, sizes, kw in gpu_cases]
    return out


DTYPE_PARAMS = [pytest.param(dt, id=i) for dt, i in zip(DTYPES, ("fp32", "fp16", "bf16"))]


def cpu_bf16_gpu_marked(p, keep: bool):
    """``p`` with the ``gpu`` marker added when it is a bf16 case at CPU sizes that is not
    ``keep``.

    Under the interpreter bf16 tiles are upcast to fp32 (_backend.compute_dtype; the row-wise
    tile product is fp32 for every dtype): a bf16 case runs the fp32 case's arithmetic on
    bf16-rounded inputs and adds only the bf16 loads and stores, so one kept bf16 case per
    test covers them and the rest run on the GPU only, where bf16 is its own tensor-core path.
    """
    gpu = any(m.name == "gpu" for m in p.marks)
    if keep or gpu or torch.bfloat16 not in p.values:
        return p
    return pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.gpu])


def matrix(dtypes, features, sizes, bf16_on_cpu=(), fp32_off_cpu=()):
    """pytest params over dtype x feature x size (ids ``dtype-feature-size``, the ids of
    stacked parametrize decorators); bf16 cases at CPU sizes run through the interpreter
    only for the feature ids in ``bf16_on_cpu`` (see :func:`cpu_bf16_gpu_marked`).  The fp32
    cases at CPU sizes of the features in ``fp32_off_cpu`` run on the GPU only: there the
    kept bf16 case already runs the fp32 arithmetic through the interpreter (the same kernels
    and tile products on bf16-rounded inputs)."""
    out = []
    for dt in dtypes:
        for feat in features:
            for size in sizes:
                p = pytest.param(*dt.values, *feat.values, *size.values,
                                 marks=[*dt.marks, *feat.marks, *size.marks], id=f"{dt.id}-{feat.id}-{size.id}")
                p = cpu_bf16_gpu_marked(p, keep=feat.id in bf16_on_cpu)
                if (feat.id in fp32_off_cpu and torch.float32 in p.values
                        and not any(m.name == "gpu" for m in p.marks)):
                    p = pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.gpu])
                out.append(p)
    return out


def make_inputs(sizes, kw, dtype, device, seed=0):
    """Random q, k, v and flash_attn_func kwargs (alibi spec -> slopes tensor)."""
    B, Lq, Lk, Hq, Hk, D = sizes
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype).to(device)

    q, k, v = r(B, Lq, Hq, D), r(B, Lk, Hk, D), r(B, Lk, Hk, D)
    kw = dict(kw)
    if "alibi" in kw:
        kw["alibi_slopes"] = (torch.rand(*kw.pop("alibi"), generator=g) * 0.5).to(device)
    return q, k, v, kw
