"""The ``lightning.Trainer`` of a run: ``cfg.trainer`` kwargs, loggers, progress bar, checkpoints, quiet logs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf

from mtrain.data.sampler import ResumeData
from mtrain.lit.checkpoint_io import BackgroundCheckpointIO
from mtrain.lit.checkpointing import make_checkpoint
from mtrain.lit.guards import FiniteGuard
from mtrain.lit.loggers import make_loggers
from mtrain.lit.profilers import make_profiler
from mtrain.lit.progress import StepProgressBar
from mtrain.lit.signals import StopOnSignal
from mtrain.parallel.lightning import trainer_kwargs

log = logging.getLogger("mtrain")

# Lightning hints that do not apply to the tiny in-memory datasets of mtrain (the data is tokenized up front).
_QUIET = (
    r".*does not have many workers.*",
    r".*is smaller than the logging interval.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # val/loss and val/ppl are already summed over ranks (MoELitModule.on_validation_epoch_end)
    r".*when logging on epoch level in distributed setting to accumulate the metric across devices.*",
    # trainer=fsdp: last.ckpt is a distributed-checkpoint folder, rewritten in place on purpose
    r".*Detected an existing checkpoint in .*overwriting since self.overwrite=True.*",
    # a one-process run on a SLURM login/compute node: srun is there but not needed (multi-process: launch.py checks)
    r".*The `srun` command is available on your system but is not used.*",
    # resumed into its own run dir, a job continues its log and checkpoints (mtrain.lit.csvlog, LastCheckpoint)
    r".*Checkpoint directory .* exists and is not empty.*",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if "Tip:" in msg:
            return False
        # with an fp32 gate, TF32 is off on purpose (PrecisionPolicy.apply_backends); Lightning's hint to turn it on is noise
        return not ("set_float32_matmul_precision" in msg and not torch.backends.cuda.matmul.allow_tf32)


def quiet_lightning() -> None:
    """Drop Lightning hints that do not apply, and print its log lines once: ``import lightning`` gives the
    ``lightning`` logger a console handler of its own, which repeats every line the root logger (Hydra's, in a job)
    already prints."""
    root, own = logging.getLogger(), logging.getLogger("lightning")
    if root.handlers:
        for h in list(own.handlers):
            if type(h) is logging.StreamHandler:
                own.removeHandler(h)
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    rz = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rz.filters):
        rz.addFilter(_DropTips())


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    *,
    has_val: bool = True,
    callbacks: Iterable[L.Callback] = (),
    checkpoint: bool = True,
    save_top_k: int = 1,
    checkpoint_every: Optional[int] = None,
    loggers: bool = True,
    resume: bool = False,
    multirun: bool = False,
    **overrides: Any,
) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` (its keys are Trainer kwargs) with the run's callbacks and the
    loggers of ``cfg.logger`` (``loggers=False``: none); ``resume``: the fit resumes a checkpoint (the CSV log and
    the W&B/MLflow runs continue the run dir's own)."""
    quiet_lightning()
    kw: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    kw.update(overrides)
    kw = trainer_kwargs(kw, multirun=multirun)  # strategy=fsdp2 -> ModelParallelStrategy; the -m launch check
    # mtrain's loaders shard themselves over ranks (EpochSampler); Lightning's sampler replacement would wrap them
    kw.setdefault("use_distributed_sampler", False)
    if not has_val:
        kw["limit_val_batches"] = 0
        kw["num_sanity_val_steps"] = 0
    cbs = list(callbacks)
    if kw.get("enable_progress_bar", True):
        cbs.append(StepProgressBar())
    cbs.append(ResumeData())  # a resumed epoch continues after the batches it trained on
    cbs.append(StopOnSignal())  # SIGUSR1 stops like SIGTERM (checkpoint at the current step)
    cbs.append(FiniteGuard(every=int(kw.get("log_every_n_steps") or 1)))  # before the checkpoints see the step
    if checkpoint:
        cbs += make_checkpoint(run_dir, has_val, save_top_k, checkpoint_every)
    if kw.get("profiler") is not None:
        kw["profiler"] = make_profiler(kw["profiler"], run_dir)
    if isinstance(kw.get("strategy", "auto"), str) and "plugins" not in kw:  # trainer=fsdp: distributed checkpoints
        kw["plugins"] = [BackgroundCheckpointIO()]  # written in a thread: the loop waits for a host copy only
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        logger=make_loggers(cfg, run_dir, resume) if loggers else False,
        callbacks=cbs,
        enable_checkpointing=checkpoint,
        enable_model_summary=False,  # the tasks log their own one-line summary (total and active parameters)
        **kw,
    )
    if type(trainer.strategy) is SingleDeviceStrategy:
        trainer.strategy.__class__ = _StayOnDevice
    sigterm_check_every(trainer, int(kw.get("log_every_n_steps") or 1))
    return trainer


def sigterm_check_every(trainer: L.Trainer, every: int) -> None:
    """With more than one process, Lightning broadcasts rank 0's SIGTERM flag before *every* training batch and reads
    it back with ``.item()``: a host sync a step, which drains the GPU's queue and leaves it idle while the next
    step's launches catch up (Lightning issue #21487; PR #21640 proposes ``broadcast_sigterm_every_n_steps``). Here
    it runs on the batches of every ``every``-th optimizer step (the logging interval, where the loop syncs anyway).
    Every rank decides from ``global_step`` alone, so all of them join the same broadcasts. What it costs: when only
    rank 0 gets the signal, the others learn of it up to ``every`` steps later (torchrun and SLURM signal every
    rank; each rank also stops on its own flag, as before)."""
    loop = trainer.fit_loop.epoch_loop
    broadcast = getattr(loop, "_broadcast_sigterm_tensor", None)
    if broadcast is None or every <= 1:
        return

    def every_n_steps() -> None:
        if trainer.global_step % every == 0:
            broadcast()

    loop._broadcast_sigterm_tensor = every_n_steps


class _StayOnDevice(SingleDeviceStrategy):
    """Lightning's teardown at the end of every fit moves the optimizer state and the model to the CPU, after which
    the job's final validation, accuracy and export move the model back. This one frees the optimizer state (every
    save has its own copy of it) and leaves the model where it is: for a large model, most of the job's end outside
    validation and checkpoint waits was those two moves (``benchmarks/RESULTS.md``, the ``cli_loop`` rows)."""

    def teardown(self) -> None:
        for opt in self.optimizers:
            opt.state.clear()
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()
