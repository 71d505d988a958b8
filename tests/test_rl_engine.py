"""MoE RL against a rollout engine: routing replay (R3/R2) in GRPO, mismatch corrections, rollouts read from an
external engine's file, and the engine stand-in that injects a mismatch.

What users rely on: R3 makes the trained tokens use the rollout's experts (0% disagreement) while the router keeps
learning; the rollout's routing maps onto the trainer's buffer position by position; a rollout file written by the
embedded engine trains exactly like the in-process run; bad rollout files are refused line by line; corrections
act (masked tokens leave the loss) and are logged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_grpo import SIGNAL, grpo, history  # noqa: F401  (SIGNAL: a reward with signal on a random model)

from mtrain.data.errors import DataError
from mtrain.models import Glm4MoeConfig, Qwen3MoeConfig, RoutingTrace, build_model
from mtrain.models.generate import generate, recompute
from mtrain.rl.grpo import MismatchSettings, StepBatch, minibatch_loss, old_policy, LossSettings
from mtrain.rl.mismatch import trainer_recompute
from mtrain.models.decoding import Decoder
from mtrain.rl.engines import MismatchInjection, RecomputeEngine, RolloutRequest, SamplingConfig

SHAPES = {
    "qwen3_moe": Qwen3MoeConfig(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2),
    "glm4_moe": Glm4MoeConfig(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                              topk_group=1, first_k_dense_replace=1),
}
PROMPTS = [[1, 5, 9, 3], [1, 7], [1, 4, 4, 8, 2, 6], [1, 9, 9]]


def decisive(family, seed=0):
    model = build_model(SHAPES[family], seed=seed).eval()
    with torch.no_grad():
        for _, router in model.routers():
            router.weight.normal_(0, 0.5)
    return model


# -- the rollout's routing, position by position -----------------------------------------------------------------
@pytest.mark.parametrize("family", list(SHAPES))
@pytest.mark.parametrize("engine", ["recompute", "fast", "fast-exact"])
def test_replaying_the_rollouts_buffer_routing_reproduces_the_trainer(family, engine):
    """The rollout recorded routing at every prompt and producing position; replayed over the trainer's buffer it
    gives the trainer's own logprobs (a shifted or misplaced id would change them: the routers are decisive)."""
    model = decisive(family)
    if engine == "recompute":
        gen = generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=1)
    else:
        gen = Decoder(model, exact=engine == "fast-exact").generate(PROMPTS, max_new_tokens=6, temperature=1.0, seed=1)
    scoring = "invariant" if engine == "fast-exact" else "standard"
    free, _ = trainer_recompute(model, gen, scoring=scoring)
    trace = RoutingTrace.replay(gen.replay_ids(model.moe_layers))
    replayed, own = trainer_recompute(model, gen, trace=trace, scoring=scoring)
    if engine == "fast":
        torch.testing.assert_close(free, replayed, rtol=0, atol=1e-5)
    else:  # the exact engine equals the trainer's scoring bit for bit; the reference to fp32 CPU rounding
        assert torch.equal(free, replayed)
        assert torch.equal(free, gen.logprobs) if engine == "fast-exact" else (free - gen.logprobs).abs().max() < 1e-5
        assert torch.equal(own.masked_fill(~gen.mask[..., None, None], -1), gen.routing)
    shifted = {k: v.roll(1, dims=1) for k, v in gen.replay_ids(model.moe_layers).items()}
    wrong, _ = trainer_recompute(model, gen, trace=RoutingTrace.replay(shifted))
    assert (wrong - free).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(SHAPES))
def test_r3_under_injected_router_noise_trains_on_the_rollouts_experts_and_the_gate_learns(family):
    model = decisive(family)
    engine = RecomputeEngine(copy_of=model, inject=MismatchInjection(router_noise=0.3))
    gen = engine.generate(RolloutRequest(PROMPTS * 4, SamplingConfig(6), seed=2)).gen
    plain = old_policy(model, gen, 0, MismatchSettings())
    r3 = old_policy(model, gen, 0, MismatchSettings(routing_replay="r3"))
    valid = gen.mask
    differs = lambda a: (a.sort(-1).values != gen.routing.sort(-1).values).any(-1)[valid].float().mean()  # noqa: E731
    assert differs(plain.used_routing) > 0.05  # the noise moved the engine's choices
    assert differs(r3.used_routing) == 0 and differs(r3.routing) > 0.05  # R3 hides it; "own" still shows it
    batch = StepBatch(gen, torch.ones(len(PROMPTS) * 4), torch.randn(len(PROMPTS) * 4), r3.logprobs, replay=r3.replay)
    model.train()
    loss, _ = minibatch_loss(model, batch, torch.arange(8), LossSettings(), 0)
    loss.backward()
    assert all(router.weight.grad.abs().sum() > 0 for _, router in model.routers())


