"""Callbacks of a run, and the loss-curve PNG (the loggers: ``mtrain.lit.loggers``)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mtrain.lit.checkpoint_io import BackgroundCheckpointIO
from mtrain.lit.errors import TrainingDiverged
from mtrain.lit.manifest import write_manifest
from mtrain.parallel.launch import requeue_signals
from mtrain.plots import figure, smooth

log = logging.getLogger("mtrain")


def plot_loss_curve(
    train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: str | Path, title: str = ""
) -> Optional[Path]:
    """Write a PNG of the training loss (raw and smoothed) and the validation loss against the optimizer step."""
    if not train and not val:
        return None
    with figure(path, size=(7, 4)) as ax:
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (per batch)")
            k = max(1, len(losses) // 50)
            if k > 1:
                ax.plot(steps, smooth(losses, k), color="tab:blue", lw=1.6, label=f"train (mean of {k})")
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, "o-", color="tab:orange", lw=1.6, ms=4, label="val")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean token cross-entropy)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        if title:
            ax.set_title(title, fontsize=10)
    return Path(path)


class LossCurve(Callback):
    """At the end of fit, plot ``pl_module.history`` (train and val loss) to ``path`` (rank 0 only)."""

    def __init__(self, path: str | Path, title: str = ""):
        self.path, self.title = Path(path), title
        self.written: Optional[Path] = None

    def write(self, pl_module: L.LightningModule) -> Optional[Path]:
        self.written = plot_loss_curve(pl_module.train_losses(), pl_module.history["val"], self.path, self.title)
        return self.written

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(pl_module)


def excluded(pl_module: L.LightningModule, kind: str, seconds: float) -> None:
    """Tell the module (``MoELitModule.exclude``) that ``seconds`` went to ``kind``, not to training steps."""
    exclude = getattr(pl_module, "exclude", None)
    if exclude is not None:
        exclude(kind, seconds)


def _finite(x) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


def _background_writer(trainer: L.Trainer) -> Optional[BackgroundCheckpointIO]:
    io = trainer.strategy.checkpoint_io
    return io if isinstance(io, BackgroundCheckpointIO) else None


class LastCheckpoint(Callback):
    """``<run dir>/checkpoints/last.ckpt`` at the latest step, independent of validation: every ``every_n_steps``
    optimizer steps, at the end of fit, and when the job is told to stop (SIGTERM, what SLURM and Kubernetes send on
    preemption). Each write is atomic (a temporary file renamed over the old one: a killed write never leaves a
    partial ``last.ckpt``), and refused if the weights are not finite (:class:`TrainingDiverged`).

    On SIGTERM Lightning stops the fit by raising ``SIGTERMException`` (a ``SystemExit``); after the checkpoint is
    written the exception carries ``mtrain_step`` and ``mtrain_checkpoint`` so the CLI can record the interruption
    and exit 143."""

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
        if not all(_finite(p.detach()) for p in pl_module.parameters()):
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
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):  # SIGTERM/SIGUSR1, SIGINT (Ctrl-C)
            exception.mtrain_checkpoint = str(self.save(trainer, pl_module))
            exception.mtrain_step = trainer.global_step
            writer = _background_writer(trainer)
            if writer is not None:
                writer.wait()  # on disk before the CLI's status.json names it or SLURM requeues the job


class StopOnSignal(Callback):
    """SIGUSR1 (what SLURM sends ahead of a time limit or preemption with ``--signal=USR1@<s>``) -- and in a job
    started by submitit (``hydra/launcher=slurm``) submitit's own time-limit signal, SIGUSR2 -- stops the fit the way
    SIGTERM does: Lightning ends the current step and raises ``SIGTERMException``, :class:`LastCheckpoint` writes
    ``last.ckpt`` at that step, and the exception records which signal arrived (``mtrain_signal``) for the CLI's
    ``status.json``, the requeue and the exit code (128 + the signal's number).

    The handlers are installed at setup, before Lightning registers its own: Lightning's SLURM auto-requeue handler
    and submitit's (each would requeue without a checkpoint at the current step or mtrain's status record) stand
    aside. The previous handlers are restored at teardown."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict[int, object] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.received = None
        for name in requeue_signals():
            sig = getattr(signal, name, None)
            if sig is not None and stage == "fit":
                self._previous[sig] = signal.signal(sig, self._handler(trainer, name))

    def _handler(self, trainer: L.Trainer, name: str):
        def handle(signum, frame) -> None:
            log.info("received %s: stopping after the current step, checkpoint at that step", name)
            self.received = name
            trainer._signal_connector.received_sigterm = True  # Lightning's own stop path (SIGTERMException)
        return handle

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            exception.mtrain_signal = self.received or "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            exception.mtrain_signal = "SIGINT"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class FiniteGuard(Callback):
    """Stop with :class:`TrainingDiverged` when the training loss (checked every ``every`` steps: one host sync per
    check) or a validation loss is not finite."""

    def __init__(self, every: int = 1):
        self.every = max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and trainer.global_step % self.every == 0 and not _finite(loss.detach()):
            raise TrainingDiverged(f"the training loss is {float(loss):g} at step {trainer.global_step}; stopped, "
                                   "nothing non-finite is checkpointed or exported. Fix: lower task.lr or set "
                                   "trainer.gradient_clip_val")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        v = trainer.callback_metrics.get("val/loss")
        if v is None or trainer.sanity_checking or _finite(v):
            return
        if trainer.state.fn == "validate":  # a stand-alone evaluation: the weights came in this way
            raise TrainingDiverged(f"the validation loss is {float(v):g}: the model's weights are not finite (or "
                                   "overflow in this dtype). Fix: evaluate a finite checkpoint (model.checkpoint=...) "
                                   "or use model.dtype=float32")
        raise TrainingDiverged(f"the validation loss is {float(v):g} at step {trainer.global_step}; stopped, "
                               "nothing non-finite is checkpointed or exported. Fix: lower task.lr or set "
                               "trainer.gradient_clip_val")


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


