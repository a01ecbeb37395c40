"""A tensor-parallel invariance harness: a tiny Llama run at TP=1 in this process and at
TP=t in t spawned processes over gloo (CPU) or NCCL (GPUs), returning what each computed.

Used by tests/test_tensor_parallel.py; ``run_tp`` spawns fresh processes (they inherit
the environment, so ``PYTHONPATH`` reaches them) and fails with ``TimeoutError``
instead of hanging when a collective does not complete.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Optional

import torch

#: The tiny model of the CPU tests: 2 layers, GQA (8 query heads, 4 key/value heads, head
#: dim 8), so TP=4 still holds whole key/value groups; fp32 (the interpreter's 16-bit
#: tl.dot is not exact).  The MLP width 128 keeps a rank's slice of a token's MLP
#: activations (128/4 = 32 floats) a whole number of PyTorch's CPU vector steps: CPU
#: elementwise kernels compute the body of a tensor with vector code (SLEEF's exp) and
#: the tail past the last 2 x vector width (32 floats on AVX-512) with scalar code
#: (std::exp), so silu of a 16-float slice is not bitwise silu of the same 16 floats
#: inside 64 (measured on this machine; CUDA elementwise kernels run the same code on
#: every element).  That is a CPU-only caveat of the test, not of the tree.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=2, head_dim=8,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
            initializer_range=0.1, tie_word_embeddings=False)


def tiny_llama(seed: int = 0, dtype=torch.float32, device: Optional[str] = None, **overrides):
    """A random-weight LlamaForCausalLM (the same weights in every process for one seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    if device is not None:
        model = model.to(device)
    return model


def inputs(seed: int = 1, seq: int = 8, vocab: int = TINY["vocab_size"], device=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    return ids.to(device) if device is not None else ids


def run_step(model, ids, tp_tree: Optional[int], decode_from: Optional[int] = None) -> dict:
    """One training step's logits, loss and parameter gradients (the model's own
    parameter names; sharded ones hold this rank's slice), and with ``decode_from`` the
    logits of a KV-cache prefill of ``ids[:, :decode_from]`` (its last position) and a
    decode of each later token but the last, all under the batch-invariant mode with the
    K tree ``tp_tree``.  By chunking and batch invariance the decode logits are the
    training forward's ``logits[:, decode_from - 1:-1]``, bitwise."""
    import bitstable

    out = {}
    model.zero_grad(set_to_none=True)
    with bitstable.set_batch_invariant_mode(tp_tree=tp_tree):
        res = model(input_ids=ids, labels=ids, use_cache=False)
        res.loss.backward()
        out["logits"] = res.logits.detach().clone()
        out["loss"] = res.loss.detach().clone()
        out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if decode_from is not None:
            with torch.no_grad():
                r = model(input_ids=ids[:, :decode_from], use_cache=True)
                steps, cache = [r.logits[:, -1]], r.past_key_values
                for t in range(decode_from, ids.shape[1] - 1):
                    r = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                    steps.append(r.logits[:, -1])
                    cache = r.past_key_values
            out["decode"] = torch.stack(steps, 1)
            out["decode_from"] = decode_from
    model.zero_grad(set_to_none=True)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_collectives(rank: int, world: int, device) -> dict:
    """On this rank: ``sharded_k_mm`` of a product whose K is sharded over the group, with
    the all-gather and with the tree reduce-scatter (an element count that is not a
    multiple of the group size: the padding), against the one-process ``tree_mm`` of the
    whole K.  {name: bitwise equal}."""
    from .. import ops
    from .layers import TPConfig, sharded_k_mm

    g = torch.Generator().manual_seed(11)
    out = {}
    for dtype in (torch.float32, torch.float16):
        a = torch.randn(5, 64, generator=g).to(dtype)
        b = torch.randn(64, 7, generator=g).to(dtype)
        if device is not None:
            a, b = a.to(device), b.to(device)
        full = ops.tree_mm(a, b, 4)
        k = 64 // world
        mine = a[:, rank * k:(rank + 1) * k], b[rank * k:(rank + 1) * k]
        for collective in ("all_gather", "reduce_scatter"):
            got = sharded_k_mm(*mine, TPConfig.make(None, 4, "tree", collective))
            out[f"{collective}:{dtype}"] = torch.equal(got, full)
    return out


def _worker(rank: int, world: int, port: int, outdir: str, job: dict) -> None:
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        backend = job.get("backend", "gloo")
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=job.get("collective_timeout", 60)))
        from . import shard_llama, shard_slices

        device = "cuda" if backend == "nccl" else None
        ids = inputs(job.get("input_seed", 1), job.get("seq", 8), device=device)
        results = {}
        if job.get("check_collectives"):
            results["collectives"] = _check_collectives(rank, world, device)
        for name, (tree, reduce, *collective) in job["runs"].items():
            model = tiny_llama(job.get("seed", 0), device=device, **job.get("overrides", {}))
            shard_llama(model, tp_tree=tree if reduce == "tree" else None, reduce=reduce,
                        collective=collective[0] if collective else "auto")
            decode = job.get("decode_from") if name not in job.get("no_decode", ()) else None
            results[name] = run_step(model, ids, tree if reduce == "tree" else None, decode)
            results[name]["slices"] = shard_slices(model)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_tp(world: int, job: dict, timeout: float = 120.0) -> list:
    """Run ``job`` in ``world`` spawned processes (one TP group); return each rank's results.

    ``job``: ``{"runs": {name: (tp_tree, "tree" | "all_reduce"[, collective])}, "seed",
    "input_seed", "seq", "decode_from", "no_decode" (run names that skip the decode), "overrides",
    "backend", "check_collectives"}``.  Raises ``TimeoutError`` (after killing the
    processes) when they do not finish within ``timeout`` seconds, ``RuntimeError`` with a
    rank's traceback when one fails."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, d, job), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        for p in alive:
            p.join(5)
        errs = [open(os.path.join(d, f)).read() for f in sorted(os.listdir(d)) if f.endswith(".err")]
        if errs:
            raise RuntimeError(f"TP={world}: a rank failed:\n" + errs[0])
        if alive:
            raise TimeoutError(f"TP={world}: {len(alive)} of {world} processes did not finish in {timeout:.0f} s")
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"TP={world}: processes exited with {bad}")
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def compare(ref: dict, ranks: list) -> list:
    """The names of every tensor (logits, loss, each gradient or its slice, the decode
    logits against ``ref``'s forward logits) where a TP run differs bitwise from the TP=1
    ``ref`` on any rank; [] means bitwise equal."""
    diffs = []
    for r, res in enumerate(ranks):
        for key in ("logits", "loss"):
            if not torch.equal(ref[key], res[key]):
                diffs.append(f"rank{r}:{key}")
        if "decode" in res:   # a KV-cache decode at TP=t against the TP=1 training forward
            d = res["decode_from"]
            if not torch.equal(ref["logits"][:, d - 1:-1], res["decode"]):
                diffs.append(f"rank{r}:decode")
        if set(ref["grads"]) != set(res["grads"]):
            diffs.append(f"rank{r}:grad names {sorted(set(ref['grads']) ^ set(res['grads']))}")
        for name, g in res["grads"].items():
            full = ref["grads"].get(name)
            if full is None:
                continue
            if name in res["slices"]:
                dim, sl = res["slices"][name]
                full = full[sl] if dim == 0 else full[:, sl]
            if not torch.equal(full, g):
                diffs.append(f"rank{r}:grad:{name}")
    return diffs
