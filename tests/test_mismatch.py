"""The rollout paths (the recompute reference and the fast engine) and the train-rollout mismatch diagnostics."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from mtrain.job import Job
from mtrain.models import PrecisionPolicy
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from mtrain.rl.mismatch import mismatch_metrics, trainer_recompute
from mtrain.models import Glm4MoeConfig, Qwen3MoeConfig, build_model, from_pretrained
from mtrain.models.decoding import Decoder
from mtrain.models.generate import generate

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

# the reference measurement's shape: 6 layers, 32 experts, top-4
SHAPES = {
    "qwen3_moe": Qwen3MoeConfig(vocab_size=64, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=32, num_experts=32, num_experts_per_tok=4,
                                moe_intermediate_size=64),
    "glm4_moe": Glm4MoeConfig(vocab_size=64, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, n_routed_experts=32, num_experts_per_tok=4,
                              moe_intermediate_size=64, n_group=4, topk_group=2),
}


def prompts(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def same_weights(cfg, dtype, moe_gate_fp32, rope_fp32, state):
    model = build_model(cfg, dtype=dtype, policy=PrecisionPolicy(moe_gate_fp32, rope_fp32), init=False)
    model.load_state_dict(state)
    return model.eval()


def rollout_of(model, engine, ps, **kw):
    """``engine``: ``recompute`` (the reference), ``fast`` or ``exact`` (the fast engine's exact mode)."""
    if engine == "recompute":
        return generate(model, ps, **kw)
    return Decoder(model, exact=engine == "exact").generate(ps, **kw)


def measure(cfg, dtype, *, rollout_gate, engine, rope=False, trainer_gate=True, max_new=24):
    state = build_model(cfg, dtype=dtype, seed=0).state_dict()
    rollout = same_weights(cfg, dtype, rollout_gate, rope, state)
    trainer = same_weights(cfg, dtype, trainer_gate, rope, state)
    gen = rollout_of(rollout, engine, prompts(), max_new_tokens=max_new, temperature=1.0, seed=0)
    lp, routing = trainer_recompute(trainer, gen, scoring="invariant" if engine == "exact" else "standard")
    return mismatch_metrics(gen.logprobs, lp, gen.routing, routing, gen.lengths)[0]


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
@pytest.mark.parametrize("engine", ["fast", "recompute"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decode_path_equals_full_forward_in_fp32(family, engine, temperature):
    cfg = SHAPES[family]
    model = build_model(cfg, seed=0).eval()
    gen = rollout_of(model, engine, prompts(), max_new_tokens=16, temperature=temperature, seed=3)
    lp, routing = trainer_recompute(model, gen)
    m, rows = mismatch_metrics(gen.logprobs, lp, gen.routing, routing, gen.lengths)
    assert m["tokens"] == int(gen.lengths.sum()) == len(rows) > 0
    assert m["logprob_abs_diff_max"] <= 1e-5
    assert m["routing_disagreement"] == 0.0 and m["tokens_any_layer_differs"] == 0.0
    assert gen.routing.shape[2:] == (len(model.moe_layers), cfg.num_experts_per_tok)


@pytest.mark.parametrize("engine", ["fast", "recompute"])
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(engine):
    model = build_model(SHAPES["qwen3_moe"], seed=0).eval()
    ps = prompts(4)
    batched = rollout_of(model, engine, ps, max_new_tokens=10)
    for i, p in enumerate(ps):
        single = rollout_of(model, engine, [p], max_new_tokens=10)
        assert batched.tokens[i].tolist() == single.tokens[0].tolist()
        assert torch.allclose(batched.logprobs[i], single.logprobs[0], atol=1e-5)


def test_sampling_is_seeded_and_stops_at_eos():
    model = build_model(SHAPES["glm4_moe"], seed=0).eval()
    a = generate(model, prompts(6), max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, prompts(6), max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    c = generate(model, prompts(6), max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    eos = int(a.tokens[0, 2])  # make the third generated token of row 0 a stop token
    d = generate(model, prompts(6), max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, eos_ids=[eos], pad_id=0)
    first = (d.tokens[0] == eos).nonzero()[0].item()
    assert d.lengths[0] == first + 1 <= 3
    assert (d.tokens[0, first + 1 :] == 0).all() and (d.logprobs[0, first + 1 :] == 0).all()


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
def test_rl_on_cuts_routing_disagreement_at_least_5x_in_bf16(family):
    """Same prompts, seeds and weights. rl=off: the engine's bf16 gate + the fast engine against an fp32-gate
    trainer. Gate-only: the FD_ENABLE_RL switch alone. rl=on: fp32 gate + the fast engine's exact mode."""
    cfg = SHAPES[family]
    off = measure(cfg, torch.bfloat16, rollout_gate=False, engine="fast")
    gate_only = measure(cfg, torch.bfloat16, rollout_gate=True, engine="fast")
    on = measure(cfg, torch.bfloat16, rollout_gate=True, engine="exact")
    print(f"{family}: routing disagreement rl=off {off['routing_disagreement']:.4f}, gate fp32 only "
          f"{gate_only['routing_disagreement']:.4f}, rl=on {on['routing_disagreement']:.4f}; |dlogprob| mean "
          f"{off['logprob_abs_diff_mean']:.2e} / {gate_only['logprob_abs_diff_mean']:.2e} / {on['logprob_abs_diff_mean']:.2e}")
    assert off["routing_disagreement"] > 0.005  # the problem is real at this shape
    # (the gate alone is printed, not asserted: on the CPU the fast engine's fp32 attention differs from the trainer's
    # bf16 SDPA by more than the gate does)
    assert on["routing_disagreement"] * 5 <= off["routing_disagreement"]
    assert on["logprob_abs_diff_mean"] * 5 <= off["logprob_abs_diff_mean"]


def test_mismatch_metrics_by_hand():
    r = torch.tensor([[-1.0, -2.0, 0.0]])
    t = torch.tensor([[-1.5, -2.0, 0.0]])
    routing_r = torch.tensor([[[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[9, 9], [9, 9]]]])
    routing_t = torch.tensor([[[[1, 0], [2, 4]], [[0, 1], [2, 3]], [[8, 8], [8, 8]]]])
    m, rows = mismatch_metrics(r, t, routing_r, routing_t, torch.tensor([2]))  # third token is padding
    assert m["tokens"] == 2 and len(rows) == 2
    assert m["logprob_abs_diff_mean"] == pytest.approx(0.25) and m["logprob_abs_diff_max"] == pytest.approx(0.5)
    assert m["kl_k1"] == pytest.approx(0.25)  # mean(log r - log t)
    assert m["kl_k3"] == pytest.approx((torch.tensor(-0.5).exp() - 1 + 0.5).item() / 2)
    assert m["routing_disagreement_per_layer"] == [0.0, 0.5]  # sets compared, order ignored
    assert m["tokens_any_layer_differs"] == 0.5


def compose_cfg(tmp_path, overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("rl", ["on", "off"])
def test_mismatch_task_writes_metrics_table_and_plots(tmp_path, monkeypatch, rl):
    from mtrain.tasks.mismatch import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FD_ENABLE_RL", raising=False)
    cfg = compose_cfg(tmp_path, [f"rl={rl}", "task=mismatch", "model=qwen3_moe", "task.num_prompts=6",
                                 "task.max_new_tokens=6"])
    metrics = run(Job.prepare(cfg))
    for name in ("metrics.json", "tokens.csv", "logprob_diff_hist.png", "routing_disagreement.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["tokens"] == metrics["tokens"] > 0
    assert ("exact" in saved["rollout_profile"]) == (rl == "on")
    assert saved["rollout_profile"].startswith("gate fp32" if rl == "on" else "gate bfloat16")
    if rl == "on":
        assert saved["routing_disagreement"] == 0.0 and saved["logprob_abs_diff_max"] == 0.0


def test_mismatch_metrics_json_is_strict_json_written_by_the_one_writer(tmp_path, monkeypatch):
    """A non-finite metric (k3 of a diverged engine, say) is null in metrics.json, not NaN (which strict JSON readers
    refuse), and the file is written the way every metrics.json is: through a temporary file renamed over it."""
    import mtrain.tasks.mismatch as task

    real = task.mismatch_metrics

    def with_nan(*args, **kwargs):
        metrics, rows = real(*args, **kwargs)
        return metrics | {"kl_k3": float("nan")}, rows

    written = []
    monkeypatch.setattr(task, "mismatch_metrics", with_nan)
    monkeypatch.setattr(task, "write_json", lambda path, data: written.append(path) or real_write(path, data))
    from mtrain.job.records import write_json as real_write

    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(tmp_path, ["task=mismatch", "model=qwen3_moe", "task.num_prompts=2", "task.max_new_tokens=3"])
    task.run(Job.prepare(cfg))
    assert written == [tmp_path / "metrics.json"]

    def refuse(constant):
        raise ValueError(f"{constant} in metrics.json")

    saved = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert saved["kl_k3"] is None and saved["tokens"] > 0


def test_mismatch_task_rejects_unknown_key(tmp_path, monkeypatch):
    from mtrain.config import ConfigError
    from mtrain.tasks.mismatch import run

    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(tmp_path, ["task=mismatch", "+task.num_promtps=3"])
    with pytest.raises(ConfigError, match="num_promtps"):
        run(Job.prepare(cfg))


def test_export_task_writes_gate_in_the_decided_dtype(tmp_path, monkeypatch, caplog):
    from mtrain.tasks.export import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FD_ENABLE_RL", raising=False)
    cfg = compose_cfg(tmp_path, ["rl=on", "task=export", "model=glm4_moe", "model.dtype=bfloat16",
                                 f"task.path={tmp_path / 'export'}"])
    metrics = run(Job.prepare(cfg))
    assert metrics["gate_dtype"] == "float32" and metrics["moe_gate_fp32"] is True
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.experts.0.gate_proj.weight").get_dtype() == "BF16"
    with caplog.at_level(logging.WARNING):
        from_pretrained(tmp_path / "export", policy=PrecisionPolicy(False))
    assert "exported with moe_gate_fp32=true" in caplog.text


def test_mismatch_sweep_summary_tells_the_rl_story(tmp_path):
    """`python -m mtrain -m task=mismatch rl=on,off model=glm4_moe,qwen3_moe`: for each model, rl=on shows zero
    routing disagreement and logprob difference, rl=off does not."""
    import csv

    from conftest import run_cli

    sweep = tmp_path / "sweep"
    r = run_cli(["-m", "task=mismatch", "rl=on,off", "model=glm4_moe,qwen3_moe",
                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4

    def row(model, rl):
        (match,) = [r for r in rows if {f"model={model}", f"rl={rl}"} <= set(r["overrides"].split())]
        return match

    for model in ("glm4_moe", "qwen3_moe"):
        on, off = row(model, "on"), row(model, "off")
        assert on["status"] == off["status"] == "ok"
        assert float(on["routing_disagreement"]) == 0.0 and float(on["logprob_abs_diff_max"]) == 0.0
        assert float(off["routing_disagreement"]) > 0.0 and float(off["logprob_abs_diff_mean"]) > 0.0


def test_export_of_a_bf16_checkpoint_in_fp32_says_so(tmp_path, monkeypatch, caplog):
    """model.dtype follows trainer.precision (fp32 on the CPU trainer): exporting a bf16 checkpoint then doubles its
    size, which the task says, naming the setting that keeps the dtype."""
    from mtrain.models import Glm4MoeConfig, build_model, save_pretrained
    from mtrain.tasks.export import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FD_ENABLE_RL", raising=False)
    save_pretrained(build_model(Glm4MoeConfig(), dtype=torch.bfloat16, seed=0), tmp_path / "ckpt")
    cfg = compose_cfg(tmp_path, ["task=export", "model=glm4_moe", f"model.checkpoint={tmp_path / 'ckpt'}",
                                 f"task.path={tmp_path / 'export'}"])
    with caplog.at_level(logging.WARNING):
        assert run(Job.prepare(cfg))["dtype"] == "float32"
    assert "exporting a bfloat16 checkpoint as float32" in caplog.text and "model.dtype=bfloat16" in caplog.text
