"""Lightning pieces only: the LightningModule around an mtrain model, callbacks/loggers, the trainer factory."""

from mtrain.lit.callbacks import LossCurve, make_checkpoint, make_loggers, plot_loss_curve
from mtrain.lit.module import MoELitModule, WarmupCosine, param_groups
from mtrain.lit.trainer import build_trainer, quiet_lightning

__all__ = [
    "LossCurve", "MoELitModule", "WarmupCosine", "build_trainer", "make_checkpoint", "make_loggers", "param_groups",
    "plot_loss_curve", "quiet_lightning",
]
