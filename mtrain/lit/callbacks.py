"""Callbacks and loggers of a run, and the loss-curve PNG."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

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


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def make_loggers(run_dir: Path) -> list[Logger]:
    """CSV logs in ``<run dir>/csv/metrics.csv``; TensorBoard in ``<run dir>/tensorboard/`` if it is installed."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    if tensorboard_available():
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False))
    return loggers


class SaveLastOnTrainEnd(Callback):
    """``ModelCheckpoint`` writes ``last.ckpt`` after validations only (with ``check_val_every_n_epoch=null``), so the
    steps after the last validation would be lost: at the end of fit, write ``last.ckpt`` at the final step."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cb = trainer.checkpoint_callback
        if not isinstance(cb, ModelCheckpoint) or not cb.save_last or cb.dirpath is None:
            return
        if getattr(cb, "_last_global_step_saved", None) == trainer.global_step and cb.last_model_path:
            return
        path = str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
        trainer.save_checkpoint(path)
        cb.last_model_path = path


def make_checkpoint(
    run_dir: Path, has_val: bool, save_top_k: int = 1, every_n_train_steps: Optional[int] = None
) -> ModelCheckpoint:
    """``<run dir>/checkpoints/last.ckpt`` always (also every ``every_n_train_steps`` optimizer steps when given);
    plus the ``save_top_k`` best by ``val/loss`` when there is val data."""
    return ModelCheckpoint(
        every_n_train_steps=every_n_train_steps,
        dirpath=str(run_dir / "checkpoints"),
        filename="best-step{step:06d}-val{val/loss:.4f}" if has_val else "step{step:06d}",
        auto_insert_metric_name=False,
        monitor="val/loss" if has_val else None,
        mode="min",
        save_top_k=save_top_k if has_val else 0,
        save_last=True,
    )


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
