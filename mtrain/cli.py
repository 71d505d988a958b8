"""``python -m mtrain``: the Hydra entry point.

Every job: prepare the config (decide precision, resolve, record), save ``config_resolved.yaml`` in the job dir,
then dispatch to the task registered under ``cfg.task.name``.
"""

from __future__ import annotations

import gc
import importlib.resources
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from mtrain.config import ENV_VAR, ConfigError, job_dir, parse_fd_enable_rl, prepare_run, save_resolved
from mtrain.tasks import get_task

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
        return get_task(resolved.task.name)(resolved)
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
    except ConfigError as e:
        _error(e)
        if _multirun():
            raise  # Hydra records the job as failed, runs the others, then reports
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
