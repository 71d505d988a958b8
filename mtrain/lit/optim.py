"""The optimizer every training module uses: AdamW (no decay on what the model's family exempts) with a linear
warm-up and a cosine decay per optimizer step, set by :class:`OptimSettings` (``task.lr``, ``task.warmup_steps``,
``task.min_lr_ratio``, ``task.weight_decay``, ``task.betas``, ``task.eps``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mtrain.models import MoECausalLM, family_of


@dataclass(frozen=True)
class OptimSettings:
    """AdamW and its schedule. Built from the task's config by name (``mtrain.job.settings.settings_from``); these
    defaults are the schema's (``mtrain.schema.OptimTaskConfig``; a test keeps them equal)."""

    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 50  # linear warm-up from 0 to lr over these optimizer steps
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0  # decoupled, on matrices only
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8


class WarmupCosine:
    """LR factor: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total`` steps, flat after.

    A callable object (not a lambda), so ``LambdaLR.state_dict`` stores it and a resumed run gets the same schedule.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if self.total <= self.warmup:
            return 1.0
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: MoECausalLM, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices; none on what the model's family exempts (norms, biases, vectors, ...)."""
    family = family_of(model)
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if family.no_decay_param(name, p.ndim) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def adamw_with_schedule(model: MoECausalLM, s: OptimSettings, warmup_steps: int, total_steps: int) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: AdamW (fused when every parameter is on CUDA) and its warm-up + cosine
    schedule, stepped per optimizer step."""
    fused = all(p.is_cuda for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=tuple(s.betas), eps=s.eps,
                            **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup_steps, total_steps, s.min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
