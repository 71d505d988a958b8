"""When checkpoints are written: ``last.ckpt`` every N steps, at the end and on a stop signal (written in the
background); the best by ``val/loss``; the seconds the loop spends on them."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mtrain.lit.checkpoint_io import BackgroundCheckpointIO
from mtrain.lit.errors import TrainingDiverged
from mtrain.lit.guards import finite
from mtrain.lit.manifest import write_manifest


def excluded(pl_module: L.LightningModule, kind: str, seconds: float) -> None:
    """Tell the module (``MoELitModule.exclude``) that ``seconds`` went to ``kind``, not to training steps."""
    exclude = getattr(pl_module, "exclude", None)
    if exclude is not None:
        exclude(kind, seconds)

def _background_writer(trainer: L.Trainer) -> Optional[BackgroundCheckpointIO]:
    io = trainer.strategy.checkpoint_io
    return io if isinstance(io, BackgroundCheckpointIO) else None


class LastCheckpoint(Callback):
    """``<run dir>/checkpoints/last.ckpt`` at the latest step, independent of validation: every ``every_n_steps``
    optimizer steps, at the end of fit, and when the job is told to stop (SIGTERM, what SLURM and Kubernetes send on
    preemption). Each write is atomic (a temporary file renamed over the old one: a killed write never leaves a
    partial ``last.ckpt``), and refused if the weights are not finite (:class:`TrainingDiverged`).

    On SIGTERM (and SIGUSR1, Ctrl-C: :class:`~mtrain.lit.signals.StopOnSignal`) Lightning stops the fit at the end
    of a step by raising ``SIGTERMException`` (a ``SystemExit``); after the checkpoint is written the exception
    carries ``mtrain_step`` and ``mtrain_checkpoint`` so the CLI can record the interruption and exit 128 + the
    signal. A ``KeyboardInterrupt`` (a second Ctrl-C) lands mid-step: nothing is written, the last checkpoint is the
    one recorded."""

    NAME = "last.ckpt"

    def __init__(self, dirpath: Path, every_n_steps: Optional[int] = None):
        self.dir, self.every = Path(dirpath), every_n_steps
        self.saved_step = -1

    @property
    def path(self) -> Path:
        return self.dir / self.NAME

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        writer = _background_writer(trainer)
        if trainer.global_step == self.saved_step and (self.path.exists() or (writer and writer.pending)):
            return self.path
        t0 = time.perf_counter()
        if not all(finite(p.detach()) for p in pl_module.parameters()):
            raise TrainingDiverged(f"the weights hold non-finite values at step {trainer.global_step}; not "
                                   f"checkpointed (the last good checkpoint, if any, stays in {self.dir}). Fix: lower "
                                   "task.lr or set trainer.gradient_clip_val")
        for logger in trainer.loggers:  # the logs on disk reach at least as far as the checkpoint (kill -9 included)
            logger.save()
        # the background writer replaces last.ckpt atomically itself; other writers write a temporary name, swapped in
        target = self.path if writer else self.dir / f".{self.NAME}.tmp"
        trainer.save_checkpoint(str(target), weights_only=False)  # + optimizer state; collective under FSDP
        if writer is None and trainer.is_global_zero:
            old = self.dir / f".{self.NAME}.old"
            if target.is_dir():  # a distributed checkpoint is a folder: sign it, swap it in, then drop the old one
                write_manifest(target)
                shutil.rmtree(old, ignore_errors=True)
                if self.path.exists():
                    os.replace(self.path, old)
                os.replace(target, self.path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(target, self.path)
        trainer.strategy.barrier("mtrain.last_checkpoint")
        self.saved_step = trainer.global_step
        excluded(pl_module, "checkpoint", time.perf_counter() - t0)
        return self.path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        stop = isinstance(exception, SIGTERMException)  # SIGTERM, SIGUSR1, a first Ctrl-C: at a step boundary
        if stop:
            self.save(trainer, pl_module)
        # else a second Ctrl-C, mid-step: no checkpoint of a half step; the last one written is the one to resume
        writer = _background_writer(trainer)
        if writer is not None:
            writer.wait()  # on disk before the CLI's status.json names it or SLURM requeues the job
        exception.mtrain_step = trainer.global_step
        exception.mtrain_checkpoint = str(self.path) if stop or self.path.exists() else None

class BestCheckpoint(ModelCheckpoint):
    """Lightning's best-by-``val/loss`` checkpoints; a distributed checkpoint folder gets mtrain's signed manifest
    (:mod:`mtrain.lit.manifest`), so it can be resumed."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        t0 = time.perf_counter()
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and Path(filepath).is_dir():
            write_manifest(filepath)
        trainer.strategy.barrier("mtrain.best_checkpoint")
        excluded(trainer.lightning_module, "checkpoint", time.perf_counter() - t0)


def make_checkpoint(
    run_dir: Path, has_val: bool, save_top_k: int = 1, every_n_train_steps: Optional[int] = None
) -> list[Callback]:
    """``<run dir>/checkpoints/last.ckpt`` at the latest step (:class:`LastCheckpoint`: every ``every_n_train_steps``
    optimizer steps, at the end, on SIGTERM); plus the ``save_top_k`` best by ``val/loss`` when there is val data."""
    out: list[Callback] = [LastCheckpoint(run_dir / "checkpoints", every_n_train_steps)]
    if has_val and save_top_k:
        out.append(BestCheckpoint(
            dirpath=str(run_dir / "checkpoints"), filename="best-step{step:06d}-val{val/loss:.4f}",
            auto_insert_metric_name=False, monitor="val/loss", mode="min", save_top_k=save_top_k, save_last=False,
        ))
    return out
