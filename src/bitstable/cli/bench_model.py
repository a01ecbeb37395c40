"""``bitstable bench --passes model``: a Llama-style model, bitstable next to stock PyTorch, in one process.

A transformers ``LlamaForCausalLM`` with random weights from a fixed seed
(``demo.build_model``: "1b" on the GPU, about 1.1B parameters, 32 query / 4 KV heads,
bf16; "tiny" under the interpreter, float32) is run three ways:

* **train**: one training step (forward, cross-entropy on shifted labels, backward; no
  optimizer step) at each (batch, length).  Stock = ``attn_implementation="sdpa"`` with
  PyTorch's own kernels; bitstable = ``attn_implementation="bitstable"`` inside
  ``set_batch_invariant_mode()``.  Eager (part "train"), and under ``torch.compile``
  (part "compile": one compiled wrapper per implementation, static shapes; the
  interpreter cannot be compiled, so CPU runs record those rows as skipped).  ms per
  step (median of the timed steps after warm-up, synchronized wall clock) and
  ``identical_runs``: the number of distinct gradient sets (every parameter's grad,
  compared bit for bit) over ``runs`` identical steps from the same weights and inputs.
* **generate**: greedy generation of a fixed number of new tokens at each batch size,
  through ``bitstable.integrations.generate.Engine`` (``deterministic=True`` vs ``False``, the stock
  kernels) and through transformers' ``model.generate`` ("bitstable" + the mode vs
  "sdpa").  Tokens/s (median run) and the number of distinct outputs (tokens and
  log-probabilities / logits, bit for bit) over ``runs`` identical runs.
* **overhead**: host cost per eager call on tiny inputs (back-to-back calls timed with
  ``time.perf_counter``, one synchronize at the end, so the GPU waits for Python):
  attention forward, forward + backward, a KV-cache decode step (cache_seqlens as int,
  CPU tensor, device tensor; with whether the call syncs the host, through
  ``torch.cuda.set_sync_debug_mode("error")``), matmul, ``a @ w``, softmax and the norms
  under the mode, each next to the stock op.

``ratio_vs_stock`` > 1 means bitstable is faster (stock ms / bitstable ms, bitstable
tokens/s / stock tokens/s, stock us / bitstable us).  Under the interpreter every time
is Triton-interpreter CPU execution and says nothing about the GPU; the CPU run only
exercises the code paths (and the bitwise counts, which hold there too).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _backend

PARTS = ("train", "compile", "generate", "overhead")

#: GPU sizes: (batch, length) of the training step, generation batches, prompt and new tokens.
GPU_SIZES = dict(size="1b", train_shapes=((4, 2048), (16, 512)), gen_batches=(1, 8, 64),
                 prompt_len=128, new_tokens=64, runs=3, train_warmup=2, gen_warmup=1,
                 overhead_calls=200, overhead_repeats=5, overhead_warmup=20)
#: Interpreter sizes: tiny model, few steps (every kernel call runs through Python).
CPU_SIZES = dict(size="tiny", train_shapes=((2, 8),), gen_batches=(1, 2),
                 prompt_len=8, new_tokens=4, runs=3, train_warmup=0, gen_warmup=0,
                 overhead_calls=2, overhead_repeats=1, overhead_warmup=1)

TRAIN_COVERS = ("one training step: forward, cross-entropy on shifted labels (fp32 logits), backward "
                "into every parameter's grad; stock = attn 'sdpa', PyTorch kernels; bitstable = attn "
                "'bitstable' inside set_batch_invariant_mode(); identical_runs = distinct gradient sets "
                "(all parameter grads, bitwise) over `runs` identical steps")
TRAIN_NOT_COVERED = ("optimizer step, autocast/mixed precision, gradient accumulation; batch invariance "
                     "(each row runs one batch; `bitstable verify` checks it)")
COMPILE_NOT_COVERED = ("; torch.compile: the mode's matmuls, norms, softmaxes and reductions over dims are "
                       "bitstable custom ops in the compiled graph (ops/traced.py); elementwise code, "
                       "embedding backward and full reductions (sum()/mean() with no dim) are inductor's "
                       "kernels; causal mask 'skip': no [B, 1, L, L] mask, as in eager "
                       "(before torch 2.14 transformers builds one under torch.compile; 'transformers' keeps it, "
                       "and bitstable's attention then reads it on the host through graph breaks)")
ENGINE_COVERS = ("bitstable.integrations.generate.Engine: each request prefilled alone, then decoded in one batch of B, "
                 "greedy; stock = Engine(deterministic=False): the same loop on stock kernels (SDPA over "
                 "bitstable's KV cache, cuBLAS/ATen); bitstable = deterministic=True; identical_runs = "
                 "distinct (tokens, log-probs) over `runs` identical runs")
HF_COVERS = ("transformers model.generate, greedy (min_new_tokens = max_new_tokens, DynamicCache, no "
             "padding); stock = attn 'sdpa'; bitstable = attn 'bitstable' inside set_batch_invariant_mode(); "
             "identical_runs = distinct (tokens, per-step logits) over `runs` identical runs")
GEN_NOT_COVERED = ("sampling at temperature > 0, padded/ragged prompts, requests joining mid-run, batch "
                   "invariance across batch sizes (`bitstable demo` covers those)")
OVERHEAD_COVERS = ("host time per eager call on tiny inputs: `calls` back-to-back calls, one synchronize "
                   "at the end, median over `repeats` of the per-call mean")


# ----------------------------------------------------------------------------- helpers

def _sync() -> None:
    if not _backend.interpreting():
        torch.cuda.synchronize()


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its element size (bitwise equality, NaN-safe)."""
    t = t.detach()
    if not t.is_floating_point() and not t.is_complex():
        return t
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(as_int)


