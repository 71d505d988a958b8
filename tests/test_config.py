"""Config tree, FD_ENABLE_RL parsing, the precision decision, and the saved resolved config (compose API, no CLI)."""

from __future__ import annotations

import itertools
import json
import logging
import os

import pytest
import yaml
from omegaconf import OmegaConf

from mtrain.job import Job
from mtrain.config import (
    ConfigError,
    PrecisionPlan,
    decide_precision,
    dtype_for_precision,
    parse_fd_enable_rl,
    prepare_run,
    register_resolvers,
    save_resolved,
)
from mtrain.models import Glm4MoeConfig, Qwen3MoeConfig
from mtrain.tasks import TASKS, get_task

ARCH = {"glm4_moe": Glm4MoeConfig, "qwen3_moe": Qwen3MoeConfig}
EXPERIMENT_MODEL_RL = {"tiny_glm4": ("glm4_moe", "on"), "tiny_qwen3": ("qwen3_moe", "off")}

ON = ["1", "true", "True", "TRUE", "on", "On", "yes", "YES", " 1 ", "\ttrue\n"]
OFF = [None, "", "   ", "0", "false", "False", "off", "OFF", "no", "No", " 0 "]
BAD = ["2", "-1", "maybe", "enable", "enabled", "y", "n", "t", "1.0", "true1", "o n"]


# --- FD_ENABLE_RL parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ON)
def test_parse_on(value):
    assert parse_fd_enable_rl(value) is True


@pytest.mark.parametrize("value", OFF)
def test_parse_off(value):
    assert parse_fd_enable_rl(value) is False


@pytest.mark.parametrize("value", BAD)
def test_parse_bad_names_variable_value_and_spellings(value):
    with pytest.raises(ConfigError) as e:
        parse_fd_enable_rl(value)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"FD_ENABLE_RL={value!r}" in msg
    for spelling in ("1/true/on/yes", "0/false/off/no", "empty or unset"):
        assert spelling in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("value", [v for v in ON + OFF if v is not None])
def test_env_spelling_drives_composed_gate(monkeypatch, compose_config, value):
    monkeypatch.setenv("FD_ENABLE_RL", value)
    cfg = compose_config(["model=qwen3_moe"])
    expected = parse_fd_enable_rl(value)
    assert cfg.model.moe_gate_fp32 is expected  # the resolver, as --cfg job --resolve shows it
    assert cfg.model.rope_fp32 is expected
    resolved, plan = prepare_run(cfg)
    assert resolved.model.moe_gate_fp32 is expected
    assert plan.source == (f"FD_ENABLE_RL={value.strip()}" if value.strip() else "default")


@pytest.mark.parametrize("value", BAD)
def test_bad_env_refused_by_prepare_run(monkeypatch, compose_config, value):
    monkeypatch.setenv("FD_ENABLE_RL", value)
    cfg = compose_config(["rl=on"])  # even an explicit rl choice does not hide a malformed variable
    with pytest.raises(ConfigError, match="FD_ENABLE_RL="):
        prepare_run(cfg)


# --- the precision decision (pure) -----------------------------------------------------------------------------

# (gate_override, rl, env FD_ENABLE_RL, expected gate, expected source, expected number of warnings)
PRECEDENCE = [
    (None, "auto", None, False, "default", 0),
    (None, "auto", "", False, "default", 0),
    (None, "auto", "1", True, "FD_ENABLE_RL=1", 0),
    (None, "auto", "0", False, "FD_ENABLE_RL=0", 0),
    (None, "on", None, True, "rl=on", 0),
    (None, "off", None, False, "rl=off", 0),
    (None, "on", "1", True, "rl=on", 0),
    (None, "off", "0", False, "rl=off", 0),
    (None, "off", "1", False, "rl=off", 1),  # conflict: rl=off vs FD_ENABLE_RL=1
    (None, "on", "0", True, "rl=on", 1),  # conflict: rl=on vs FD_ENABLE_RL=0
    (False, "on", None, False, "model.moe_gate_fp32=false (override)", 1),  # conflict: override vs rl=on
    (True, "off", None, True, "model.moe_gate_fp32=true (override)", 1),
    (True, "on", None, True, "model.moe_gate_fp32=true (override)", 0),
    (False, "auto", "1", False, "model.moe_gate_fp32=false (override)", 1),  # override vs FD_ENABLE_RL=1
    (True, "auto", None, True, "model.moe_gate_fp32=true (override)", 0),  # nothing to conflict with
    (False, "auto", None, False, "model.moe_gate_fp32=false (override)", 0),
    (True, "off", "1", True, "model.moe_gate_fp32=true (override)", 2),  # two conflicts, one warning each
]


