"""The divergence guard: a non-finite loss or weight stops the run with one line and writes nothing non-finite."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from mtrain.lit.errors import TrainingDiverged


def finite(x) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())

class FiniteGuard(Callback):
    """Stop with :class:`TrainingDiverged` when the training loss (checked every ``every`` steps: one host sync per
    check) or a validation loss is not finite."""

    def __init__(self, every: int = 1):
        self.every = max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and trainer.global_step % self.every == 0 and not finite(loss.detach()):
            raise TrainingDiverged(f"the training loss is {float(loss):g} at step {trainer.global_step}; stopped, "
                                   "nothing non-finite is checkpointed or exported. Fix: lower task.lr or set "
                                   "trainer.gradient_clip_val")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        v = trainer.callback_metrics.get("val/loss")
        if v is None or trainer.sanity_checking or finite(v):
            return
        if trainer.state.fn == "validate":  # a stand-alone evaluation: the weights came in this way
            raise TrainingDiverged(f"the validation loss is {float(v):g}: the model's weights are not finite (or "
                                   "overflow in this dtype). Fix: evaluate a finite checkpoint (model.checkpoint=...) "
                                   "or use model.dtype=float32")
        raise TrainingDiverged(f"the validation loss is {float(v):g} at step {trainer.global_step}; stopped, "
                               "nothing non-finite is checkpointed or exported. Fix: lower task.lr or set "
                               "trainer.gradient_clip_val")
