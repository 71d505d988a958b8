"""Shared test helpers: compose configs with Hydra's compose API, run the CLI in a subprocess, skip GPU tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import mtrain  # noqa: F401  (registers resolvers + schemas)
from mtrain.cli import config_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = config_dir()
ENV_VAR = "FD_ENABLE_RL"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped without CUDA."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Every test starts with FD_ENABLE_RL and HYDRA_FULL_ERROR unset, and gets back the caller's values after
    (also when the code under test sets FD_ENABLE_RL itself, as ``rl=on`` does)."""
    for var in (ENV_VAR, "HYDRA_FULL_ERROR"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def compose_cfg(overrides: Iterable[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config ``python -m mtrain <overrides>`` would run with (unresolved)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def run_cli(
    args: Iterable[str], cwd: Path, env: Optional[dict[str, str]] = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``python -m mtrain <args>`` in a subprocess, from ``cwd``, with FD_ENABLE_RL/HYDRA_FULL_ERROR unset unless
    given in ``env``. The checkout is put first on PYTHONPATH so this tests the working tree."""
    full_env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "HYDRA_FULL_ERROR")}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mtrain", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def compose_config():
    """``compose_config(overrides, return_hydra_config=False)`` -> composed (unresolved) DictConfig."""
    return compose_cfg


@pytest.fixture
def cli(tmp_path):
    """``cli(*args, env=None)`` -> CompletedProcess of ``python -m mtrain`` run from ``tmp_path``."""

    def _run(*args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
        return run_cli(args, cwd=tmp_path, env=env)

    return _run
