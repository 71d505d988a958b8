"""The fast rollout engine and its exact mode.

What users rely on:
* the fast engine samples what the recompute reference samples (same prompts, seeds, top-p, eos; ragged prompts),
  with the same routing, and in fp32 the same logprobs to float rounding;
* a finished row leaving the batch changes nothing for the others; the weight hand-over reaches the engine and keeps
  an fp32 gate;
* exact mode: a token's logprob and experts do not depend on the batch it is decoded in, nor on prefill vs decode,
  and the trainer's scoring through the same path equals them bit for bit (also after a weight update);
* the Triton kernels compute what their torch versions compute (on the CPU through Triton's interpreter);
* on a GPU (marked ``gpu``): CUDA-graph decode survives weight updates without re-capture, the greedy tokens equal
  the reference's, and exact mode is bit-identical in bf16 for both families.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtrain.models import Glm4MoeConfig, PrecisionPolicy, Qwen3MoeConfig, RoutingTrace, build_model
from mtrain.models.decoding import Decoder, score
from mtrain.models.generate import generate, rollout_layout
from mtrain.rl.engines import FastEngine, RecomputeEngine, RolloutRequest, SamplingConfig

SHAPES = {
    "qwen3_moe": Qwen3MoeConfig(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2),
    "glm4_moe": Glm4MoeConfig(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                              topk_group=1, first_k_dense_replace=1),
}
RAGGED = [[1, 5, 9, 3], [1, 7], [1, 4, 4, 8, 2, 6, 3, 3, 9], [1, 9, 9], [2], [1, 2, 3, 4, 5]]
# wide enough that the CPU's GEMMs round differently at different row counts (the plain decode then disagrees with
# the scoring, which is what exact mode must remove)
WIDE = dict(hidden_size=256, moe_intermediate_size=128, vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32)


def decisive(family, seed=0, dtype=torch.float32, device="cpu", policy=PrecisionPolicy(), wide=False):
    cfg = type(SHAPES[family])(**{**SHAPES[family].__dict__, **(WIDE if wide else {})})
    model = build_model(cfg, seed=seed, dtype=dtype, device=device, policy=policy).eval()
    with torch.no_grad():
        for _, router in model.routers():
            router.weight.normal_(0, 0.5)
    return model


def produced_routing(trace: RoutingTrace, gen) -> torch.Tensor:
    producing = slice(gen.first - 1, gen.first - 1 + gen.tokens.shape[1])
    return trace.stacked()[:, producing].masked_fill(~gen.mask[..., None, None], -1)


@pytest.mark.parametrize("family", list(SHAPES))
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.7)])
def test_fast_engine_samples_what_the_reference_samples(family, sampling):
    model = decisive(family)
    first = generate(model, RAGGED, max_new_tokens=9, seed=11, **sampling)
    eos = [int(first.tokens[0, 2]), int(first.tokens[3, 4])]  # tokens the rows do emit: rows stop at different steps
    ref = generate(model, RAGGED, max_new_tokens=9, eos_ids=eos, seed=11, **sampling)
    gen = Decoder(model).generate(RAGGED, max_new_tokens=9, eos_ids=eos, seed=11, **sampling)
    assert torch.equal(gen.tokens, ref.tokens) and torch.equal(gen.lengths, ref.lengths)
    assert (gen.lengths < 9).any()  # some rows stopped at eos (and left the batch)
    assert torch.equal(gen.routing, ref.routing) and torch.equal(gen.prompt_routing, ref.prompt_routing)
    torch.testing.assert_close(gen.logprobs, ref.logprobs, rtol=0, atol=2e-6)
    assert gen.width == ref.width and gen.prompts == ref.prompts


def test_seeds_draw_per_row_whatever_the_batch():
    """A row's draw is keyed by (seed, row, step): another seed changes it; the same prompt alone or in a batch of
    others (rows leaving at other times) gets the same tokens."""
    model = decisive("qwen3_moe")
    d = Decoder(model)
    a = d.generate(RAGGED, max_new_tokens=8, temperature=1.0, seed=5, eos_ids=[3])
    b = d.generate(RAGGED, max_new_tokens=8, temperature=1.0, seed=6, eos_ids=[3])
    assert not torch.equal(a.tokens, b.tokens)
    first = d.generate(RAGGED[:1], max_new_tokens=8, temperature=1.0, seed=5, eos_ids=[3])
    assert torch.equal(first.tokens[0, : first.lengths[0]], a.tokens[0, : a.lengths[0]])


def test_weight_hand_over_reaches_the_fast_engine_and_keeps_the_fp32_gate():
    policy = PrecisionPolicy(moe_gate_fp32=True, rope_fp32=True)
    trainer = decisive("glm4_moe", policy=policy, dtype=torch.bfloat16)
    engine = FastEngine(copy_of=trainer, policy=policy, exact=True)
    request = RolloutRequest(RAGGED, SamplingConfig(6, temperature=1.0), seed=3)
    before = engine.generate(request).gen
    with torch.no_grad():
        for _, router in trainer.routers():
            router.weight.mul_(-1.0)  # an update that changes the routing
    assert torch.equal(engine.generate(request).gen.tokens, before.tokens)  # no hand-over yet: old weights
    engine.sync(trainer)
    after = engine.generate(request).gen
    assert not torch.equal(after.routing, before.routing)
    gate = engine.model.routers()[0][1].weight
    assert gate.dtype == torch.float32 and torch.equal(gate, trainer.routers()[0][1].weight)
    assert torch.equal(score(trainer, after), after.logprobs)  # exact: the trainer's scoring of the new weights
    engine.model.routers()[0][1].weight.data = gate.data.bfloat16()  # what a careless weight sync does
    with pytest.raises(RuntimeError, match="gate"):
        engine.sync(trainer)


@pytest.mark.parametrize("family", list(SHAPES))
def test_exact_mode_is_invariant_to_the_batch_and_to_prefill_vs_decode(family):
    """fp32 on the CPU. The same rows decoded alone, in a batch of 6 and of 18 (other rows finishing at other
    times), and scored in one prefill over whole sequences: bit-identical logprobs and experts. Without exact mode
    the decode and the scoring disagree (GEMMs of other shapes)."""
    model = decisive(family, wide=True)
    exact = Decoder(model, exact=True)
    probe = exact.generate(RAGGED, max_new_tokens=8)
    kw = dict(max_new_tokens=8, eos_ids=[int(probe.tokens[1, 3])])  # greedy: a row's tokens are its own
    many = exact.generate(RAGGED * 3, **kw)
    six = exact.generate(RAGGED, **kw)
    assert (six.lengths < 8).any() and (six.lengths == 8).any()
    for b in range(len(RAGGED)):
        one = exact.generate([RAGGED[b]], **kw)
        n = int(one.lengths[0])
        for other in (six, many):
            assert torch.equal(other.tokens[b, :n], one.tokens[0, :n])
            assert torch.equal(other.logprobs[b, :n], one.logprobs[0, :n])
            assert torch.equal(other.routing[b, :n], one.routing[0, :n])
    sampled = exact.generate(RAGGED * 3, max_new_tokens=8, temperature=1.0, seed=4)
    trace = RoutingTrace()
    assert torch.equal(score(model, sampled, trace=trace), sampled.logprobs)
    assert torch.equal(produced_routing(trace, sampled), sampled.routing)
    plain = Decoder(model).generate(RAGGED * 3, **kw)
    assert not torch.equal(score(model, plain, exact=False), plain.logprobs)


def test_exact_engine_and_the_trainers_recompute_agree_in_the_task_path():
    """What GRPO does: the exact engine's rollout, the trainer's old policy through the engine's scoring."""
    from mtrain.rl.grpo import MismatchSettings, mismatch_stats, old_policy

    model = decisive("glm4_moe")
    engine = FastEngine(copy_of=model, exact=True)
    gen = engine.generate(RolloutRequest(RAGGED, SamplingConfig(7), seed=1)).gen
    stats = mismatch_stats(gen, old_policy(model, gen, 0, MismatchSettings(), engine.scoring))
    assert stats["mismatch/logprob_abs_diff_max"] == 0 and stats["mismatch/routing_disagreement"] == 0
    reference = RecomputeEngine(copy_of=model).generate(RolloutRequest(RAGGED, SamplingConfig(7), seed=1)).gen
    assert torch.equal(reference.tokens, gen.tokens)  # the same draw as the reference


