"""The OmegaConf resolvers, the ONE precision decision, and run preparation (decide, resolve, record).

Importing this module (``import mtrain`` does) registers the resolvers and the schemas (``mtrain.schema``) in
Hydra's ConfigStore, idempotently, so they also exist in joblib/submitit workers and Lightning subprocesses.

Precedence of the router-gate precision (``model.moe_gate_fp32``), highest first:

1. an explicit ``model.moe_gate_fp32=true|false`` override,
2. an explicitly chosen ``rl=on|off``,
3. the environment variable ``FD_ENABLE_RL``,
4. the default: off.

``model.rope_fp32`` follows the same chain (its own override first). ``rl=on`` exports ``FD_ENABLE_RL=1`` to the
job's environment so a process the job starts (a rollout engine) agrees with the trainer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Tuple

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from mtrain.models.config import MoEConfig
from mtrain.models.precision import PrecisionPolicy
from mtrain.models.registry import FAMILIES
from mtrain.schema import LOGGER_SCHEMAS, model_schema, register_schemas

log = logging.getLogger("mtrain")

ENV_VAR = "FD_ENABLE_RL"
ON_SPELLINGS = ("1", "true", "on", "yes")
OFF_SPELLINGS = ("0", "false", "off", "no")
RL_CHOICES = ("on", "off", "auto")
DTYPES = ("float32", "bfloat16")
RESOLVED_NAME = "config_resolved.yaml"


class ConfigError(ValueError, CompactHydraException):
    """A user-facing configuration error; its message is one line that names the offending key or variable.

    Also a Hydra ``CompactHydraException``, so Hydra prints only the message (no traceback) if it sees it.
    """


# ---------------------------------------------------------------------------------------------------------------
# FD_ENABLE_RL and the precision decision
# ---------------------------------------------------------------------------------------------------------------


def parse_fd_enable_rl(value: Optional[str]) -> bool:
    """Strictly decode ``FD_ENABLE_RL``: unset/empty/0/false/off/no -> False; 1/true/on/yes -> True."""
    if value is None:
        return False
    v = value.strip().lower()
    if v == "" or v in OFF_SPELLINGS:
        return False
    if v in ON_SPELLINGS:
        return True
    raise ConfigError(
        f"{ENV_VAR}={value!r} is not a valid switch; accepted (case-insensitive): "
        f"{'/'.join(ON_SPELLINGS)} for on, {'/'.join(OFF_SPELLINGS)}, empty or unset for off"
    )


def _fmt(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


@dataclass(frozen=True)
class PrecisionPlan:
    """The outcome of :func:`decide_precision`: each value with the place it came from."""

    moe_gate_fp32: bool
    rope_fp32: bool
    source: str  # where moe_gate_fp32 came from: "model.moe_gate_fp32=false (override)", "rl=on", "FD_ENABLE_RL=1", "default"
    rope_source: str
    rl: bool  # RL alignment in effect (rl choice, else FD_ENABLE_RL, else off)
    rl_source: str
    export_env: Optional[str] = None  # value of FD_ENABLE_RL to put into the job's environment; None = leave as is
    warnings: Tuple[str, ...] = ()
    exact_rollout: bool = False  # the rollout engine's exact mode (logprobs and experts = the trainer's, bit for bit)
    exact_source: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return {
            "moe_gate_fp32": {"value": self.moe_gate_fp32, "source": self.source},
            "rope_fp32": {"value": self.rope_fp32, "source": self.rope_source},
            "rl": {"value": self.rl, "source": self.rl_source},
            "exact_rollout": {"value": self.exact_rollout, "source": self.exact_source},
            "export_env": self.export_env,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrecisionPlan":
        return cls(
            moe_gate_fp32=bool(d["moe_gate_fp32"]["value"]),
            source=str(d["moe_gate_fp32"]["source"]),
            rope_fp32=bool(d["rope_fp32"]["value"]),
            rope_source=str(d["rope_fp32"]["source"]),
            rl=bool(d["rl"]["value"]),
            rl_source=str(d["rl"]["source"]),
            export_env=d.get("export_env"),
            warnings=tuple(d.get("warnings") or ()),
            exact_rollout=bool((d.get("exact_rollout") or {}).get("value", False)),
            exact_source=str((d.get("exact_rollout") or {}).get("source", "default")),
        )

    @property
    def policy(self) -> PrecisionPolicy:
        """What the lower layers apply: the router and RoPE precision (and, from them, TF32 and FSDP units)."""
        return PrecisionPolicy(moe_gate_fp32=self.moe_gate_fp32, rope_fp32=self.rope_fp32)

    @contextlib.contextmanager
    def job_env(self) -> Iterator[None]:
        """``FD_ENABLE_RL`` as the plan says (``rl=on`` -> 1) for the job, the user's value restored after it (the
        next job of a multirun must see the user's value)."""
        saved = os.environ.get(ENV_VAR)
        if self.export_env is not None:
            os.environ[ENV_VAR] = self.export_env
            log.info("exported %s=%s to processes this job starts", ENV_VAR, self.export_env)
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = saved

    def summary(self) -> str:
        return (
            f"moe_gate_fp32={_fmt(self.moe_gate_fp32)} [{self.source}], "
            f"rope_fp32={_fmt(self.rope_fp32)} [{self.rope_source}], "
            f"exact_rollout={_fmt(self.exact_rollout)} [{self.exact_source}]"
        )


