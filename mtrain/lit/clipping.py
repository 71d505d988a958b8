"""Gradient clipping by total norm, folded into a fused AdamW step.

``torch.nn.utils.clip_grad_norm_`` scales every gradient by the clip coefficient in a pass of its own, which costs
most of the clip's time, far more than the norm (``benchmarks/optimizer_step.py``; numbers in
``benchmarks/RESULTS.md``). A fused AdamW divides the gradients by its ``grad_scale`` inside its own kernel (the
hook ``GradScaler`` uses), so the coefficient rides along: one read of the gradients for the norm and no pass for
the scaling. The update is the one of clip + step; the coefficient stays on the device (no host sync).

Under FSDP the gradients are dim-0 shards (``DTensor``): the total norm is the square root of the all-reduced sum of
each rank's local squared norm, one collective, instead of ``clip_grad_norm_``'s DTensor dispatch per op.
"""

from __future__ import annotations

from typing import Iterable

import torch


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "defaults", {}).get("fused")) and all(g.get("fused") for g in optimizer.param_groups)


def clip_in_fused_step(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], max_norm: float
                       ) -> torch.Tensor:
    """Clip the gradients of ``parameters`` to total 2-norm ``max_norm`` by setting the fused ``optimizer``'s
    ``grad_scale`` for its next step. Returns the total norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = total_norm(grads)
    coef = (max_norm / (total.float() + 1e-6)).clamp(max=1.0)  # what clip_grad_norm_ multiplies by
    optimizer.grad_scale = 1.0 / coef
    return total


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together; sharded gradients (FSDP's ``DTensor`` shards) are summed over ranks."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if not all(isinstance(g, DTensor) and all(p.is_shard() for p in g.placements) for g in grads):
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)  # DTensor ops (e.g. replicas)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    local = torch.nn.utils.get_total_norm([g.to_local() for g in grads], norm_type=2.0, foreach=True)
    sq = local.float().square()
    torch.distributed.all_reduce(sq, group=grads[0].device_mesh.get_group())
    return sq.sqrt()


def no_clip(optimizer: torch.optim.Optimizer) -> None:
    """Undo :func:`clip_in_fused_step` for the next step."""
    if hasattr(optimizer, "grad_scale"):
        del optimizer.grad_scale