def test_sampling_noise_is_finite_and_top_p_keeps_hf_boundary():
    """Every 32-bit hash maps to u strictly inside (0, 1): at u = 1 the Gumbel noise is +inf and that token would win
    whatever its logit (with 24 bits, 1 hash in 2^24: about 1 sampled token in 110 at a 152k vocabulary). Top-p keeps
    a token while the mass before it is below top_p: probabilities (0.5, 0.25, 0.25) at top_p = 0.5 keep one."""
    from mtrain.models import ops

    top = ops.uniform(torch.tensor([0xFFFFFFFF, 0xFFFFFF00, 0], dtype=torch.int64))
    assert bool((top < 1).all() and (top > 0).all()) and torch.isfinite(-torch.log(-torch.log(top))).all()
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).repeat(256, 1)
    keys = ops.noise_keys(3, torch.arange(256), torch.zeros(256, dtype=torch.long))
    assert set(ops.sample(logits, 1.0, 0.5, keys).tolist()) == {0}
    assert set(ops.sample(logits, 1.0, 0.8, keys).tolist()) == {0, 1, 2}  # the tie at the threshold stays in


def test_the_fast_engine_refuses_what_it_cannot_do_at_construction():
    model = build_model(SHAPES["qwen3_moe"], seed=0)
    with pytest.raises(ValueError, match="at most 8 token ids"):
        FastEngine(copy_of=model, eos_ids=list(range(9)))
    with pytest.raises(ValueError, match="max_new_tokens=0: generate at least one token"):
        Decoder(model).generate([[1, 2]], max_new_tokens=0)