def decide_precision(
    gate_override: Optional[bool],
    rl_choice: str,
    env: Mapping[str, str],
    rope_override: Optional[bool] = None,
) -> PrecisionPlan:
    """The one precision decision. Pure: reads only its arguments.

    gate_override / rope_override: an explicit ``model.moe_gate_fp32`` / ``model.rope_fp32`` value, or None.
    rl_choice: ``rl.mode`` — "on", "off" or "auto" (follow ``FD_ENABLE_RL``).
    env: the environment (``os.environ``); ``FD_ENABLE_RL`` is parsed strictly even when ``rl`` is explicit.
    """
    if rl_choice not in RL_CHOICES:
        raise ConfigError(f"rl.mode={rl_choice!r} is not one of {', '.join(RL_CHOICES)}")
    raw = env.get(ENV_VAR)
    env_on = parse_fd_enable_rl(raw)
    env_set = raw is not None and raw.strip() != ""
    env_side = f"{ENV_VAR}={raw.strip()}" if env_set else None

    warnings: list[str] = []
    export: Optional[str] = None
    if rl_choice in ("on", "off"):
        rl, rl_source = rl_choice == "on", f"rl={rl_choice}"
        if rl:
            export = "1"
        elif env_on:
            export = "0"
        if env_set and env_on != rl:
            warnings.append(
                f"rl={rl_choice} overrides {env_side}: moe_gate_fp32 and rope_fp32 follow rl={rl_choice}; "
                f"{ENV_VAR}={export} is exported to processes this job starts"
            )
    elif env_set:
        rl, rl_source = env_on, env_side
    else:
        rl, rl_source = False, "default"

    def pick(key: str, override: Optional[bool]) -> Tuple[bool, str]:
        if override is None:
            return rl, rl_source
        if rl_source != "default" and override != rl:
            side = "on" if rl else "off"
            what = "the router gate" if key == "moe_gate_fp32" else "RoPE"
            warnings.append(
                f"model.{key}={_fmt(override)} (override) overrides {rl_source}: the trainer computes {what} in "
                f"{'fp32' if override else 'the model dtype'} although RL alignment is {side}, so train and rollout "
                "may disagree"
            )
        return bool(override), f"model.{key}={_fmt(override)} (override)"

    gate, gate_source = pick("moe_gate_fp32", gate_override)
    rope, rope_source = pick("rope_fp32", rope_override)
    # the rollout engine's exact mode follows the RL decision (a task's explicit task.exact overrides it:
    # prepare_run)
    return PrecisionPlan(gate, rope, gate_source, rope_source, rl, rl_source, export, tuple(warnings), rl, rl_source)


