"""Shared test helpers: compose configs with Hydra's compose API, run the CLI in a subprocess, skip GPU tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

import pytest

# One torch thread per test process (inherited by the jobs tests start): the suite runs in two workers
# (pytest -n 2, README), and two processes spinning two OpenMP threads each on 2 cores slow each other down many
# times over. Before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import mtrain  # noqa: F401,E402  (registers resolvers + schemas)
from mtrain.cli import config_dir  # noqa: E402

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
    args: Iterable[str], cwd: Path, env: Optional[dict[str, str]] = None, timeout: float = 120,
    entry: tuple[str, ...] = ("-m", "mtrain"),
) -> subprocess.CompletedProcess:
    """``python -m mtrain <args>`` (or ``python <entry> <args>``) in a subprocess, from ``cwd``, with
    FD_ENABLE_RL/HYDRA_FULL_ERROR unset unless given in ``env``. The checkout is put first on PYTHONPATH so this
    tests the working tree."""
    full_env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "HYDRA_FULL_ERROR")}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *entry, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# trainer=fsdp on CPU (gloo) through Lightning, for tests/test_parallel.py (torchrun) and tests/test_slurm.py (SLURM).
# 24 train rows: an epoch is 3 steps of a global batch of 8 (4 per rank on 2 ranks), so the step-3 checkpoint sits
# at an epoch boundary (mid-epoch resumes: tests/test_faults.py). rl=on: fp32 gates in their own
# FSDP units; 32-true so that 1 and 2 processes agree to float rounding.
LIT = [
    "task=sft", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=6",
    "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "rl=on",
    "data.num_train=24", "data.num_val=16", "task.warmup_steps=0", "task.save_top_k=2", "task.accuracy=false",
]


def train_losses(run: Path) -> list[float]:
    """The train loss of every logged step, from a run dir's CSV log."""
    import csv

    with (run / "csv" / "metrics.csv").open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture(scope="session")
def fsdp_one_process(tmp_path_factory) -> Path:
    """The run dir of ``LIT`` on one process with the whole global batch: what 2 ranks must match."""
    root = tmp_path_factory.mktemp("fsdp_one")
    r = run_cli([*LIT, "trainer.devices=1", "data.batch_size=8", f"hydra.run.dir={root / 'one'}"], cwd=root,
                timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return root / "one"


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
