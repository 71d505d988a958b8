"""The progress bar: one line a logging interval, read from host numbers (no GPU sync per step)."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import ProgressBar


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