class Distinct:
    """Counts distinct outputs among those added, each a sequence of tensors compared bit
    for bit (exact: no hash).  Keeps one copy of each distinct output on its device."""

    def __init__(self):
        self.seen: List[List[torch.Tensor]] = []
        self.added = 0

    def add(self, tensors: Sequence[torch.Tensor]) -> None:
        bits = [_bits(t) for t in tensors]
        self.added += 1
        for s in self.seen:
            if len(s) == len(bits) and all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                                           for a, b in zip(s, bits)):
                return
        self.seen.append([b.clone() for b in bits])

    @property
    def count(self) -> int:
        return len(self.seen)


def _set_attn(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:   # older transformers: the layers read the shared config at call time
        model.config._attn_implementation = name


#: Attention names for the compile rows with the causal mask skipped (see _compile_attention).
COMPILE_ATTENTION = {"stock": "bench_sdpa_causal", "bitstable": "bench_bitstable_causal"}


def _compile_attention(impl: str, causal_mask: str) -> str:
    """The attn_implementation of a compile row.  Eager transformers skips the causal mask of
    an unpadded batch (SDPA's ``is_causal``, bitstable's causal kernels); under torch.compile
    before torch 2.14 it cannot tell it is not exporting and builds a [B, 1, L, L] bool mask
    instead (SDPA then leaves flash for a masked backend, bitstable reads the mask on the host
    through graph breaks).  ``causal_mask="skip"`` registers the same attention functions under
    names whose mask function returns None, as eager does for these inputs (no padding);
    ``"transformers"`` keeps "sdpa" / "bitstable" and whatever mask transformers builds."""
    if causal_mask == "transformers":
        return "sdpa" if impl == "stock" else "bitstable"
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    from ..integrations.transformers import bitstable_attention_forward

    def no_mask(*args, **kwargs):
        return None

    name = COMPILE_ATTENTION[impl]
    AttentionInterface.register(name, sdpa_attention_forward if impl == "stock" else bitstable_attention_forward)
    AttentionMaskInterface.register(name, no_mask)
    return name


def _impl_context(impl: str):
    """stock: PyTorch's kernels; bitstable: deterministic attention + the batch-invariant mode."""
    from ..ops.batch_invariant import set_batch_invariant_mode
    from ..mode import set_deterministic

    stack = contextlib.ExitStack()
    if impl == "bitstable":
        stack.enter_context(set_deterministic(True))
        stack.enter_context(set_batch_invariant_mode())
    return stack


def _free() -> None:
    if not _backend.interpreting():
        torch.cuda.empty_cache()


class _Progress:
    def __init__(self, total: int, stream):
        self.total, self.stream, self.i, self.t0 = total, stream, 0, time.time()

    def __call__(self, what: str) -> None:
        self.i += 1
        print(f"[model {self.i}/{self.total}] {what} ({time.time() - self.t0:.0f}s)", file=self.stream, flush=True)


# ----------------------------------------------------------------------------- train

def _train_step(fn, model, ids: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    logits = fn(input_ids=ids, use_cache=False).logits
    V = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach()


def _time_train(fn, model, ids, impl: str, warmup: int, runs: int) -> Dict:
    """Warm-up steps, then ``runs`` timed steps; each timed step's grads go into a Distinct."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen = Distinct()
    times = []
    first_s = None
    with _impl_context(impl):
        for w in range(warmup):
            _sync()
            t = time.perf_counter()
            _train_step(fn, model, ids)
            _sync()
            if w == 0:
                first_s = time.perf_counter() - t
        for _ in range(runs):
            _sync()
            t = time.perf_counter()
            _train_step(fn, model, ids)
            _sync()
            times.append((time.perf_counter() - t) * 1e3)
            seen.add([p.grad if p.grad is not None else torch.zeros(0) for p in params])
    model.zero_grad(set_to_none=True)
    return dict(ms=statistics.median(times), times_ms=times, distinct=seen.count, first_step_s=first_s)


def bench_train(model, shapes: Sequence[Tuple[int, int]], runs: int, warmup: int,
                progress: Callable[[str], None], seed: int = 0, modes: Sequence[str] = ("eager", "compile"),
                causal_mask: str = "skip") -> List[Dict]:
    """Rows for each mode ("eager", "compile") and (batch, length); compile rows under the
    interpreter are recorded as skipped, with the reason.  ``causal_mask``: see
    :func:`_compile_attention`."""
    if causal_mask not in ("skip", "transformers"):
        raise ValueError(f"causal_mask is 'skip' or 'transformers', got {causal_mask!r}")
    device = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    V = model.config.vocab_size
    compiled: Dict[str, Callable] = {}
    skip_compile = None
    if _backend.interpreting():
        skip_compile = ("Triton's interpreter (CPU run) cannot be compiled: torch.compile rows run on the "
                        "GPU only")
    rows = []
    model.train()
    try:
        for mode in modes:
            for B, L in shapes:
                progress(f"train {mode} B={B} L={L}")
                row = dict(part="train", case=f"train {mode}", mode=mode, B=B, L=L, tokens=B * L, dtype=dtype,
                           runs=runs, warmup=warmup, covers=TRAIN_COVERS,
                           not_covered=TRAIN_NOT_COVERED + (COMPILE_NOT_COVERED if mode == "compile" else ""),
                           stock_ms=None, bitstable_ms=None, ratio_vs_stock=None,
                           stock_identical_runs=None, bitstable_identical_runs=None, status="ok")
                if mode == "compile":
                    row["causal_mask"] = causal_mask
                if mode == "compile" and skip_compile:
                    row.update(status="skipped", reason=skip_compile)
                    rows.append(row)
                    continue
                g = torch.Generator(device="cpu").manual_seed(seed + 1000 * B + L)
                ids = torch.randint(0, V, (B, L), generator=g).to(device)
                errors = {}
                for impl in ("stock", "bitstable"):
                    try:
                        if mode == "compile":
                            row[f"{impl}_attn"] = _compile_attention(impl, causal_mask)
                        else:
                            row[f"{impl}_attn"] = "sdpa" if impl == "stock" else "bitstable"
                        _set_attn(model, row[f"{impl}_attn"])
                        if mode == "compile":
                            if impl not in compiled:   # static shapes: each (B, L) compiles its own graph
                                compiled[impl] = torch.compile(model, dynamic=False)
                            fn = compiled[impl]
                        else:
                            fn = model
                        res = _time_train(fn, model, ids, impl, warmup, runs)
                    except Exception as e:  # noqa: BLE001 - recorded in the row, not hidden
                        errors[impl] = _error(e)
                        model.zero_grad(set_to_none=True)
                        _free()
                        continue
                    row[f"{impl}_ms"] = res["ms"]
                    row[f"{impl}_times_ms"] = res["times_ms"]
                    row[f"{impl}_identical_runs"] = res["distinct"]
                    row[f"{impl}_first_step_s"] = res["first_step_s"]
                    row[f"{impl}_tokens_per_s"] = B * L / (res["ms"] * 1e-3)
                if errors:
                    row.update(status="failed", errors=errors)
                if row["stock_ms"] and row["bitstable_ms"]:
                    row["ratio_vs_stock"] = row["stock_ms"] / row["bitstable_ms"]
                rows.append(row)
                del ids
                _free()
    finally:
        _set_attn(model, "bitstable")
        model.eval()
        model.zero_grad(set_to_none=True)
        if compiled:
            from torch import _dynamo

            compiled.clear()
            _dynamo.reset()            # drop the compiled graphs: later parts run eager
    return rows


# ----------------------------------------------------------------------------- generate

def _prompts(B: int, P: int, V: int, seed: int) -> List[List[int]]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    # token ids from 3 up: clear of the config's bos/eos/pad ids (1, 2, 0)
    return torch.randint(3, V, (B, P), generator=g).tolist()


def _time_runs(run: Callable[[], List[torch.Tensor]], warmup: int, runs: int) -> Dict:
    seen = Distinct()
    times = []
    out = None
    for _ in range(warmup):
        run()
    for _ in range(runs):
        _sync()
        t = time.perf_counter()
        out = run()
        _sync()
        times.append(time.perf_counter() - t)
        seen.add(out)
    return dict(s=statistics.median(times), times_s=times, distinct=seen.count, tokens=out[0])


def _engine_run(engine, prompts, new_tokens):
    from ..integrations.generate import Request

    reqs = [Request(i, p, new_tokens, temperature=0.0) for i, p in enumerate(prompts)]

    def run():
        done = engine.run(reqs, lambda: len(reqs))
        toks = torch.tensor([done[i].tokens for i in range(len(reqs))])
        lps = torch.stack([done[i].logprob_tensor() for i in range(len(reqs))])
        return [toks, lps]
    return run


def _hf_run(model, prompts, new_tokens):
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
        toks = out.sequences[:, ids.shape[1]:].cpu()
        logits = torch.stack(out.logits) if out.logits else torch.zeros(0)
        return [toks, logits]
    return run


def bench_generate(model, batches: Sequence[int], prompt_len: int, new_tokens: int, runs: int, warmup: int,
                   progress: Callable[[str], None], seed: int = 0) -> List[Dict]:
    from ..integrations.generate import Engine

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    V = model.config.vocab_size
    rows = []
    model.eval()
    try:
        for api in ("engine", "hf_generate"):
            for B in batches:
                progress(f"generate {api} B={B} prompt={prompt_len} new={new_tokens}")
                prompts = _prompts(B, prompt_len, V, seed + B)
                row = dict(part="generate", case="Engine" if api == "engine" else "HF generate", api=api, B=B,
                           prompt_len=prompt_len, new_tokens=new_tokens, dtype=dtype, runs=runs, warmup=warmup,
                           covers=ENGINE_COVERS if api == "engine" else HF_COVERS, not_covered=GEN_NOT_COVERED,
                           stock_tokens_per_s=None, bitstable_tokens_per_s=None, ratio_vs_stock=None,
                           stock_identical_runs=None, bitstable_identical_runs=None, status="ok")
                errors, tokens = {}, {}
                for impl in ("stock", "bitstable"):
                    try:
                        if api == "engine":
                            _set_attn(model, "bitstable")
                            engine = Engine(model, max_batch=B, capacity=prompt_len + new_tokens,
                                            deterministic=impl == "bitstable")
                            run = _engine_run(engine, prompts, new_tokens)
                            res = _time_runs(run, warmup, runs)   # Engine sets its own kernels
                            del engine
                        else:
                            _set_attn(model, "sdpa" if impl == "stock" else "bitstable")
                            with _impl_context(impl):
                                res = _time_runs(_hf_run(model, prompts, new_tokens), warmup, runs)
                    except Exception as e:  # noqa: BLE001 - recorded in the row, not hidden
                        errors[impl] = _error(e)
                        _free()
                        continue
                    finally:
                        _set_attn(model, "bitstable")
                    row[f"{impl}_tokens_per_s"] = B * new_tokens / res["s"]
                    row[f"{impl}_ms"] = res["s"] * 1e3
                    row[f"{impl}_times_s"] = res["times_s"]
                    row[f"{impl}_identical_runs"] = res["distinct"]
                    tokens[impl] = res["tokens"]
                if errors:
                    row.update(status="failed", errors=errors)
                if row["stock_tokens_per_s"] and row["bitstable_tokens_per_s"]:
                    row["ratio_vs_stock"] = row["bitstable_tokens_per_s"] / row["stock_tokens_per_s"]
                if len(tokens) == 2:
                    row["same_tokens_as_stock"] = bool(torch.equal(tokens["stock"], tokens["bitstable"]))
                rows.append(row)
                _free()
    finally:
        _set_attn(model, "bitstable")
    return rows


# ----------------------------------------------------------------------------- overhead

#: Tiny inputs: (attention B, L, H, D), (decode cache length, Hq, Hkv, D), (matmul M, N, K), (rows, cols).
GPU_OVERHEAD_SHAPES = dict(attn=(1, 128, 8, 64), decode=(4096, 32, 8, 128), mm=(8, 4096, 4096), rows=(8, 4096))
CPU_OVERHEAD_SHAPES = dict(attn=(1, 16, 2, 16), decode=(64, 4, 2, 16), mm=(8, 64, 64), rows=(8, 64))


def _per_call_us(fn: Callable, calls: int, repeats: int, warmup: int) -> Tuple[float, float]:
    """(median, min) over ``repeats`` of the mean time per call of ``calls`` back-to-back
    calls with one synchronize at the end, in microseconds."""
    for _ in range(warmup):
        fn()
    _sync()
    per = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        per.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(per), min(per)


def host_syncs(fn: Callable) -> Optional[bool]:
    """Whether one call of ``fn`` synchronizes the host with the device
    (``torch.cuda.set_sync_debug_mode("error")`` raises on a synchronizing call);
    None under the interpreter (no device)."""
    if _backend.interpreting():
        return None
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError as e:
        if "synchroniz" in str(e).lower():
            return True
        raise
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()


def _overhead_cases(dtype, shapes: Dict):
    """(name, shape text, bitstable fn, stock fn, bitstable context, note) per case."""
    from .. import ops
    from ..attention import flash_attn_func, flash_attn_with_kvcache
    from ..ops.batch_invariant import set_batch_invariant_mode

    device = _backend.kernel_device_type()
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s, grad=False):
        return torch.randn(*s, generator=g).to(dtype).to(device).requires_grad_(grad)

    F = torch.nn.functional
    mode = set_batch_invariant_mode
    none = contextlib.nullcontext
    cases = []

    B, L, H, D = shapes["attn"]
    q, k, v = r(B, L, H, D), r(B, L, H, D), r(B, L, H, D)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    shape = f"B{B} L{L} H{H} D{D} causal"
    cases.append(("attn fwd", shape, lambda: flash_attn_func(q, k, v, causal=True),
                  lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), none,
                  "flash_attn_func vs F.scaled_dot_product_attention (default backend choice)"))
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    qtg, ktg, vtg = (t.detach().clone().requires_grad_(True) for t in (qt, kt, vt))
    dout, dout_t = r(B, L, H, D), r(B, H, L, D)

    def fb_ours():
        return torch.autograd.grad(flash_attn_func(qg, kg, vg, causal=True), (qg, kg, vg), dout)

    def fb_stock():
        return torch.autograd.grad(F.scaled_dot_product_attention(qtg, ktg, vtg, is_causal=True),
                                   (qtg, ktg, vtg), dout_t)
    cases.append(("attn fwd+bwd", shape, fb_ours, fb_stock, none, "torch.autograd.grad of both (q, k, v grads)"))

    S, Hq, Hkv, Dd = shapes["decode"]
    kc, vc = r(1, S, Hkv, Dd), r(1, S, Hkv, Dd)
    qd, kn, vn = r(1, 1, Hq, Dd), r(1, 1, Hkv, Dd), r(1, 1, Hkv, Dd)
    kct, vct, qdt = kc.transpose(1, 2), vc.transpose(1, 2), qd.transpose(1, 2)

    def stock_decode():
        return F.scaled_dot_product_attention(qdt, kct, vct, enable_gqa=True)
    seqlens = {"int": S - 1, "CPU tensor": torch.full((1,), S - 1, dtype=torch.int32),
               "device tensor": torch.full((1,), S - 1, dtype=torch.int32, device=device)}
    for how, lens in seqlens.items():
        note = ("one new token appended at position S-1 and attended (B1); stock: SDPA of the one query over "
                "the cache (no append, no length bookkeeping)")
        if how == "device tensor" and device == "cpu":
            note += "; under the interpreter the device is the CPU, so this equals the CPU-tensor case"
        cases.append((f"kvcache decode (cache_seqlens {how})", f"B1 cache {S} Hq{Hq} Hkv{Hkv} D{Dd}",
                      (lambda lens=lens: flash_attn_with_kvcache(qd, kc, vc, k=kn, v=vn, cache_seqlens=lens,
                                                                 causal=True)),
                      stock_decode, none, note))

    M, N, K = shapes["mm"]
    a, wt = r(M, K), r(N, K).t()        # B = weight.t(), as F.linear sees it
    cases.append(("ops.mm", f"{M}x{N}x{K} B=weight.t()", lambda: ops.mm(a, wt), lambda: torch.mm(a, wt), none,
                  "bitstable.ops.mm vs torch.mm"))
    cases.append(("a @ w (mode)", f"{M}x{N}x{K} w=weight.t()", lambda: a @ wt, lambda: a @ wt, mode,
                  "aten::mm through the dispatcher: inside set_batch_invariant_mode vs outside"))
    R, C = shapes["rows"]
    x, w, b = r(R, C), r(C), r(C)
    cases.append(("softmax (mode)", f"{R}x{C}", lambda: torch.softmax(x, -1), lambda: torch.softmax(x, -1), mode,
                  "torch.softmax inside the mode vs outside"))
    cases.append(("rms_norm (mode)", f"{R}x{C}", lambda: F.rms_norm(x, (C,), w), lambda: F.rms_norm(x, (C,), w),
                  mode, "F.rms_norm inside the mode vs outside"))
    cases.append(("layer_norm (mode)", f"{R}x{C}", lambda: F.layer_norm(x, (C,), w, b),
                  lambda: F.layer_norm(x, (C,), w, b), mode, "F.layer_norm inside the mode vs outside"))
    return cases


N_OVERHEAD_CASES = 10


def bench_overhead(dtype, calls: int, repeats: int, warmup: int, progress: Callable[[str], None],
                   shapes: Optional[Dict] = None) -> List[Dict]:
    shapes = shapes or (CPU_OVERHEAD_SHAPES if _backend.interpreting() else GPU_OVERHEAD_SHAPES)
    rows = []
    for name, shape, ours, stock, ctx, note in _overhead_cases(dtype, shapes):
        progress(f"overhead {name} {shape}")
        row = dict(part="overhead", case=name, shape=shape, dtype=str(dtype).replace("torch.", ""), calls=calls,
                   repeats=repeats, warmup=warmup, covers=OVERHEAD_COVERS + "; " + note,
                   not_covered="kernel time (see the ops/decode passes: CUDA-graph replays); CUDA-graph capture",
                   bitstable_us=None, stock_us=None, ratio_vs_stock=None, ratio_bitstable_over_stock=None,
                   status="ok")
        errors = {}
        for impl, fn, c in (("stock", stock, contextlib.nullcontext), ("bitstable", ours, ctx)):
            try:
                with c():
                    med, low = _per_call_us(fn, calls, repeats, warmup)
                    row[f"{impl}_us"], row[f"{impl}_min_us"] = med, low
                    row[f"{impl}_host_sync"] = host_syncs(fn)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                errors[impl] = _error(e)
        if errors:
            row.update(status="failed", errors=errors)
        if row["bitstable_us"] and row["stock_us"]:
            row["ratio_vs_stock"] = row["stock_us"] / row["bitstable_us"]
            row["ratio_bitstable_over_stock"] = row["bitstable_us"] / row["stock_us"]
        rows.append(row)
    _free()
    return rows


# ----------------------------------------------------------------------------- the pass

def default_sizes() -> Dict:
    return dict(CPU_SIZES if _backend.interpreting() else GPU_SIZES)


def bench_model(size: Optional[str] = None, model_path: Optional[str] = None,
                config: Optional[Dict] = None, train_shapes: Optional[Sequence[Tuple[int, int]]] = None,
                gen_batches: Optional[Sequence[int]] = None, prompt_len: Optional[int] = None,
                new_tokens: Optional[int] = None, runs: Optional[int] = None, train_warmup: Optional[int] = None,
                gen_warmup: Optional[int] = None, overhead_calls: Optional[int] = None,
                overhead_repeats: Optional[int] = None, overhead_warmup: Optional[int] = None,
                overhead_shapes: Optional[Dict] = None, parts: Sequence[str] = PARTS, seed: int = 0,
                compile_causal_mask: str = "skip", progress=None) -> List[Dict]:
    """The model pass: rows (``pass_="model"``) of the parts asked for.  Unset sizes take
    the device's defaults (GPU_SIZES / CPU_SIZES); ``config`` overrides fields of the
    model size's LlamaConfig; ``compile_causal_mask``: how the compile rows get their causal
    mask (:func:`_compile_attention`); ``progress``: where the progress lines go (stderr)."""
    from .demo import build_model

    stream = progress or sys.stderr
    d = default_sizes()
    given = dict(size=size, train_shapes=train_shapes, gen_batches=gen_batches, prompt_len=prompt_len,
                 new_tokens=new_tokens, runs=runs, train_warmup=train_warmup, gen_warmup=gen_warmup,
                 overhead_calls=overhead_calls, overhead_repeats=overhead_repeats, overhead_warmup=overhead_warmup)
    d.update({k: v for k, v in given.items() if v is not None})
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"model pass parts are {PARTS}, got {bad}")
    n = 0
    modes = [m for m in ("eager", "compile") if ("train" if m == "eager" else "compile") in parts]
    n += len(modes) * len(d["train_shapes"])
    if "generate" in parts:
        n += 2 * len(d["gen_batches"])
    if "overhead" in parts:
        n += N_OVERHEAD_CASES
    prog = _Progress(n, stream)
    rows: List[Dict] = []
    model = None
    if modes or "generate" in parts:
        t = time.time()
        model = build_model(d["size"], model_path, seed=seed, config=config)
        params = sum(p.numel() for p in model.parameters())
        cfg = model.config
        what = f"checkpoint {model_path}" if model_path else f"Llama {d['size']} (random weights, seed {seed})"
        desc = (f"{what}, {params / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads, "
                f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
                f"{str(next(model.parameters()).dtype).replace('torch.', '')}")
        print(f"[model] {desc} (built in {time.time() - t:.0f}s)", file=stream, flush=True)
    try:
        if modes:
            for r in bench_train(model, d["train_shapes"], d["runs"], d["train_warmup"], prog, seed, modes,
                                 compile_causal_mask):
                rows.append(dict(r, pass_="model", model=desc))
        if "generate" in parts:
            for r in bench_generate(model, d["gen_batches"], d["prompt_len"], d["new_tokens"], d["runs"],
                                    d["gen_warmup"], prog, seed):
                rows.append(dict(r, pass_="model", model=desc))
        if "overhead" in parts:
            dtype = next(model.parameters()).dtype if model is not None else (
                torch.float32 if _backend.interpreting() else torch.bfloat16)
            model = None
            _free()
            for r in bench_overhead(dtype, d["overhead_calls"], d["overhead_repeats"], d["overhead_warmup"], prog,
                                    overhead_shapes):
                rows.append(dict(r, pass_="model"))
    finally:
        model = None
        _free()
    return rows


# ----------------------------------------------------------------------------- output

def _f(x, spec):
    return "n/a" if x is None else format(x, spec)


def _u(x, unit: str) -> str:
    return "n/a" if x is None else f"{x:.1f} {unit}"


def _x(ratio) -> str:
    return "n/a" if ratio is None else f"{ratio:.3g}x"


def _runs(r: Dict, impl: str) -> str:
    k = r.get(f"{impl}_identical_runs")
    return "n/a" if k is None else f"{k} of {r['runs']}"


def _status(r: Dict) -> str:
    if r["status"] == "skipped":
        return "skipped: " + r["reason"]
    if r["status"] == "failed":
        return "failed: " + "; ".join(f"{k}: {v.splitlines()[0][:200]}" for k, v in r["errors"].items())
    if r.get("mode") == "compile" and r.get("stock_first_step_s") is not None:
        return (f"ok; first step (compiles) stock {_f(r.get('stock_first_step_s'), '.0f')} s, "
                f"bitstable {_f(r.get('bitstable_first_step_s'), '.0f')} s")
    return "ok"


def model_table(rows: List[Dict]) -> str:
    """Train and generate rows as markdown (vs stock > 1: bitstable faster)."""
    lines = ["| part | case | B | L (prompt+new) | stock | bitstable | vs stock | distinct stock | distinct bitstable "
             "| status |", "|" + "|".join(["---"] * 10) + "|"]
    for r in rows:
        if r["part"] == "train":
            size = str(r["L"])
            cells = (_u(r["stock_ms"], "ms"), _u(r["bitstable_ms"], "ms"))
        elif r["part"] == "generate":
            size = f"{r['prompt_len']}+{r['new_tokens']}"
            cells = (_u(r["stock_tokens_per_s"], "tok/s"), _u(r["bitstable_tokens_per_s"], "tok/s"))
        else:
            continue
        case = r["case"] + (f" (causal mask: {r['causal_mask']})" if r.get("causal_mask") else "")
        lines.append(f"| {r['part']} | {case} | {r['B']} | {size} | {cells[0]} | {cells[1]} "
                     f"| {_x(r['ratio_vs_stock'])} | {_runs(r, 'stock')} | {_runs(r, 'bitstable')} "
                     f"| {_status(r)} |")
    return "\n".join(lines)


def overhead_table(rows: List[Dict]) -> str:
    """Host-overhead rows as markdown: us per eager call; bitstable/stock > 1: bitstable costs more."""
    def sync(x):
        return "n/a" if x is None else ("yes" if x else "no")
    lines = ["| op | shape | stock us/call | bitstable us/call | bitstable/stock | host sync (stock / bitstable) "
             "| compared | status |", "|" + "|".join(["---"] * 8) + "|"]
    for r in rows:
        if r["part"] != "overhead":
            continue
        lines.append(f"| {r['case']} | {r['shape']} | {_f(r['stock_us'], '.1f')} | {_f(r['bitstable_us'], '.1f')} "
                     f"| {_x(r['ratio_bitstable_over_stock'])} "
                     f"| {sync(r.get('stock_host_sync'))} / {sync(r.get('bitstable_host_sync'))} "
                     f"| {r['covers'].split('; ', 1)[-1]} | {_status(r)} |")
    return "\n".join(lines)


def model_tables(rows: List[Dict]) -> str:
    """Both tables with their headings and what the rows cover / do not cover."""
    out = []
    interp = _backend.interpreting()
    where = " Triton interpreter on CPU: times are interpreter execution, not GPU performance." if interp else ""
    main = [r for r in rows if r["part"] in ("train", "generate")]
    if main:
        model = main[0].get("model", "")
        out.append(f"Model pass: training step and generation, stock PyTorch vs bitstable ({model}).{where}\n\n"
                   + model_table(main))
        notes = []
        if any(r["part"] == "train" for r in main):
            notes += [f"- train: {TRAIN_COVERS}. Not covered: {TRAIN_NOT_COVERED}.",
                      f"- train compile: as train{COMPILE_NOT_COVERED}."]
        if any(r.get("api") == "engine" for r in main):
            notes.append(f"- generate Engine: {ENGINE_COVERS}. Not covered: {GEN_NOT_COVERED}.")
        if any(r.get("api") == "hf_generate" for r in main):
            notes.append(f"- generate HF: {HF_COVERS}. Not covered: {GEN_NOT_COVERED}.")
        out.append("\n".join(notes))
    over = [r for r in rows if r["part"] == "overhead"]
    if over:
        out.append(f"Host overhead per eager call ({over[0]['dtype']}; {OVERHEAD_COVERS}; "
                   f"{over[0]['calls']} calls x {over[0]['repeats']} repeats).{where}\n\n" + overhead_table(over))
    return "\n\n".join(out)


def plot_model(rows: List[Dict], ax) -> None:
    """Bars of ratio_vs_stock per row (1.0 = parity; skipped/failed rows have no bar)."""
    colors = {"train": "tab:blue", "generate": "tab:orange", "overhead": "tab:green"}
    labels = []
    for r in rows:
        if r["part"] == "train":
            labels.append(f"{r['case']}\nB{r['B']} L{r['L']}")
        elif r["part"] == "generate":
            labels.append(f"{r['case']}\nB{r['B']}")
        else:
            labels.append(r["case"].replace(" (", "\n("))
    vals = [r.get("ratio_vs_stock") or 0.0 for r in rows]
    ax.bar(range(len(rows)), vals, color=[colors.get(r["part"], "tab:gray") for r in rows])
    for i, r in enumerate(rows):
        if r.get("ratio_vs_stock") is None:
            ax.text(i, 0.02, r["status"], rotation=90, ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("speed vs stock (model)")