def with_exact_override(plan: PrecisionPlan, exact: Optional[bool]) -> PrecisionPlan:
    """The plan with a task's explicit ``task.exact`` in place of the RL decision's exact rollout (a warning when it
    goes against RL alignment)."""
    if exact is None:
        return plan
    warnings = plan.warnings
    if plan.rl and not exact:
        warnings += (f"task.exact=false (override) with RL alignment on [{plan.rl_source}]: the rollout engine's "
                     "logprobs and experts will differ from the trainer's recompute (mismatch/* shows by how much)",)
    return dataclasses.replace(plan, exact_rollout=bool(exact), exact_source=f"task.exact={_fmt(bool(exact))} "
                               "(override)", warnings=warnings)


def dtype_for_precision(precision: Any) -> str:
    """Model dtype that follows Lightning's ``trainer.precision``: bfloat16 for ``bf16-true``, else float32."""
    return "bfloat16" if str(precision) == "bf16-true" else "float32"


# ---------------------------------------------------------------------------------------------------------------
# Resolvers
# ---------------------------------------------------------------------------------------------------------------


def _gate_fp32_resolver(rl_mode: str) -> bool:
    return decide_precision(None, str(rl_mode), os.environ).moe_gate_fp32


def _rope_fp32_resolver(rl_mode: str) -> bool:
    return decide_precision(None, str(rl_mode), os.environ).rope_fp32


def dir_name(text: Any, limit: int = 120) -> str:
    """A string made safe as one path component: separators and characters a shell or file system mind become
    ``_`` (a path in an override never nests the job dir), cut to ``limit`` characters."""
    safe = re.sub(r"[^A-Za-z0-9=,._+-]", "_", str(text))
    return safe[:limit].strip(".") or "job"


def gpus_per_node(accelerator: Any, devices: Any) -> Optional[int]:
    """GPUs to ask a scheduler for per node: ``trainer.devices`` unless the trainer runs on the CPU (then none)."""
    return None if str(accelerator) == "cpu" else int(devices)


RESOLVERS = {
    "mtrain.moe_gate_fp32": _gate_fp32_resolver,  # ${mtrain.moe_gate_fp32:${rl.mode}}
    "mtrain.rope_fp32": _rope_fp32_resolver,  # ${mtrain.rope_fp32:${rl.mode}}
    "mtrain.dtype": dtype_for_precision,  # ${mtrain.dtype:${trainer.precision}}
    "mtrain.dir_name": dir_name,  # hydra.sweep.subdir: ${mtrain.dir_name:${hydra.job.override_dirname}}
    "mtrain.gpus_per_node": gpus_per_node,  # hydra/launcher=slurm: ${mtrain.gpus_per_node:${trainer.accelerator},...}
}


def register_resolvers() -> None:
    """Register mtrain's OmegaConf resolvers (idempotent). Never cached: the environment may change."""
    for name, fn in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


# ---------------------------------------------------------------------------------------------------------------
# Run preparation: decide, resolve, record
# ---------------------------------------------------------------------------------------------------------------


def _override(node: DictConfig, key: str) -> Optional[bool]:
    """An explicit value of ``node.key`` (None when it is the default interpolation or null)."""
    if OmegaConf.is_interpolation(node, key):
        return None
    return node[key]


def _resolve_copy(cfg: DictConfig) -> DictConfig:
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.pop("hydra", None)
    try:
        OmegaConf.resolve(out)
    except InterpolationResolutionError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise
    return out


