"""The run a task works in, and which errors are the user's (one line, exit 2) rather than bugs (a traceback)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from mtrain.config import ConfigError, PrecisionPlan, prepare_run
from mtrain.data.errors import DataError
from mtrain.disk import DiskFull
from mtrain.lit.errors import TrainingDiverged
from mtrain.models.errors import CheckpointError
from mtrain.parallel.errors import ParallelError

# Errors in what the user asked for (config, data, checkpoint, launch) or what the machine has (disk space):
# reported as one line, never a traceback.
UserError = (ConfigError, CheckpointError, DataError, ParallelError, TrainingDiverged, DiskFull)


def user_error(e: BaseException) -> bool:
    return isinstance(e, UserError)


@dataclass
class Job:
    """A prepared job: the resolved config, the precision plan decided for it, its run dir, and whether it is one
    job of a Hydra multirun (then multi-process launches must come from torchrun/SLURM)."""

    cfg: DictConfig
    plan: PrecisionPlan
    dir: Path
    multirun: bool = False
    choices: dict[str, Optional[str]] = field(default_factory=dict)  # config-group options picked (experiment, ...)

    @classmethod
    def prepare(cls, cfg: DictConfig, run_dir: Optional[str | os.PathLike] = None, multirun: bool = False) -> "Job":
        """Decide precision and resolve ``cfg`` (a no-op on a prepared config); run dir default: the cwd."""
        cfg, plan = prepare_run(cfg)
        return cls(cfg, plan, Path(run_dir) if run_dir is not None else Path.cwd(), multirun)