def test_triton_kernels_match_their_torch_versions_in_the_interpreter():
    pytest.importorskip("triton")
    script = Path(__file__).with_name("kernel_check.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all kernels match" in done.stdout


# -- GPU (marked; run on the device) -----------------------------------------------------------------------------------
GPU_SHAPES = {
    "qwen3_moe": Qwen3MoeConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=3, num_attention_heads=8,
                                num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                                moe_intermediate_size=256),
    "glm4_moe": Glm4MoeConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=3, num_attention_heads=8,
                              num_key_value_heads=2, head_dim=64, n_routed_experts=16, num_experts_per_tok=4,
                              moe_intermediate_size=256, n_group=2, topk_group=1, first_k_dense_replace=1,
                              attention_bias=True),
}


def gpu_model(family, rl, seed=0):
    model = build_model(GPU_SHAPES[family], dtype=torch.bfloat16, device="cuda", seed=seed,
                        policy=PrecisionPolicy(rl, rl)).eval()
    with torch.no_grad():
        for _, router in model.routers():
            router.weight.normal_(0, 0.3)
        model.output_weight.mul_(20.0)  # decisive logits: greedy ties between kernels are out of reach
    return model


def prompts(n, seed=0, vocab=4096):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def greedy_agreement(model, gen, margin: float = 0.5) -> tuple[float, float]:
    """Teacher-forced on the engine's tokens, the trainer's forward (standard kernels): the share of positions whose
    top-2 logit margin exceeds ``margin`` where the engine's greedy token is the trainer's argmax, and the share of
    such clear positions (in bf16 other kernels may break a near-tie either way)."""
    ids, positions, mask, first = rollout_layout(gen)
    with torch.no_grad():
        logits = model(ids, position_ids=positions, attn_mask=mask)[:, first - 1 : first - 1 + gen.tokens.shape[1]]
    top2 = logits.float().topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1] > margin) & gen.mask
    agree = (logits.float().argmax(-1) == gen.tokens)[clear].float().mean().item()
    return agree, clear.float().mean().item()


def test_greedy_agreement_checks_the_engine_against_the_trainers_argmax():
    model = decisive("qwen3_moe")
    gen = Decoder(model).generate(RAGGED, max_new_tokens=6)
    agree, clear = greedy_agreement(model, gen, margin=0.0)
    assert agree == 1.0 and clear > 0.9
    gen.tokens[0, 1] = (gen.tokens[0, 1] + 1) % 64  # a token the argmax did not pick
    assert greedy_agreement(model, gen, margin=0.0)[0] < 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(GPU_SHAPES))
def test_gpu_graphs_survive_weight_updates_and_greedy_tokens_equal_the_reference(family):
    trainer = gpu_model(family, rl=False)
    engine = FastEngine(copy_of=trainer)
    assert engine.decoder.graphs_on
    ps = prompts(40)
    request = RolloutRequest(ps, SamplingConfig(24, temperature=0.0))
    for update in range(3):
        gen = engine.generate(request).gen
        agree, clear = greedy_agreement(trainer, gen)
        assert agree == 1.0 and clear > 0.5, (update, agree, clear)
        graphs = len(engine.decoder.graphs)
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(torch.randn_like(p) * p.float().std().to(p.dtype) * 0.05)
        engine.sync(trainer)
        eager = Decoder(engine.model, graphs=False).generate(ps, max_new_tokens=24)
        replayed = engine.generate(request).gen
        assert len(engine.decoder.graphs) == graphs  # no re-capture after the hand-over
        assert torch.equal(replayed.tokens, eager.tokens) and torch.equal(replayed.logprobs, eager.logprobs)


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(GPU_SHAPES))
def test_gpu_exact_mode_is_bit_identical_to_the_trainers_scoring_after_updates(family):
    """bf16, both families: rollout logprobs and experts equal the trainer's scoring bit for bit at batch 64 (graphs,
    rows leaving the batch), before and after weight updates handed over to the engine."""
    trainer = gpu_model(family, rl=True)
    engine = FastEngine(copy_of=trainer, exact=True)
    ps = prompts(64, seed=1)
    for update in range(3):
        gen = engine.generate(RolloutRequest(ps, SamplingConfig(48, temperature=1.0), seed=update)).gen
        trace = RoutingTrace()
        lp = score(trainer, gen, trace=trace)
        assert torch.equal(lp, gen.logprobs), (update, (lp - gen.logprobs).abs().max().item())
        assert torch.equal(produced_routing(trace, gen), gen.routing), update
        with torch.no_grad():
            for p in trainer.parameters():
                p.add_(torch.randn_like(p) * p.float().std().to(p.dtype) * 0.05)
        engine.sync(trainer)