@pytest.mark.parametrize("override,rl,env,gate,source,n_warn", PRECEDENCE)
def test_precedence(override, rl, env, gate, source, n_warn):
    plan = decide_precision(override, rl, {} if env is None else {"FD_ENABLE_RL": env})
    assert plan.moe_gate_fp32 is gate
    assert plan.source == source
    assert len(plan.warnings) == n_warn
    # rope_fp32 follows the RL decision (no rope override here)
    rl_on = {"on": True, "off": False}.get(rl, parse_fd_enable_rl(env))
    assert plan.rope_fp32 is rl_on and plan.rl is rl_on


def test_rope_override_has_its_own_precedence():
    plan = decide_precision(None, "on", {}, rope_override=False)
    assert (plan.moe_gate_fp32, plan.rope_fp32) == (True, False)
    assert plan.rope_source == "model.rope_fp32=false (override)"
    assert len(plan.warnings) == 1 and "model.rope_fp32=false" in plan.warnings[0] and "rl=on" in plan.warnings[0]


def test_conflict_rl_off_vs_env_names_both_sides():
    plan = decide_precision(None, "off", {"FD_ENABLE_RL": "1"})
    (w,) = plan.warnings
    assert "rl=off" in w and "FD_ENABLE_RL=1" in w
    assert plan.export_env == "0"


def test_conflict_rl_on_vs_gate_override_names_both_sides():
    plan = decide_precision(False, "on", {})
    (w,) = plan.warnings
    assert "model.moe_gate_fp32=false" in w and "rl=on" in w
    assert plan.export_env == "1" and plan.rope_fp32 is True


@pytest.mark.parametrize(
    "rl,env,export", [("on", None, "1"), ("on", "yes", "1"), ("off", None, None), ("off", "0", None),
                      ("off", "1", "0"), ("auto", "1", None), ("auto", None, None)]
)
def test_export_env(rl, env, export):
    assert decide_precision(None, rl, {} if env is None else {"FD_ENABLE_RL": env}).export_env == export


def test_unknown_rl_mode_refused():
    with pytest.raises(ConfigError, match="rl.mode='maybe'"):
        decide_precision(None, "maybe", {})


def test_plan_round_trips_through_dict():
    plan = decide_precision(False, "off", {"FD_ENABLE_RL": "1"})
    assert PrecisionPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize(
    "precision,dtype", [("bf16-true", "bfloat16"), ("32-true", "float32"), ("bf16-mixed", "float32"), ("32", "float32")]
)
def test_dtype_follows_trainer_precision(precision, dtype):
    assert dtype_for_precision(precision) == dtype


# --- composing the tree ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rl,model,experiment,env",
    list(itertools.product([None, "on", "off", "auto"], [None, "glm4_moe", "qwen3_moe"],
                           [None, "tiny_glm4", "tiny_qwen3"], [None, "1"])),
)
def test_compose_every_combination(monkeypatch, compose_config, rl, model, experiment, env):
    if env is not None:
        monkeypatch.setenv("FD_ENABLE_RL", env)
    overrides = [f"{k}={v}" for k, v in (("rl", rl), ("model", model), ("experiment", experiment)) if v]
    cfg = compose_config(overrides)

    exp_model, exp_rl = EXPERIMENT_MODEL_RL.get(experiment, ("glm4_moe", "auto"))
    want_model = model or exp_model  # command line > experiment > default
    want_rl = rl or exp_rl
    assert cfg.model.name == want_model
    assert OmegaConf.get_type(cfg.model.arch) is ARCH[want_model]
    assert cfg.rl.mode == want_rl
    assert cfg.task.name == "sft"
    if experiment:
        assert cfg.model.arch.hidden_size == 64 and cfg.trainer.max_steps == 300

    resolved, plan = prepare_run(cfg)
    want_gate = {"on": True, "off": False}.get(want_rl, env == "1")
    assert resolved.model.moe_gate_fp32 is want_gate
    assert resolved.model.rope_fp32 is want_gate
    assert plan.source == {"on": "rl=on", "off": "rl=off"}.get(want_rl, "FD_ENABLE_RL=1" if env else "default")
    assert len(plan.warnings) == (1 if want_rl == "off" and env == "1" else 0)
    assert resolved.model.dtype == "float32"
    assert resolved.precision.moe_gate_fp32.value is want_gate


def test_default_config_values(compose_config):
    cfg = compose_config()
    assert cfg.model.name == "glm4_moe" and cfg.model.checkpoint is None
    assert cfg.rl.mode == "auto" and cfg.task.name == "sft"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    assert OmegaConf.is_interpolation(cfg.model, "moe_gate_fp32")
    assert cfg.model.moe_gate_fp32 is False and cfg.model.dtype == "float32"
    assert cfg.data.name == "synthetic"


