"""``trainer.profiler``: Lightning's profilers, checked without importing Lightning (a job's config checks run
before its import: ``mtrain.job.preflight``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mtrain.config import ConfigError

PROFILERS = ("simple", "advanced")


def check_profiler(kind: Optional[str]) -> None:
    if kind is not None and kind not in PROFILERS:
        raise ConfigError(f"trainer.profiler={kind!r} is not one of {', '.join(PROFILERS)} or null")


def make_profiler(kind: str, run_dir: Path):
    """``trainer.profiler``: Lightning's ``simple`` (host seconds per loop action: where a host-bound step goes) or
    ``advanced`` (cProfile of each action), writing ``<run dir>/fit-profile.txt``."""
    from lightning.pytorch.profilers import AdvancedProfiler, SimpleProfiler

    check_profiler(kind)
    return {"simple": SimpleProfiler, "advanced": AdvancedProfiler}[kind](dirpath=str(run_dir), filename="profile")
