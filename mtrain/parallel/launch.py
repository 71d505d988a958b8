"""How multi-device jobs are launched, and the check that keeps Lightning from re-running ``sys.argv`` under ``-m``.

One process per device, started from outside the Python program:

* a single node: ``torchrun --nproc_per_node N -m mtrain trainer=fsdp trainer.devices=N ...``;
* a SLURM cluster: ``python -m mtrain -m hydra/launcher=slurm trainer=fsdp trainer.devices=N ...`` (submitit starts
  ``tasks_per_node = trainer.devices`` tasks per node, each running the Hydra job).

Lightning sees torchrun's (``TorchElasticEnvironment``) or SLURM's (``SLURMEnvironment``) variables, whose processes
are created externally, and does not launch any. Without such an environment and with more than one device,
Lightning's subprocess launcher would re-run ``sys.argv`` once per extra device: under ``-m`` every child would run
the whole sweep. :func:`check_launch` refuses that case with a message naming both ways to launch.

The checks here read the config alone (``uses_fsdp``: does ``trainer`` select FSDP2) and import Lightning only when a
job has several processes, so that a job's config checks run before Lightning's import (``mtrain.job.preflight``).
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from typing import Any, Mapping

from .errors import ParallelError

STRATEGY = "fsdp2"  # trainer.strategy value that selects FSDP2 through ModelParallelStrategy (trainer=fsdp)


def uses_fsdp(trainer_cfg: Any) -> bool:
    """Whether the ``trainer`` config node selects FSDP2 (``trainer=fsdp``); read from the config alone."""
    return str(getattr(trainer_cfg, "strategy", "auto")) == STRATEGY


def external_launcher() -> str | None:
    """``"torchrun"`` or ``"slurm"`` when this process is one of several created by that launcher, else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return "torchrun"
    with warnings.catch_warnings():  # its hint to prepend srun: check_launch says how to launch, when it matters
        warnings.filterwarnings("ignore", message=".*The `srun` command is available.*")
        if SLURMEnvironment.detect():
            return "slurm"
    return None


def num_devices(devices: Any, accelerator: str = "auto") -> int:
    """How many devices per node ``trainer.devices`` asks for (int, list of ids, "-1" or "auto")."""
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)
    if str(devices) in ("auto", "-1"):
        import torch

        return torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    return int(devices)


def check_launch(devices: Any, num_nodes: int = 1, *, multirun: bool, accelerator: str = "auto") -> str | None:
    """Refuse a multi-process job that Lightning would launch by re-running ``sys.argv`` under a Hydra multirun.

    Returns the external launcher (``"torchrun"``/``"slurm"``) or None (one process, or Lightning's own launcher
    in a single run)."""
    world = num_devices(devices, accelerator) * int(num_nodes)
    if world <= 1:
        return None  # one process: nothing to launch (and no Lightning import to find that out)
    launcher = external_launcher()
    if launcher is not None:
        return launcher
    if multirun:
        raise ParallelError(
            f"trainer.devices={devices} (x trainer.num_nodes={num_nodes}) under -m without torchrun or SLURM: "
            "Lightning would start the extra processes by re-running the command line, sweep included. Launch one "
            f"process per device instead: `torchrun --nproc_per_node {num_devices(devices, accelerator)} -m mtrain "
            "...` for one run, or `python -m mtrain -m hydra/launcher=slurm ...` for a sweep on a SLURM cluster"
        )
    return None


# the signal submitit's SLURM jobs get ahead of their time limit (``#SBATCH --signal=USR2@<s>``; its env var renames it)
SUBMITIT_SIGNAL_VAR = "SUBMITIT_PREEMPT_SIGNAL"


def requeue_signals(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The signals that mean "checkpoint now, then back in the queue": SIGUSR1 (``sbatch --signal=USR1@<s>``,
    Lightning's default) and, in a job started by submitit (``hydra/launcher=slurm``), submitit's own (SIGUSR2)."""
    env = os.environ if environ is None else environ
    names = ["SIGUSR1"]
    if env.get("SUBMITIT_EXECUTOR") == "slurm":
        names.append("SIG" + env.get(SUBMITIT_SIGNAL_VAR, "USR2").upper().removeprefix("SIG"))
    return tuple(dict.fromkeys(names))


def slurm_restarted(environ: Mapping[str, str] | None = None) -> bool:
    """True in a SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0): its run dir holds its own checkpoint."""
    env = os.environ if environ is None else environ
    count = env.get("SLURM_RESTART_COUNT", "0")
    return count.isdigit() and int(count) > 0


def resume_request(ckpt_path: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``task.ckpt_path`` as the job means it: a requeued SLURM job without one resumes as with ``auto``."""
    return "auto" if ckpt_path is None and slurm_restarted(environ) else ckpt_path


def slurm_cpus_per_task(environ: Mapping[str, str] | None = None) -> int | None:
    """The CPUs SLURM gave each task (``--cpus-per-task``), or None outside SLURM. torch sizes its thread pool from
    the machine, not the allocation: two jobs sharing a node would each run as many threads as the node has."""
    env = os.environ if environ is None else environ
    n = env.get("SLURM_CPUS_PER_TASK", "")
    return int(n) if env.get("SLURM_JOB_ID") and n.isdigit() and int(n) > 0 else None


def slurm_requeue(environ: Mapping[str, str] | None = None) -> str | None:
    """Under SLURM, put this job back in the queue (``scontrol requeue``, what Lightning's SLURM auto-requeue does
    on SIGUSR1); call on rank 0 after the checkpoint is written. Its rerun lands in the same job dir and continues
    with ``task.ckpt_path=auto``. Returns the job id requeued, or None outside SLURM or when scontrol failed."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if not job or not re.fullmatch(r"[0-9_]+", job):
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return job if done.returncode == 0 else None