def test_gpu_trainer(compose_config):
    cfg = compose_config(["trainer=gpu"])
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-true")
    resolved, _ = prepare_run(cfg)
    assert resolved.model.dtype == "bfloat16"
    assert resolved.precision.dtype.source == "trainer.precision=bf16-true"
    resolved, _ = prepare_run(compose_config(["trainer=gpu", "model.dtype=float32"]))
    assert resolved.model.dtype == "float32"
    assert resolved.precision.dtype.source == "model.dtype=float32 (override)"


def test_hydra_dirs(compose_config):
    hcfg = compose_config(["task=info"], return_hydra_config=True).hydra
    run_dir = OmegaConf.to_container(hcfg.run, resolve=False)["dir"]
    assert run_dir.startswith("outputs/") and "${task.name}" in run_dir
    assert OmegaConf.to_container(hcfg.sweep, resolve=False)["dir"].startswith("outputs/multirun/")
    assert "${hydra.job.num}" in OmegaConf.to_container(hcfg.sweep, resolve=False)["subdir"]


def test_a_resumed_sweep_lands_in_the_same_job_dirs(compose_config):
    """Re-running a stopped sweep with ``task.ckpt_path=auto`` (README: On a SLURM cluster) must name each job's dir
    as before, or no job would find its checkpoint."""
    names = {compose_config(o, return_hydra_config=True).hydra.job.override_dirname
             for o in (["task.lr=1e-3"], ["task.lr=1e-3", "task.ckpt_path=auto"], ["task.overwrite=true", "task.lr=1e-3"])}
    assert names == {"task.lr=1e-3"}


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.arch.hiden_size=3"], "hiden_size"),
        (["model.arch.hidden_size=abc"], "hidden_size"),
        (["trainer.max_stepz=1"], "max_stepz"),
        (["trainer.max_steps=many"], "max_steps"),
        (["model.moe_gate_fp32=maybe"], "moe_gate_fp32"),
        (["model=qwen3_moe", "model.arch.n_routed_experts=4"], "n_routed_experts"),  # a GLM4-only field
        (["seeed=1"], "seeed"),
        (["model=llama"], "model/llama"),
        (["logger=comet"], "logger/comet"),
        (["logger=[csv,comet]"], "logger/comet"),
        (["logger=[csv,wandb]", "logger.wandb.projct=x"], "projct"),
        (["logger=mlflow", "logger.mlflow.tags=x"], "tags"),
        (["logger.wandb.project=x"], "wandb"),  # wandb not selected
    ],
)
def test_schema_refuses_bad_keys_and_types(compose_config, overrides, key):
    with pytest.raises(Exception) as e:
        compose_config(overrides)
    assert key in str(e.value)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.dtype=float64"], "model.dtype='float64'"),
        (["rl.mode=maybe"], "rl.mode='maybe'"),
        (["model.name=qwen3_moe"], "model.name='qwen3_moe'"),
        (["model.arch.num_experts_per_tok=99"], "model.arch: num_experts_per_tok=99"),
        (["+logger.comet.x=1"], "logger: unknown logger"),
        (["logger=wandb", "+logger.wandb.projct=x"], "logger.wandb.projct; known: entity, group"),
        (["+logger.wandb.project=x"], "logger.wandb is set but wandb is not selected"),
    ],
)
def test_prepare_run_refuses_inconsistent_values(compose_config, overrides, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        prepare_run(compose_config(overrides))


# --- prepare_run: env, warnings, saved config ------------------------------------------------------------------


def test_rl_on_exports_env_for_the_job_only(compose_config):
    _, plan = prepare_run(compose_config(["rl=on"]))
    assert "FD_ENABLE_RL" not in os.environ  # deciding changes nothing; the job's environment does
    with plan.job_env():
        assert os.environ["FD_ENABLE_RL"] == "1"
    assert "FD_ENABLE_RL" not in os.environ


def test_rl_off_leaves_unset_env_unset(compose_config):
    _, plan = prepare_run(compose_config(["rl=off"]))
    with plan.job_env():
        assert "FD_ENABLE_RL" not in os.environ


def test_rl_off_exports_0_over_a_user_1_and_restores_it(monkeypatch, compose_config):
    monkeypatch.setenv("FD_ENABLE_RL", "1")
    _, plan = prepare_run(compose_config(["rl=off"]))
    with plan.job_env():
        assert os.environ["FD_ENABLE_RL"] == "0"
    assert os.environ["FD_ENABLE_RL"] == "1"


@pytest.mark.parametrize(
    "env,overrides,sides",
    [("1", ["rl=off"], ("rl=off", "FD_ENABLE_RL=1")), (None, ["rl=on", "model.moe_gate_fp32=false"],
                                                        ("rl=on", "model.moe_gate_fp32=false"))],
)
def test_conflict_logs_exactly_one_warning(monkeypatch, compose_config, caplog, env, overrides, sides):
    if env:
        monkeypatch.setenv("FD_ENABLE_RL", env)
    with caplog.at_level(logging.INFO, logger="mtrain"):
        _, plan = prepare_run(compose_config(overrides))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned == list(plan.warnings)
    assert all(side in warned[0] for side in sides)
    assert any("precision: moe_gate_fp32=false" in r.getMessage() for r in caplog.records)  # printed at start


def test_saved_resolved_config(tmp_path, compose_config):
    resolved, plan = prepare_run(compose_config(["rl=on", "model=qwen3_moe", "model.moe_gate_fp32=false"]))
    path = save_resolved(resolved, tmp_path / "run")
    assert path == tmp_path / "run" / "config_resolved.yaml"
    text = path.read_text()
    assert "${" not in text and "hydra" not in yaml.safe_load(text)
    saved = yaml.safe_load(text)
    assert saved["model"]["name"] == "qwen3_moe"
    assert saved["model"]["moe_gate_fp32"] is False and saved["model"]["rope_fp32"] is True
    assert saved["model"]["dtype"] == "float32"
    assert saved["precision"]["moe_gate_fp32"] == {"value": False, "source": "model.moe_gate_fp32=false (override)"}
    assert saved["precision"]["rope_fp32"] == {"value": True, "source": "rl=on"}
    assert saved["precision"]["dtype"] == {"value": "float32", "source": "trainer.precision=32-true"}
    assert saved["precision"]["export_env"] == "1"
    assert len(saved["precision"]["warnings"]) == 1
    # the saved file composes back into the same plan
    assert PrecisionPlan.from_dict(saved["precision"]) == plan


@pytest.mark.parametrize("overrides, env, value, source", [
    (["rl=on", "task=grpo"], None, True, "rl=on"),
    (["rl=off", "task=grpo"], None, False, "rl=off"),
    (["task=grpo"], "1", True, "FD_ENABLE_RL=1"),
    (["rl=on", "task=grpo", "task.exact=false"], None, False, "task.exact=false (override)"),
    (["rl=off", "task=mismatch", "task.exact=true"], None, True, "task.exact=true (override)"),
])
def test_the_exact_rollout_is_part_of_the_one_precision_decision(monkeypatch, compose_config, overrides, env, value,
                                                                  source):
    """The rollout engine's exact mode is decided with the gate and RoPE, recorded with its source, and what the
    tasks read (rl=on with exact off warns: train and rollout will disagree)."""
    if env is not None:
        monkeypatch.setenv("FD_ENABLE_RL", env)
    resolved, plan = prepare_run(compose_config(overrides))
    assert (plan.exact_rollout, plan.exact_source) == (value, source)
    assert resolved.precision.exact_rollout == {"value": value, "source": source}
    assert any("task.exact=false" in w for w in plan.warnings) == (overrides[-1] == "task.exact=false")
    from mtrain.rl.engines.base import choose_engine

    assert choose_engine("auto", plan.exact_rollout, False) == ("fast", value)


def test_prepare_run_is_idempotent(monkeypatch, compose_config):
    monkeypatch.setenv("FD_ENABLE_RL", "1")
    resolved, plan = prepare_run(compose_config(["model=qwen3_moe"]))
    again, plan2 = prepare_run(resolved)
    assert again is resolved and plan2 == plan and plan2.source == "FD_ENABLE_RL=1"


def test_resolver_registration_is_idempotent():
    register_resolvers()
    register_resolvers()
    assert OmegaConf.has_resolver("mtrain.moe_gate_fp32")
    cfg = OmegaConf.create({"rl": {"mode": "on"}, "g": "${mtrain.moe_gate_fp32:${rl.mode}}"})
    assert cfg.g is True


# --- tasks -----------------------------------------------------------------------------------------------------


def test_task_registry():
    assert TASKS["info"] == "mtrain.tasks.info:run"
    assert callable(get_task("info"))
    with pytest.raises(ConfigError, match="task.name='nope'"):
        get_task("nope")


def test_info_task_runs_without_a_model(monkeypatch, tmp_path, compose_config, capsys):
    monkeypatch.chdir(tmp_path)  # outside a Hydra job, the job dir is the cwd
    info = get_task("info")(Job.prepare(compose_config(["rl=on", "model=qwen3_moe"])))
    assert info["moe_gate_fp32"] is True and info["moe_gate_fp32_source"] == "rl=on"
    assert json.loads((tmp_path / "info.json").read_text())["moe_gate_fp32_source"] == "rl=on"
    out = capsys.readouterr().out
    assert "moe_gate_fp32  true" in out and "rl=on" in out