def _refuse_unknown_keys(cfg: DictConfig) -> None:
    """Keys added with ``+group.key=...`` that the group's schema does not know (Hydra lets ``+`` add keys even to
    typed nodes) are refused here, with their names."""
    loggers = cfg.get("logger") or {}
    unknown = sorted(set(loggers) - set(LOGGER_SCHEMAS))
    if unknown:
        raise ConfigError(f"logger: unknown logger(s) {', '.join(unknown)}; known: {', '.join(LOGGER_SCHEMAS)} "
                          "(choose them with logger=[csv,wandb])")
    for name in loggers:  # +logger.wandb.project=x without logger=wandb: an untyped node, not the logger's config
        if OmegaConf.get_type(loggers[name]) is not LOGGER_SCHEMAS[name]:
            raise ConfigError(f"logger.{name} is set but {name} is not selected: add it, e.g. logger=[csv,{name}], "
                              f"and set logger.{name}.<key>=... without the +")
    for group in ("model", "task", "data", "trainer", "rl", *(f"logger.{name}" for name in loggers)):
        node = OmegaConf.select(cfg, group)
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if schema is None or not dataclasses.is_dataclass(schema):
            continue
        known = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(set(node.keys()) - known)
        if unknown:
            raise ConfigError(f"{group}: unknown key(s) {', '.join(f'{group}.{k}' for k in unknown)}; "
                              f"known: {', '.join(sorted(known))}")


def prepare_run(cfg: DictConfig) -> Tuple[DictConfig, PrecisionPlan]:
    """Decide precision, resolve the config, and record the decision in it.

    Returns a resolved copy of ``cfg`` (typed, struct) in which ``model.moe_gate_fp32``, ``model.rope_fp32`` and
    ``model.dtype`` hold concrete values, plus a ``precision:`` section (each value with its source, the
    ``FD_ENABLE_RL`` to export and the warnings), and the plan. Logs the decision and each warning once.
    Idempotent: a config that already has a ``precision:`` section is returned as is with its plan.
    """
    if "precision" in cfg:
        return cfg, PrecisionPlan.from_dict(OmegaConf.to_container(cfg.precision, resolve=True))  # type: ignore[arg-type]

    _refuse_unknown_keys(cfg)
    model = cfg.model
    if model.name not in FAMILIES or OmegaConf.get_type(model) is not model_schema(FAMILIES[model.name]):
        raise ConfigError(
            f"model.name={model.name!r} does not match the selected model config; pick the model with "
            f"model={'|'.join(sorted(FAMILIES))} rather than by setting model.name"
        )
    plan = decide_precision(
        _override(model, "moe_gate_fp32"), str(cfg.rl.mode), os.environ, _override(model, "rope_fp32")
    )
    plan = with_exact_override(plan, cfg.task.get("exact") if isinstance(cfg.get("task"), DictConfig) else None)
    dtype_override = None if OmegaConf.is_interpolation(model, "dtype") else model.dtype

    out = _resolve_copy(cfg)
    if dtype_override is None:
        dtype, dtype_source = dtype_for_precision(out.trainer.precision), f"trainer.precision={out.trainer.precision}"
    else:
        dtype, dtype_source = str(dtype_override), f"model.dtype={dtype_override} (override)"
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of {', '.join(DTYPES)} or null (follow trainer.precision)")
    arch: MoEConfig = OmegaConf.to_object(out.model.arch)  # type: ignore[assignment]
    try:
        arch.validate()
    except ValueError as e:
        raise ConfigError(f"model.arch: {e}") from None

    out.model.moe_gate_fp32 = plan.moe_gate_fp32
    out.model.rope_fp32 = plan.rope_fp32
    out.model.dtype = dtype
    record = plan.to_dict()
    record["dtype"] = {"value": dtype, "source": dtype_source}
    with open_dict(out):
        out.precision = record

    log.info("precision: %s, dtype=%s [%s]", plan.summary(), dtype, dtype_source)
    for w in plan.warnings:
        log.warning(w)
    return out, plan


def save_resolved(cfg: DictConfig, run_dir: str | os.PathLike) -> Path:
    """Write the (prepared) config, fully resolved, to ``<run_dir>/config_resolved.yaml``; return its path."""
    path = Path(run_dir) / RESOLVED_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


register_resolvers()
register_schemas()

__all__ = [
    "ConfigError",
    "ENV_VAR",
    "PrecisionPlan",
    "decide_precision",
    "dtype_for_precision",
    "parse_fd_enable_rl",
    "prepare_run",
    "register_resolvers",
    "register_schemas",
    "save_resolved",
]
