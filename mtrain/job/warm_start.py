"""An SFT warm start before RL: a short fine-tune of the job's model on ``data=`` (prompt -> exact answer) that stops
once greedy exact match on a probe set reaches a target. RL from a random-init model has nothing to learn from an
exact-match reward (no answer is ever right), and RL from a warm start well above the target gains less."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import lightning as L

from mtrain.lit import MoELitModule, OptimSettings, build_trainer

from .accuracy import greedy_accuracy
from .build import Setup
from .run import Job

log = logging.getLogger("mtrain")

AUTO_STEPS = 1000  # task.warm_start_steps=null: a random-init model is warm-started for at most this many steps
CHECK_EVERY = 10  # optimizer steps between two accuracy checks


def warm_start_steps(job: Job) -> int:
    """``task.warm_start_steps``, with null decided: :data:`AUTO_STEPS` for a random-init model (no
    ``model.checkpoint``), 0 for a checkpoint."""
    steps = job.cfg.task.warm_start_steps
    if steps is None:
        return 0 if job.cfg.model.checkpoint else AUTO_STEPS
    return int(steps)


class StopAtAccuracy(L.Callback):
    """Stop an SFT warm start once the greedy exact match of ``accuracy()`` reaches ``target`` (checked every
    ``every`` optimizer steps); records each check in ``checks`` as (step, accuracy)."""

    def __init__(self, accuracy: Callable[[], float], target: float, every: int = CHECK_EVERY):
        self.accuracy, self.target, self.every = accuracy, target, every
        self.checks: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            self.checks.append((step, self.accuracy()))
            if self.checks[-1][1] >= self.target:
                trainer.should_stop = True


def warm_start(job: Job, s: Setup, steps: int, lr: float, target: Optional[float], probe: list[dict]) -> dict[str, Any]:
    """A short SFT of the model on ``data`` (the synthetic task: prompt -> exact answer), ``steps`` optimizer steps
    or fewer: with ``target``, it stops once greedy exact match on ``probe`` (train prompts) reaches it. Returns what
    it did: steps, seconds, and the probe accuracy at the end (with a target)."""
    t0 = time.perf_counter()
    # With a target the learning rate stays constant after warm-up: the stop is not on an annealed model (RL from
    # an annealed one first loses accuracy when its learning rate rises again).
    optim = OptimSettings(lr=lr, warmup_steps=min(50, steps // 4), min_lr_ratio=1.0 if target is not None else 0.1,
                          weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    lit = MoELitModule(s.model, optim)
    stop = None
    if target is not None and probe:
        stop = StopAtAccuracy(lambda: greedy_accuracy(s.model, s.datamodule, probe, device=s.device)["accuracy"],
                              target)
    trainer = build_trainer(job.cfg, job.dir, has_val=False, checkpoint=False, max_steps=steps,
                            multirun=job.multirun, enable_progress_bar=False, loggers=False,
                            callbacks=[stop] if stop else [])
    trainer.fit(lit, datamodule=s.datamodule)
    losses = lit.train_losses()
    done = {"steps": trainer.global_step, "seconds": round(time.perf_counter() - t0, 3)}
    if stop is not None and stop.checks:
        done["train_accuracy"] = stop.checks[-1][1]
    log.info("warm start: %d SFT steps, loss %.3f -> %.3f%s", trainer.global_step, losses[0][1], losses[-1][1],
             f", greedy exact match on {len(probe)} train prompts {100 * done['train_accuracy']:.1f}%"
             if "train_accuracy" in done else "")
    return done
