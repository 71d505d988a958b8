"""A plain PyTorch training loop for sharded (or unsharded) mtrain models: the reference the Lightning path is
checked against, and what the scaling benchmark times. Data parallel: each rank takes its rows of the global batch;
FSDP averages gradients over ranks, so with equal tokens per rank a step equals the single-process step on the
whole batch."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

Batch = tuple[torch.Tensor, torch.Tensor]


def synthetic_batches(vocab_size: int, batch: int, seq: int, steps: int, seed: int = 0) -> list[Batch]:
    """``steps`` global batches of random token ids with next-token targets (last position ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        out.append((ids, targets))
    return out


def rank_slice(b: Batch, rank: int, world: int) -> Batch:
    """This rank's contiguous rows of a global batch (the batch size must divide by the world size)."""
    ids, targets = b
    if ids.shape[0] % world:
        raise ValueError(f"global batch {ids.shape[0]} does not divide over {world} ranks")
    n = ids.shape[0] // world
    return ids[rank * n : (rank + 1) * n], targets[rank * n : (rank + 1) * n]


def global_mean(x: torch.Tensor) -> float:
    """Mean of a scalar over ranks (SUM / world: gloo has no AVG)."""
    if not dist.is_initialized():
        return x.item()
    y = x.detach().float().clone()
    dist.all_reduce(y)
    return y.item() / dist.get_world_size()


def train_steps(
    model,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch] | Iterable[Batch],
    *,
    device: torch.device | str = "cpu",
    grad_clip: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """One optimizer step per (global) batch; this rank uses its rows. Returns the global mean loss of each step."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    losses = []
    model.train()
    for step, b in enumerate(batches):
        ids, targets = (t.to(device) for t in rank_slice(b, rank, world))
        loss = model.loss(ids, targets)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(global_mean(loss))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