def test_r2_replays_the_recomputes_own_routing_through_the_updates():
    model = decisive("qwen3_moe")
    gen = generate(model, PROMPTS, max_new_tokens=5, temperature=1.0, seed=0)
    r2 = old_policy(model, gen, 0, MismatchSettings(routing_replay="r2"))
    trace = RoutingTrace()
    recompute(model, gen, 0, trace=trace)
    assert r2.replay.keys() == trace.ids.keys()
    assert all(torch.equal(r2.replay[k], trace.ids[k]) for k in trace.ids)
    with torch.no_grad():  # the policy moves: a free forward would route differently, the replayed one does not
        for _, router in model.routers():
            router.weight.add_(torch.randn_like(router.weight))
    batch = StepBatch(gen, torch.ones(4), torch.ones(4), r2.logprobs, replay=r2.replay)
    used = batch.replay_trace(torch.arange(4))
    recompute(model, gen, 0, trace=used)
    assert used.own and any(not torch.equal(used.own[k], used.ids[k]) for k in used.ids)
    with pytest.raises(ValueError, match="bypass"):
        MismatchSettings(routing_replay="r2", old_logprobs="bypass")


# -- the rollout file (its formats: tests/test_rollout_files.py) ------------------------------------------------
def test_training_from_the_dumped_rollout_file_reproduces_the_in_process_update(tmp_path):
    common = ["rl=on", "trainer.max_steps=1", "task.routing_replay=r3", "task.rollout_correction.mode=token_tis",
              "task.export=true", "task.eval_every=0", SIGNAL]
    live, live_dir = grpo(tmp_path, *common, "task.dump_rollouts=true", name="live")
    dumped = live_dir / "rollout_batches.jsonl"
    assert len(dumped.read_text().splitlines()) == 1 + 16  # the header line, then 4 prompts x 4 responses
    replayed, file_dir = grpo(tmp_path, *common, f"task.rollouts_path={dumped}", name="file")
    assert live["train_grad_norm"] > 0 and replayed["train_grad_norm"] == live["train_grad_norm"]
    from safetensors.torch import load_file
    a, b = (load_file(d / "hf_model" / "model.safetensors") for d in (live_dir, file_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert replayed["engine_syncs"] == 0  # no engine was built


# -- the task ------------------------------------------------------------------------------------------------------
def test_injected_mismatch_corrections_and_replay_in_the_task(tmp_path):
    """Under injected router + logit noise: without replay the trainer disagrees with the engine; R3 brings the
    trained tokens' disagreement to 0 while `own` still reports it; token masking drops tokens (logged), TIS logs its
    weights and the effective sample size."""
    noise = ["rl=on", "trainer.max_steps=2", "task.inject_mismatch.router_noise=0.3",
             "task.inject_mismatch.logit_noise=0.5", SIGNAL]
    plain, plain_dir = grpo(tmp_path, *noise, "task.rollout_correction.mode=token_mask",
                            "task.rollout_correction.cap=1.2", name="mask")
    assert plain["mismatch_routing_disagreement_mean"] > 0.05 and plain["mismatch_k3_mean"] > 0
    assert plain["correction_frac_masked_mean"] > 0
    r3, r3_dir = grpo(tmp_path, *noise, "task.routing_replay=r3", "task.rollout_correction.mode=token_tis",
                      name="r3")
    assert r3["mismatch_routing_disagreement_mean"] == 0.0 and r3["mismatch_routing_disagreement_own_mean"] > 0.05
    rows = history(r3_dir)
    for key in ("correction/is_weight_mean", "correction/is_weight_max", "correction/ess", "correction/frac_truncated"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert 0 < float(rows[0]["correction/ess"]) < 1
    bypass, _ = grpo(tmp_path, *noise, "task.rollout_correction.old_logprobs=bypass",
                     "task.rollout_correction.mode=token_tis", name="bypass")
    assert math.isnan(bypass["mismatch_k3_mean"]) and bypass["correction_is_weight_mean_mean"] > 0


def test_a_plain_rollout_file_trains_with_the_default_config(tmp_path):
    """A file without routing or a header (no layout to declare) trains under the task's default settings."""
    f = tmp_path / "plain.jsonl"
    rows = [{"prompt_ids": [1, 5], "response_ids": [3], "logprobs": [-0.2], "reward": float(i)} for i in range(2)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m, _ = grpo(tmp_path, "trainer.max_steps=1", f"task.rollouts_path={f}", "task.group_size=2",
                "task.prompts_per_step=1", "task.num_minibatches=1")
    assert m["steps"] == 1 and m["engine"].startswith("file")


def test_bad_rollout_file_in_the_task_one_line_nothing_trained(tmp_path):
    from mtrain.job.run import user_error

    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt_ids": [1, 5], "response_ids": [3], "logprobs": [0.2]}) + "\n")
    with pytest.raises(DataError) as e:
        grpo(tmp_path, "trainer.max_steps=1", f"task.rollouts_path={f}", "task.group_size=2", name="run")
    assert user_error(e.value) and "bad.jsonl:1" in str(e.value) and "\n" not in str(e.value)
    assert "logprob" in str(e.value) and "0.2" in str(e.value), str(e.value)  # the bad value, not another refusal
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.json").exists()
