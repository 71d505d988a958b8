"""Lightning pieces only: the LightningModule around an mtrain model, callbacks (curves, checkpointing, signals,
guards, progress, routing), loggers, the trainer factory.
"""

from mtrain._lazy import lazy_exports

_EXPORTS = {
    "LossCurve": "curves",
    "make_checkpoint": "checkpointing",
    "plot_loss_curve": "curves",
    "close_loggers": "loggers",
    "csv_log": "loggers",
    "finish_loggers": "loggers",
    "make_loggers": "loggers",
    "MoELitModule": "module",
    "OptimSettings": "optim",
    "WarmupCosine": "optim",
    "adamw_with_schedule": "optim",
    "param_groups": "optim",
    "build_trainer": "trainer",
    "quiet_lightning": "trainer",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