class StepProgressBar(ProgressBar):
    """One tqdm bar over optimizer steps (``trainer.max_steps``), with loss and tokens/s; a bar over the batches of
    a stand-alone validation (``task=eval``). Lightning's default bar counts epochs, which mean little here."""

    SHOW = {"train/loss": "loss", "val/loss": "val", "train/tokens_per_s": "tok/s", "reward_mean": "reward",
            "accuracy": "acc", "mismatch_k3": "k3"}

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def _new(self, **kw):
        from tqdm.auto import tqdm

        return tqdm(dynamic_ncols=True, file=sys.stdout, mininterval=0.5, smoothing=0.1, **kw)

    def _postfix(self, trainer: L.Trainer) -> dict:
        out = {}
        for key, short in self.SHOW.items():
            v = trainer.progress_bar_metrics.get(key, trainer.callback_metrics.get(key))
            if v is not None:
                v = float(v)
                out[short] = f"{v:,.0f}" if short == "tok/s" else f"{v:.4f}"
        return out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_enabled:
            total = trainer.max_steps if trainer.max_steps > 0 else None
            self._bar = self._new(total=total, initial=trainer.global_step, desc="train", unit="step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is not None and trainer.global_step > self._bar.n:
            self._bar.update(trainer.global_step - self._bar.n)
            # SFT: the loss and tokens/s only every logging interval. Reading them turns the GPU loss into a number,
            # a device sync (the loop syncs there anyway); the step count moves every step. GRPO's steps (manual
            # optimisation) sync for their rollouts anyway: every step.
            every = max(1, trainer.log_every_n_steps) if pl_module.automatic_optimization else 1
            if trainer.global_step % every == 0:
                self._bar.set_postfix(self._postfix(trainer), refresh=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(trainer), refresh=False)
            self._bar.close()
            self._bar = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_enabled and not trainer.sanity_checking and trainer.state.fn == "validate":
            total = sum(n for n in trainer.num_val_batches if n != float("inf")) or None
            self._bar = self._new(total=total, desc="eval", unit="batch")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._bar is not None and trainer.state.fn == "validate":
            self._bar.update(1)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None and trainer.state.fn == "validate":
            self._bar.close()
            self._bar = None
