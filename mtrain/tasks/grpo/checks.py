"""The config check of ``task=grpo``: every setting that cannot work is refused in one line before anything is
built or written. The CLI runs it before Lightning is imported (``mtrain.tasks.check_task``); ``run`` runs it too.

The registry-backed choices (advantage, policy loss, aggregation, KL estimator, correction mode, reward, engine) are
checked here against their registries (:mod:`mtrain.registry`), with each piece's options (``task.<kind>_args``)."""

from __future__ import annotations

from mtrain.config import ConfigError
from mtrain.job.run import Job
from mtrain.job.settings import settings_from
from mtrain.registry import Registry
from mtrain.rl import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGS, POLICY_LOSSES
from mtrain.rl.engines import MismatchInjection
from mtrain.rl.engines.base import task_engine
from mtrain.rl.grpo import MismatchSettings

from .inputs import reward_function

# task.<key> names a piece of the registry; its options are task.<key>_args
PIECES: tuple[tuple[str, Registry], ...] = (
    ("advantage", ADVANTAGES), ("loss", POLICY_LOSSES), ("loss_agg", LOSS_AGGS), ("kl_estimator", KL_ESTIMATORS),
)


def check_config(job: Job) -> None:
    """Refuse settings that cannot work, before anything is built or written."""
    t, cfg = job.cfg.task, job.cfg
    for key, registry in PIECES:
        check_piece(registry, f"task.{key}", t[key], t[f"{key}_args"])
    if t.group_size < 2:
        raise ConfigError(f"task.group_size={t.group_size}: GRPO compares responses within a group; use >= 2")
    if t.max_new_tokens is not None and t.max_new_tokens <= 0:
        raise ConfigError(f"task.max_new_tokens={t.max_new_tokens} must be > 0 (or null: longest answer + 2)")
    for key in ("prompts_per_step", "ppo_epochs", "num_minibatches"):
        if t[key] < 1:
            raise ConfigError(f"task.{key}={t[key]} must be >= 1")
    for key in ("eval_every", "rollouts_every"):
        if t[key] < 0:
            raise ConfigError(f"task.{key}={t[key]} must be >= 0 (every N RL steps; 0: off)")
    if t.num_minibatches > t.prompts_per_step * t.group_size:
        raise ConfigError(f"task.num_minibatches={t.num_minibatches} exceeds the {t.prompts_per_step * t.group_size} "
                          "responses of a step; lower it")
    if t.lr <= 0:
        raise ConfigError(f"task.lr={t.lr} must be > 0 (the peak learning rate)")
    if t.warm_start_steps is not None and t.warm_start_steps < 0:
        raise ConfigError(f"task.warm_start_steps={t.warm_start_steps} must be >= 0 (or null: warm-start a "
                          "random-init model)")
    if t.warm_start_accuracy is not None and not 0 <= t.warm_start_accuracy <= 1:
        raise ConfigError(f"task.warm_start_accuracy={t.warm_start_accuracy} must be in [0, 1] (a share of exact "
                          "answers; null = run all task.warm_start_steps)")
    if t.temperature <= 0:
        raise ConfigError(f"task.temperature={t.temperature}: RL samples; use > 0")
    if cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be >= 1 (the number of RL steps)")
    if str(cfg.trainer.strategy) == "fsdp2":
        raise ConfigError("task=grpo does not run under trainer=fsdp yet; use trainer=gpu or trainer=cpu")
    reward_function(t)
    mismatch_settings(t)
    engine_choice(job)
    inj = injection(t, cfg.seed)
    if t.rollouts_path and inj is not None:
        raise ConfigError("task.inject_mismatch perturbs the embedded rollout engine; with task.rollouts_path the "
                          "rollouts come from a file. Drop one of them")


def check_piece(registry: Registry, key: str, name: str, args) -> None:
    """ConfigError in one line when ``name`` is not a registered piece (listing those that are) or ``args`` holds an
    option it does not take (listing those it does)."""
    try:
        registry.get(name)
    except ValueError as e:
        raise ConfigError(f"{key}={name!r}: {e}") from None
    try:
        registry.check(name, args, where=f"{key}_args")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def engine_choice(job: Job) -> tuple[str, bool]:
    """(engine name, exact) from ``task.engine``, ``task.exact``, ``task.rollouts_path`` and the RL decision."""
    t = job.cfg.task
    try:
        return task_engine(t, job.plan.exact_rollout, bool(t.rollouts_path))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def mismatch_settings(t) -> MismatchSettings:
    """``task.routing_replay`` and ``task.rollout_correction`` as typed settings (ConfigError naming the bad key)."""
    try:
        return settings_from(MismatchSettings, t, t.rollout_correction)
    except ValueError as e:
        raise ConfigError(f"task.rollout_correction / task.routing_replay: {e}") from None


def injection(t, seed: int) -> MismatchInjection | None:
    try:
        inj = settings_from(MismatchInjection, t.inject_mismatch, seed=seed)
    except ValueError as e:
        raise ConfigError(f"task.{e}") from None
    return inj if inj.active else None
