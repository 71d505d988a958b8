"""One GRPO step's tensors and its mini-batch loss, on top of the embedded rollout path (no Lightning here).

A step: the engine samples ``group_size`` responses for each of ``prompts_per_step`` prompts (rows ``g*G .. g*G+G-1``
are prompt g's group) -> rewards -> group advantages -> the trainer recomputes the old-policy logprobs in the rollout's
layout (recording its routing) -> ``ppo_epochs`` x ``num_minibatches`` updates of :func:`minibatch_loss`.
The train/rollout mismatch of the batch (rollout logprobs and expert choices vs the trainer's recompute) is measured
every step (:func:`mismatch_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mtrain.models import MoECausalLM
from mtrain.models.generate import Generation, recompute

from .advantages import frac_zero_std, group_advantages
from .losses import aggregate, kl_penalty, policy_loss
from .mismatch import mismatch_metrics, trainer_recompute


@dataclass(frozen=True)
class LossSettings:
    """The policy objective: ``kind`` ppo | gspo, clip range, dual clip, aggregation, KL to a reference."""

    kind: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = None
    loss_agg: str = "token-mean"
    norm_len: Optional[int] = None  # seq-mean-token-sum-norm: the fixed length (max_new_tokens)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


@dataclass
class StepBatch:
    """Everything one step's updates need. Rows are responses; ``[B, N]`` tensors are per generated token."""

    gen: Generation
    rewards: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B]
    old_logprobs: torch.Tensor  # [B, N] trainer recompute before the updates (the old policy)
    ref_logprobs: Optional[torch.Tensor] = None  # [B, N] frozen reference (kl_coef > 0)
    trainer_routing: Optional[torch.Tensor] = None  # [B, N, moe_layers, k] at the recompute

    @property
    def mask(self) -> torch.Tensor:
        return self.gen.mask.float()

    def __len__(self) -> int:
        return self.gen.tokens.shape[0]


def advantages_of(rewards: torch.Tensor, group_size: int, mode: str, norm_std: bool) -> tuple[torch.Tensor, float]:
    """Per-response advantages [B] of rewards [B] laid out group after group, and the fraction of zero-std groups."""
    grouped = rewards.view(-1, group_size)
    return group_advantages(grouped, mode, norm_std).reshape(-1), frac_zero_std(grouped)


def old_policy(model: MoECausalLM, gen: Generation, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's logprobs [B, N] of the rollout's tokens (one eager full forward in the rollout's layout) and its
    expert choices [B, N, moe_layers, k] at the positions that produced them."""
    return trainer_recompute(model, gen, pad_id)


def minibatch_loss(model: MoECausalLM, batch: StepBatch, rows: torch.Tensor, s: LossSettings, pad_id: int):
    """The loss of responses ``rows`` under the current policy, and its stats (entropy, clip fraction, approx KL,
    KL to the reference)."""
    sub = batch.gen.select(rows)
    logp, entropy = recompute(model, sub, pad_id, with_entropy=True, rollout_shapes=False)
    mask = sub.mask.float()
    loss, stats = policy_loss(
        logp, batch.old_logprobs[rows], batch.advantages[rows], mask, kind=s.kind, clip_low=s.clip_low,
        clip_high=s.clip_high, dual_clip=s.dual_clip, loss_agg=s.loss_agg, norm_len=s.norm_len,
    )
    if s.kl_coef > 0:
        kl = aggregate(kl_penalty(logp, batch.ref_logprobs[rows], s.kl_estimator), mask, s.loss_agg, s.norm_len)
        loss = loss + s.kl_coef * kl
        stats["kl_ref"] = kl.detach()
    stats["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
    return loss, stats


def minibatches(n: int, num: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``num`` shuffled, near-equal slices of ``range(n)``."""
    order = torch.randperm(n, generator=generator)
    return [chunk for chunk in order.chunk(num) if chunk.numel()]


def mismatch_stats(gen: Generation, trainer_lp: torch.Tensor, trainer_routing: torch.Tensor) -> dict:
    """Train/rollout mismatch of the batch: |dlogp| mean/max, k3, routing disagreement (0 when bit-identical)."""
    m, _ = mismatch_metrics(gen.logprobs, trainer_lp, gen.routing, trainer_routing, gen.lengths, rows=False)
    return {
        "mismatch/logprob_abs_diff_mean": m["logprob_abs_diff_mean"],
        "mismatch/logprob_abs_diff_max": m["logprob_abs_diff_max"],
        "mismatch/k3": m["kl_k3"],
        "mismatch/routing_disagreement": m["routing_disagreement"],
    }
