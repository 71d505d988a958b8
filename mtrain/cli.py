"""``python -m mtrain``: the Hydra entry point, and the only module that knows Hydra's run.

Every job: compose -> decide precision once (``prepare_run``: resolve, record) -> save ``config_resolved.yaml`` in
the job dir -> hand the :class:`mtrain.job.Job` (config, plan, run dir) to the task registered under
``cfg.task.name``, with ``FD_ENABLE_RL`` exported as the plan says for the job's duration.
"""

from __future__ import annotations

import gc
import importlib.resources
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from mtrain.config import ENV_VAR, ConfigError, parse_fd_enable_rl, prepare_run, save_resolved
from mtrain.job.preflight import check_model_job
from mtrain.job.records import interruptions, write_json
from mtrain.job.run import Job, user_error
from mtrain.parallel.launch import requeue_signals, resume_request, slurm_requeue
from mtrain.rundir import claim
from mtrain.tasks import MODEL_TASKS, check_task, get_task

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
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_dir() -> Path:
    """The current Hydra job's output dir (run dir, or the job's sweep subdir); the cwd outside a Hydra job."""
    if HydraConfig.initialized():
        out = HydraConfig.get().runtime.output_dir
        if out:
            return Path(out)
    return Path.cwd()


def _choices() -> dict[str, Optional[str]]:
    """The option picked for each config group (``experiment``, ``trainer``, ...)."""
    if not HydraConfig.initialized():
        return {}
    return {k: None if v is None else str(v) for k, v in HydraConfig.get().runtime.choices.items()}


def _cleanup() -> None:
    """Free what a job left behind, so the next job of a sequential multirun starts clean."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


RESULTS = ("metrics.json", "checkpoints", "hf_model")


def check_run_dir(job: Job) -> None:
    """Refuse to run in a dir that holds another run's results (they would be replaced, or mixed with this run's),
    unless the job resumes a checkpoint of that dir or ``task.overwrite=true``."""
    found = [name for name in RESULTS if (job.dir / name).exists()]
    if not found or job.cfg.task.get("overwrite", False):
        return
    ckpt = resume_request(job.cfg.task.get("ckpt_path"))  # a requeued SLURM job: auto
    if ckpt == "auto" or (ckpt and job.dir.resolve() in Path(ckpt).resolve().parents):
        return  # it resumes this dir's run
    last = job.dir / "checkpoints" / "last.ckpt"
    resume = f" resume it with task.ckpt_path={last}," if last.exists() else ""
    raise ConfigError(f"run dir {job.dir} already holds another run's results ({', '.join(found)}); choose a new "
                      f"hydra.run.dir,{resume} or set task.overwrite=true to replace them")


def run_job(cfg: DictConfig) -> dict:
    """One job: decide + save the resolved config, run the task with the plan's environment, return its metrics."""
    try:
        claim(job_dir())  # one job at a time in a run dir (a single run claimed it before Hydra wrote to it)
        resolved, plan = prepare_run(cfg)
        job = Job(resolved, plan, job_dir(), multirun=_multirun(), choices=_choices())
        check_run_dir(job)
        if resume_request(job.cfg.task.get("ckpt_path")) is None:
            # a fresh start (task.overwrite=true over an old run): that run's status.json is not this one's history
            (job.dir / "status.json").unlink(missing_ok=True)
        path = save_resolved(resolved, job.dir)
        log.info("task=%s, run dir %s (resolved config: %s)", resolved.task.name, job.dir, path.name)
        if resolved.task.name in MODEL_TASKS:  # before the task's module (and Lightning) is imported: fails fast
            check_model_job(resolved, job.multirun)
            check_task(job)
        with plan.job_env():
            result = get_task(resolved.task.name)(job)
        metrics = job.dir / "metrics.json"
        rank_zero = os.environ.get("RANK", "0") == "0"  # under torchrun every rank returns; one writes
        if isinstance(result, dict) and rank_zero and not metrics.exists():  # results for the sweep summary
            write_json(metrics, result)
        return result
    finally:
        _cleanup()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> Optional[dict]:
    try:
        return run_job(cfg)
    except SystemExit as e:
        stop = _stopped_by_signal(e)
        if stop is None:
            raise
        sys.exit(interrupted(stop))  # 128 + the signal: what a scheduler expects of a job that was told to stop
    except KeyboardInterrupt as e:  # Ctrl-C outside a fit's steps, or a second one while a stop was being written
        last = job_dir() / "checkpoints" / "last.ckpt"
        e.mtrain_signal = "SIGINT"
        e.mtrain_checkpoint = getattr(e, "mtrain_checkpoint", str(last) if last.exists() else None)
        sys.exit(interrupted(e))
    except Exception as e:
        if not user_error(e):
            raise
        _error(e)
        if _multirun():
            # Hydra records the job as failed (the sweep summary shows it), runs the others, then reports;
            # as a ConfigError (a compact Hydra exception) the report is this one line, not a traceback.
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(str(e)) from e
        sys.exit(2)


def _stopped_by_signal(e: SystemExit) -> Optional[BaseException]:
    """The exception of a fit told to stop, or None: Lightning raises ``SIGTERMException`` on SIGTERM (and SIGUSR1,
    through ``StopOnSignal``), and exits 1 after a ``KeyboardInterrupt`` (Ctrl-C, SIGINT) that
    ``LastCheckpoint`` recorded. Lightning is only looked at if a job imported it (the config path never does)."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    if exceptions is not None and isinstance(e, exceptions.SIGTERMException):
        return e
    if isinstance(e.__context__, KeyboardInterrupt) and hasattr(e.__context__, "mtrain_step"):
        return e.__context__
    return None


def interrupted(e: BaseException) -> int:
    """Record a job stopped by a signal: ``status.json`` says ``interrupted`` with the signal, the step and the
    checkpoint to resume from (``LastCheckpoint`` wrote it at that step). Returns the exit code, 128 + the signal."""
    name = getattr(e, "mtrain_signal", "SIGTERM")
    step, ckpt = getattr(e, "mtrain_step", None), getattr(e, "mtrain_checkpoint", None)
    status = {"status": "interrupted", "signal": name, "step": step, "checkpoint": ckpt,
              "error": f"interrupted by {name}" + (f" at step {step}" if step is not None else "")}
    past = interruptions(job_dir() / "status.json")
    if past:
        status["interruptions"] = past
    requeued = None
    if name in requeue_signals() and ckpt and os.environ.get("RANK", "0") == "0":
        # SLURM's warning ahead of the time limit: back in the queue; the rerun, in this job dir, resumes. A running
        # job that is requeued is also killed (SIGTERM, then SIGKILL after KillWait): let this exit finish first.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        requeued = slurm_requeue()
    if requeued:
        status["requeued"] = requeued
    write_json(job_dir() / "status.json", status)
    resume = f"; requeued SLURM job {requeued}" if requeued else f"; resume with task.ckpt_path={ckpt}" if ckpt else ""
    _error(f"interrupted by {name}" + (f" at step {step}" if step is not None else "")
           + (f", checkpoint {ckpt}" if ckpt else "") + resume)
    return 128 + int(getattr(signal, name, signal.SIGTERM))


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
