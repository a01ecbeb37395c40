"""transformers integration, the generation loop and the demo (tiny random-weight Llama)."""

import random

import pytest
import torch

import bitstable

transformers = pytest.importorskip("transformers")

from bitstable.cli import demo  # noqa: E402
from bitstable.cli.demo import attention_experiment, build_model, run_demo  # noqa: E402
from bitstable.integrations.generate import Engine, Request, recompute_logprobs  # noqa: E402

#: demo.SIZES["tiny"] narrowed for the interpreter, whose time goes to the matmuls' tiles:
#: still two layers, GQA (2 query heads, 1 kv head, head dim 16), an MLP wider than the
#: model and the vocabulary of 97 (a ragged last tile), at about a quarter of the tiny
#: model's matmul tile products.
MICRO = dict(demo.SIZES["tiny"], hidden_size=32, intermediate_size=64, num_attention_heads=2,
             num_key_value_heads=1)


@pytest.fixture(scope="module")
def tiny():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(demo.SIZES, "micro", MICRO)
        return build_model("micro", seed=0)


def test_hf_cache_decode_equals_the_full_forward(tiny):
    """attn_implementation="bitstable" with transformers' own DynamicCache: logits of a
    token-by-token decode equal one full-sequence forward's, bitwise (batch-invariant mode on)."""
    ids = torch.tensor([[5, 17, 3, 42, 8, 60, 1]], device=next(tiny.parameters()).device)
    with torch.inference_mode(), bitstable.set_batch_invariant_mode():
        full = tiny(input_ids=ids, use_cache=False).logits[0]
        out = tiny(input_ids=ids[:, :3], use_cache=True)
        steps, past = [out.logits[0]], out.past_key_values
        for t in range(3, ids.shape[1]):
            out = tiny(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits[0])
            past = out.past_key_values
    assert torch.equal(torch.cat(steps), full)


def test_engine_is_batch_invariant_and_training_equals_sampling(tiny):
    """The same requests generated with batch caps of 1 and of 4 (other requests around,
    shuffled rows) give identical tokens and log-probabilities, which one full forward
    reproduces bitwise."""
    reqs = [Request(0, [3, 9, 27], 4), Request(1, [1, 2], 3, temperature=1.0, seed=11),
            Request(2, [50, 40, 30, 20, 10], 4, temperature=0.7, seed=5)]
    alone = Engine(tiny, max_batch=4, capacity=12).run(reqs, lambda: 1)
    rng = random.Random(0)
    mixed = Engine(tiny, max_batch=4, capacity=12).run(reqs, lambda: rng.randint(1, 4), order=rng)
    for r in reqs:
        assert alone[r.id].tokens == mixed[r.id].tokens
        assert torch.equal(alone[r.id].logprob_tensor(), mixed[r.id].logprob_tensor())
        assert torch.equal(recompute_logprobs(tiny, mixed[r.id]), mixed[r.id].logprob_tensor())
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        Engine(tiny, max_batch=2, capacity=4).run([Request(9, [1, 2, 3], 5)], lambda: 1)


def test_demo_counts_one_unique_completion_and_equal_logprobs(capsys, monkeypatch):
    """run_demo's three experiments and its table, stock and bitstable, on a one-layer
    MICRO model and a small workload (3 copies of a 3-token prompt and 1 other request,
    2 new tokens, batches of 1..3).  That the Engine's tokens and log-probabilities do
    not depend on the batch and equal one full forward's, on two layers and more tokens,
    is test_engine_is_batch_invariant_and_training_equals_sampling's."""
    monkeypatch.setitem(demo.SIZES, "micro", dict(MICRO, num_hidden_layers=1))
    res = run_demo(n=3, new_tokens=2, prompt_len=3, max_batch=3, size="micro",
                   implementations=("stock", "bitstable"))
    b = res["bitstable"]
    assert b["unique"] == 1 and b["completions"] == 3
    assert b["logprobs_equal"] == b["sequences"] == 4      # 3 copies + 1 other request
    assert res["stock"]["completions"] == 3 and res["stock"]["tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "| bitstable | 1 of 3 | 4 of 4 |" in out and "generate [" in out


def test_attention_experiment_reports_one_output_per_batch_size_for_bitstable():
    res = attention_experiment("bitstable", seq_len=24, num_heads=2, head_dim=16, num_iterations=3,
                               batch_sizes=(1, 3))
    assert res["bitstable"] == {1: 1, 3: 1, "all": 1}


def test_register_batch_invariant_attention_routes_sdpa():
    device = bitstable._backend.kernel_device_type()
    q, k, v = (torch.randn(3, 2, 20, 16, dtype=torch.float16).to(device) for _ in range(3))
    bitstable.register_batch_invariant_attention()
    try:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        alone = torch.nn.functional.scaled_dot_product_attention(q[1:2], k[1:2], v[1:2], is_causal=True)
    finally:
        bitstable.unregister_batch_invariant_attention()
    ref = bitstable.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    assert torch.equal(out, ref.transpose(1, 2)) and torch.equal(alone, out[1:2])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_sequence_its_bits_alone(tiny, side):
    """transformers pads a batch and passes a padding mask: each sequence's logits (valid
    positions) equal the sequence run alone, unpadded, bitwise."""
    dev = next(tiny.parameters()).device
    seqs = [[5, 17, 3, 42, 8, 60, 1], [9, 2, 33], [70, 71, 72, 73, 74]]
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.inference_mode(), bitstable.set_batch_invariant_mode():
        batch = tiny(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                     use_cache=False).logits
        for i, s in enumerate(seqs):
            alone = tiny(input_ids=torch.tensor([s], device=dev), use_cache=False).logits[0]
            sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
            assert torch.equal(batch[i, sl], alone), f"sequence {i} differs padded ({side}) vs alone"
