"""``python -m mtrain``: the Hydra entry point.

Every job: prepare the config (decide precision, resolve, record), save ``config_resolved.yaml`` in the job dir,
then dispatch to the task registered under ``cfg.task.name``.
"""

from __future__ import annotations

import gc
import importlib.resources
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from mtrain.config import ENV_VAR, ConfigError, job_dir, parse_fd_enable_rl, prepare_run, save_resolved
from mtrain.models.checkpoint import CheckpointError
from mtrain.tasks import get_task


def _user_error(e: BaseException) -> bool:
    """An error in what the user asked for (config, data, checkpoint): one line on stderr, exit 2, no traceback.
    ``mtrain.data`` is looked up only if a task imported it (importing it imports Lightning: slow for --cfg/info)."""
    data = sys.modules.get("mtrain.data.config")
    return isinstance(e, (ConfigError, CheckpointError)) or (data is not None and isinstance(e, data.DataError))

log = logging.getLogger("mtrain")


def config_dir() -> Path:
    """The config tree: ``mtrain/conf`` inside an installed wheel, else the checkout's top-level ``conf/``."""
    installed = Path(str(importlib.resources.files("mtrain"))) / "conf"
    if (installed / "config.yaml").is_file():
        return installed
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    raise RuntimeError(f"mtrain: config tree not found (looked in {installed} and {checkout})")


CONFIG_DIR = config_dir()


def _error(msg: Any) -> None:
    print(f"mtrain: error: {msg}", file=sys.stderr)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _cleanup() -> None:
    """Free what a job left behind, so the next job of a sequential multirun starts clean."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_job(cfg: DictConfig) -> dict:
    """One job: prepare + save the resolved config, run the task, return its metrics."""
    saved_env = os.environ.get(ENV_VAR)
    try:
        resolved, _plan = prepare_run(cfg)
        out = job_dir()
        path = save_resolved(resolved, out)
        log.info("task=%s, run dir %s (resolved config: %s)", resolved.task.name, out, path.name)
        result = get_task(resolved.task.name)(resolved)
        metrics = out / "metrics.json"
        if isinstance(result, dict) and not metrics.exists():  # every job leaves its results for the sweep summary
            metrics.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return result
    finally:
        # rl=on exports FD_ENABLE_RL=1 for this job only; the next job of a multirun must see the user's value.
        if saved_env is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved_env
        _cleanup()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> Optional[dict]:
    try:
        return run_job(cfg)
    except Exception as e:
        if not _user_error(e):
            raise
        _error(e)
        if _multirun():
            # Hydra records the job as failed (the sweep summary shows it), runs the others, then reports;
            # as a ConfigError (a compact Hydra exception) the report is this one line, not a traceback.
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(str(e)) from e
        sys.exit(2)


def main() -> None:
    # Fail early, in one line, on a bad FD_ENABLE_RL: it is read while composing (and by --cfg job --resolve).
    try:
        parse_fd_enable_rl(os.environ.get(ENV_VAR))
    except ConfigError as e:
        _error(e)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
