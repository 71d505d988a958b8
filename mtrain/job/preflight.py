"""The config checks of a model job (sft, eval, grpo), run before anything heavy is imported: a bad value fails in
the seconds the config takes to compose, not after Lightning's import (which takes longer than the compose itself).
:func:`mtrain.job.build.build_setup` runs them too, for code that calls a task directly."""

from __future__ import annotations

import importlib.util
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtrain.config import ConfigError
from mtrain.data.config import to_data_config
from mtrain.lit.profilers import check_profiler
from mtrain.models import build_model, get_family
from mtrain.models.balance import BalanceSettings, routers_with_bias
from mtrain.parallel.launch import check_launch, uses_fsdp
from mtrain.schema import LOGGER_SCHEMAS


def check_model_job(cfg: DictConfig, multirun: bool) -> None:
    """ConfigError (or DataError/ParallelError) on the first setting of ``cfg`` that cannot work."""
    missing = sorted(f"{node}.{key}" for node in ("model", "data") for key in cfg[node]
                     if OmegaConf.is_missing(cfg[node], key))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (it is ???): e.g. python -m mtrain "
                          f"{missing[0]}=/path/to/it")
    # a multi-process job under -m must come from torchrun/SLURM, not from Lightning re-running argv
    t = cfg.trainer
    check_launch(t.devices, t.num_nodes, multirun=multirun, accelerator=str(t.accelerator))
    check_profiler(t.get("profiler"))
    if not t.get("fsdp_reshard_after_forward", True) and not uses_fsdp(t):
        raise ConfigError("trainer.fsdp_reshard_after_forward=false applies to trainer=fsdp only: drop it, or add "
                          "trainer=fsdp")
    to_data_config(cfg.data).validate()
    check_loggers(cfg.get("logger"))
    check_routing(cfg)


def check_loggers(loggers: Any) -> None:
    """A logger whose package is not installed (``logger=wandb`` without wandb) is refused before the job starts."""
    for name in loggers or ():
        need = LOGGER_SCHEMAS[name].PACKAGES
        if need and not any(importlib.util.find_spec(p) for p in need):
            raise ConfigError(f"logger={name} needs the {need[0]} package, which is not installed. Fix: pip install "
                              f"{need[0]}, or leave {name} out of logger=")


def routing_settings(model_cfg: DictConfig) -> BalanceSettings:
    """``model.routing`` as typed settings; ConfigError naming the bad key."""
    node = model_cfg.get("routing")
    try:
        return BalanceSettings(**OmegaConf.to_container(node, resolve=True)) if node is not None else BalanceSettings()
    except ValueError as e:
        raise ConfigError(f"model.routing.{e}") from None


def check_routing(cfg: DictConfig) -> BalanceSettings:
    """``model.routing`` that cannot work: a bad value, the bias update on a family whose routers have no bias, a
    balancing loss in a task that does not take one."""
    s = routing_settings(cfg.model)
    task = cfg.task.name
    if s.bias_update and task in ("sft", "grpo"):  # the tasks that train
        family = get_family(cfg.model.name)
        if not routers_with_bias(build_model(family.config(), device="meta", init=False)):
            raise ConfigError(f"model.routing.bias_update=true: the routers of model={cfg.model.name} have no "
                              "selection bias to update (GLM4-MoE's have); use model.routing.load_balancing=aux")
    if s.has_loss and task == "grpo":
        raise ConfigError("model.routing.load_balancing / z_loss_coef: the balancing losses are for task=sft; "
                          "task=grpo takes model.routing.bias_update and freeze_router")
    return s
