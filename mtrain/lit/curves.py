"""The loss curve of a run: ``loss_curve.png``, drawn at the end of the fit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

from mtrain.plots import figure, smooth


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
