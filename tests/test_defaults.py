"""One home for each default: the schema (mtrain/schema.py, mtrain/data/config.py). A yaml of conf/ sets only what
its option changes, and a runtime settings class reads each of its fields from the schema field of the same name
with the same default, so the two can never disagree unnoticed."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_cfg
from mtrain.data.config import DataConfig
from mtrain.job import Job
from mtrain.job.settings import settings_from
from mtrain.lit.grpo import GRPOSettings
from mtrain.lit.optim import OptimSettings
from mtrain.rl.corrections import CorrectionConfig
from mtrain.rl.engines import MismatchInjection, SamplingConfig
from mtrain.rl.grpo import LossSettings, MismatchSettings
from mtrain.schema import (
    TASK_SCHEMAS,
    GRPOTaskConfig,
    InjectMismatchConfig,
    OptimTaskConfig,
    RolloutCorrectionConfig,
    TrainerConfig,
)


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def schema_defaults(schema: type) -> dict:
    """The schema's defaults as the yaml would write them (enums by value, nested nodes as dicts)."""
    return OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=False)


def restated(values: dict, defaults: dict, prefix: str) -> list[str]:
    """The keys of ``values`` (a yaml's) equal to the schema's default: a second home for that default."""
    out = []
    for key, value in values.items():
        if key == "defaults":
            continue
        default = defaults.get(key, "<not in the schema>")
        if isinstance(value, dict) and isinstance(default, dict):
            out += restated(value, default, f"{prefix}{key}.")
        elif _plain(default) == value:
            out.append(f"{prefix}{key}: {value!r}")
    return out


GROUP_SCHEMAS = {"trainer": lambda name: TrainerConfig, "data": lambda name: DataConfig,
                 "task": lambda name: TASK_SCHEMAS[name]}


@pytest.mark.parametrize("path", sorted(p for g in GROUP_SCHEMAS for p in (CONF_DIR / g).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_yaml_sets_only_what_its_option_changes(path: Path):
    group = path.parent.name
    text = path.read_text()
    values = yaml.safe_load(text) or {}
    schema = schema_defaults(GROUP_SCHEMAS[group](path.stem))
    if text.startswith("# @package _global_"):  # task/grpo.yaml: its task node and the trainer steps
        found = restated(values.get(group, {}), schema, f"{group}.")
        found += restated(values.get("trainer", {}), schema_defaults(TrainerConfig), "trainer.")
    else:
        found = restated(values, schema, "")
    assert not found, (f"{path.relative_to(CONF_DIR.parent)} restates the schema's defaults: {', '.join(found)}; "
                       "drop them from the yaml (or change the schema, their one home)")


# runtime settings class -> (the schema it is built from, the fields the task computes instead of reading)
BUILT_FROM = [
    (OptimSettings, [OptimTaskConfig], ()),
    (LossSettings, [GRPOTaskConfig], ("norm_len",)),
    (MismatchSettings, [GRPOTaskConfig, RolloutCorrectionConfig], ()),
    (CorrectionConfig, [RolloutCorrectionConfig], ()),
    (SamplingConfig, [GRPOTaskConfig], ("max_new_tokens",)),
    (MismatchInjection, [InjectMismatchConfig], ("seed",)),
    (GRPOSettings, [GRPOTaskConfig], ("sampling", "loss", "mismatch", "optim", "grad_clip", "seed", "rollouts_keep")),
]


@pytest.mark.parametrize("cls,schemas,computed", BUILT_FROM, ids=lambda x: getattr(x, "__name__", ""))
def test_runtime_settings_read_the_schema_field_of_each_name_with_its_default(cls, schemas, computed):
    defaults: dict = {}
    for schema in reversed(schemas):
        defaults |= schema_defaults(schema)
    for f in dataclasses.fields(cls):
        if f.name in computed:
            continue
        assert f.name in defaults, (f"{cls.__name__}.{f.name} has no schema field of its name in "
                                    f"{[s.__name__ for s in schemas]}: settings_from would never set it")
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            mine = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(mine):
                continue  # a nested settings class: checked on its own row
            assert _plain(mine) == _plain(defaults[f.name]), (
                f"{cls.__name__}.{f.name} defaults to {mine!r}, the schema to {defaults[f.name]!r}: one home, please")


def test_settings_from_builds_by_name_with_plain_values():
    cfg = compose_cfg(["task=grpo", "task.routing_replay=r3", "task.rollout_correction.mode=token_tis",
                       "task.rollout_correction.cap=3", "task.betas=[0.8,0.9]", "task.loss_args.x=1"])
    t = cfg.task
    mismatch = settings_from(MismatchSettings, t, t.rollout_correction)
    assert mismatch.routing_replay == "r3" and type(mismatch.routing_replay) is str  # the enum's value
    assert mismatch.rollout_correction == CorrectionConfig(mode="token_tis", cap=3.0)  # nested, old_logprobs left
    assert settings_from(OptimSettings, t).betas == (0.8, 0.9)
    loss = settings_from(LossSettings, t, norm_len=7)
    assert loss.norm_len == 7 and loss.loss_args == {"x": 1} and type(loss.loss_args) is dict


def test_a_bare_grpo_warm_starts_a_random_init_model_only(tmp_path):
    from mtrain.job.warm_start import AUTO_STEPS, warm_start_steps

    assert warm_start_steps(Job.prepare(compose_cfg(["task=grpo"]))) == AUTO_STEPS
    assert warm_start_steps(Job.prepare(compose_cfg(["task=grpo", f"model.checkpoint={tmp_path}"]))) == 0
    assert warm_start_steps(Job.prepare(compose_cfg(["task=grpo", f"model.checkpoint={tmp_path}",
                                                      "task.warm_start_steps=30"]))) == 30
    assert warm_start_steps(Job.prepare(compose_cfg(["task=grpo", "task.warm_start_steps=0"]))) == 0


def test_a_random_init_run_without_warm_start_says_at_start_that_it_cannot_learn(tmp_path, caplog):
    import logging

    from test_grpo import grpo

    with caplog.at_level(logging.WARNING, logger="mtrain"):
        grpo(tmp_path, "trainer.max_steps=1", "task.eval_every=0")  # TINY: task.warm_start_steps=0
    said = [r.getMessage() for r in caplog.records if "nothing to learn" in r.getMessage()]
    assert len(said) == 1 and "task.warm_start_steps=0" in said[0]
