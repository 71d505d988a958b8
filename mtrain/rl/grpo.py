"""One GRPO step's tensors and its mini-batch loss, on top of the rollout path (no Lightning here).

A step: the engine samples ``group_size`` responses for each of ``prompts_per_step`` prompts (rows ``g*G .. g*G+G-1``
are prompt g's group) -> rewards -> group advantages -> the old policy (:func:`old_policy`: the trainer's recompute
in the rollout's layout, or the engine's own logprobs in ``bypass``) -> the mismatch correction
(:mod:`mtrain.rl.corrections`) -> ``ppo_epochs`` x ``num_minibatches`` updates of :func:`minibatch_loss`.

Routing replay (MoE): ``r3`` replays the rollout's expert ids in the old-policy recompute and in every update; ``r2``
records the trainer's own routing at the recompute and replays it through the updates. Either way the routing
*weights* come from the live router scores, so the router keeps its gradient.
The train/rollout mismatch of the batch is measured every step (:func:`mismatch_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from mtrain.models import MoECausalLM
from mtrain.models.generate import Generation, recompute
from mtrain.models.routing import RoutingTrace

from .advantages import frac_zero_std, group_advantages
from .choices import OLD_LOGPROBS, REPLAY_MODES
from .corrections import CorrectionConfig, rollout_correction
from .losses import aggregate, kl_penalty, policy_loss
from .mismatch import mismatch_metrics, routing_disagreement, trainer_recompute

@dataclass(frozen=True)
class LossSettings:
    """The policy objective: a registered policy loss (``loss``: ppo | gspo | ...), clip range, dual clip, a
    registered aggregation, the KL to a reference with a registered estimator, and each piece's own options
    (``*_args``: ``task.loss_args``, ...). Field names are the task's config keys (built by name,
    ``mtrain.job.settings.settings_from``); the defaults are the schema's (a test keeps them equal)."""

    loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = None
    loss_agg: str = "token-mean"
    norm_len: Optional[int] = None  # seq-mean-token-sum-norm: the fixed length (max_new_tokens)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_args: Mapping[str, Any] = field(default_factory=dict)
    loss_agg_args: Mapping[str, Any] = field(default_factory=dict)
    kl_estimator_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MismatchSettings:
    """How a step deals with the engine's numbers: routing replay, old logprobs (``decoupled``: the trainer's
    recompute; ``bypass``: the engine's), and the IS correction (``task.routing_replay`` and
    ``task.rollout_correction``, by name)."""

    routing_replay: str = "off"
    old_logprobs: str = "decoupled"
    rollout_correction: CorrectionConfig = field(default_factory=CorrectionConfig)

    def __post_init__(self) -> None:
        if self.routing_replay not in REPLAY_MODES:
            raise ValueError(f"routing_replay={self.routing_replay!r}: use one of {', '.join(REPLAY_MODES)}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"old_logprobs={self.old_logprobs!r}: use one of {', '.join(OLD_LOGPROBS)}")
        if self.old_logprobs == "bypass" and self.routing_replay == "r2":
            raise ValueError("routing_replay=r2 replays the routing of the old-policy recompute, which "
                             "old_logprobs=bypass skips; use r3 or old_logprobs=decoupled")

    @property
    def bypass(self) -> bool:
        return self.old_logprobs == "bypass"


@dataclass
class StepBatch:
    """Everything one step's updates need. Rows are responses; ``[B, N]`` tensors are per generated token."""

    gen: Generation
    rewards: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B]
    old_logprobs: torch.Tensor  # [B, N] the old policy (trainer recompute, or the engine's logprobs in bypass)
    ref_logprobs: Optional[torch.Tensor] = None  # [B, N] frozen reference (kl_coef > 0)
    replay: Optional[dict[int, torch.Tensor]] = None  # {layer: [B, width, k]} the ids every update replays
    loss_mask: Optional[torch.Tensor] = None  # [B, N] the tokens that count after the correction (None: all)
    is_weights: Optional[torch.Tensor] = None  # [B, N] detached IS weight of each token (None: 1)

    @property
    def mask(self) -> torch.Tensor:
        return self.loss_mask if self.loss_mask is not None else self.gen.mask.float()

    def replay_trace(self, rows: torch.Tensor) -> Optional[RoutingTrace]:
        if self.replay is None:
            return None
        return RoutingTrace.replay({layer: ids[rows] for layer, ids in self.replay.items()})

    def __len__(self) -> int:
        return self.gen.tokens.shape[0]


@dataclass
class OldPolicy:
    logprobs: torch.Tensor  # [B, N]
    routing: Optional[torch.Tensor]  # [B, N, moe_layers, k] the trainer routers' own choice (None: not measured)
    used_routing: Optional[torch.Tensor]  # [B, N, moe_layers, k] the experts the recompute ran (replayed under r3)
    replay: Optional[dict[int, torch.Tensor]]  # what the updates replay (r3: the rollout's ids, r2: the trainer's)


def advantages_of(rewards: torch.Tensor, group_size: int, mode: str, norm_std: bool,
                  options: Optional[Mapping[str, Any]] = None) -> tuple[torch.Tensor, float]:
    """Per-response advantages [B] of rewards [B] laid out group after group (by the registered estimator ``mode``
    with its ``options``), and the fraction of zero-std groups."""
    grouped = rewards.view(-1, group_size)
    return group_advantages(grouped, mode, norm_std, options=options).reshape(-1), frac_zero_std(grouped)


@torch.no_grad()
def old_policy(model: MoECausalLM, gen: Generation, pad_id: int, settings: MismatchSettings = MismatchSettings(),
               scoring: str = "standard") -> OldPolicy:
    """The old policy of a step. ``decoupled``: the trainer's logprobs [B, N] of the rollout's tokens (one eager
    full forward in the rollout's layout, or through the exact engine's path with ``scoring="invariant"``; under r3
    replaying the rollout's experts) and its routing. ``bypass``: the engine's logprobs, no forward."""
    layers = model.moe_layers
    rollout_ids = gen.replay_ids(layers) if settings.routing_replay == "r3" and layers else None
    if settings.bypass:
        return OldPolicy(gen.logprobs, None, None, rollout_ids)
    trace = RoutingTrace.replay(rollout_ids) if rollout_ids is not None else RoutingTrace()
    logprobs, own = trainer_recompute(model, gen, pad_id, trace, scoring)
    producing = slice(gen.first - 1, gen.first - 1 + gen.tokens.shape[1])
    used = trace.stacked()[:, producing] if trace.ids else own
    replay = dict(trace.ids) if settings.routing_replay != "off" and layers else None
    return OldPolicy(logprobs, own, used, replay)


def correct(batch: StepBatch, correction: CorrectionConfig) -> dict[str, float]:
    """Decoupled correction: IS weights and mask from ``old_logprobs`` vs the engine's, set on ``batch``; its stats."""
    weights, keep, stats = rollout_correction(batch.old_logprobs, batch.gen.logprobs, batch.gen.mask.float(), correction)
    if correction.mode != "off":
        batch.is_weights, batch.loss_mask = weights, keep
    return {f"correction/{k}": float(v) for k, v in stats.items()}


def minibatch_loss(model: MoECausalLM, batch: StepBatch, rows: torch.Tensor, s: LossSettings, pad_id: int,
                   bypass_correction: Optional[CorrectionConfig] = None):
    """The loss of responses ``rows`` under the current policy (replaying ``batch.replay`` if set), and its stats
    (entropy, clip fraction, approx KL, KL to the reference). ``bypass_correction``: ``old_logprobs`` are the
    engine's, and the correction's weights are computed here from the current policy (detached) vs the engine."""
    sub = batch.gen.select(rows)
    logp, entropy = recompute(model, sub, pad_id, trace=batch.replay_trace(rows), with_entropy=True,
                              rollout_shapes=False)
    mask, weights = batch.mask[rows], batch.is_weights[rows] if batch.is_weights is not None else None
    extra = {}
    if bypass_correction is not None and bypass_correction.mode != "off":
        weights, mask, cstats = rollout_correction(logp.detach(), sub.logprobs, sub.mask.float(), bypass_correction)
        extra = {f"correction/{k}": v for k, v in cstats.items()}
    loss, stats = policy_loss(
        logp, batch.old_logprobs[rows], batch.advantages[rows], mask, kind=s.loss, clip_low=s.clip_low,
        clip_high=s.clip_high, dual_clip=s.dual_clip, loss_agg=s.loss_agg, norm_len=s.norm_len, is_weights=weights,
        options=s.loss_args, agg_options=s.loss_agg_args,
    )
    if s.kl_coef > 0:
        kl = aggregate(kl_penalty(logp, batch.ref_logprobs[rows], s.kl_estimator, s.kl_estimator_args), mask,
                       s.loss_agg, s.norm_len, s.loss_agg_args)
        loss = loss + s.kl_coef * kl
        stats["kl_ref"] = kl.detach()
    stats["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
    return loss, stats | extra


def minibatches(n: int, num: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``num`` shuffled, near-equal, non-empty slices of ``range(n)`` (``n >= num``): exactly ``num`` optimizer steps,
    the step count Lightning's schedule and the RL step number rely on (``chunk`` can return fewer: 6 in 3x2)."""
    if not 1 <= num <= n:
        raise ValueError(f"{num} mini-batches of {n} responses: need 1 <= num_minibatches <= responses")
    return list(torch.randperm(n, generator=generator).tensor_split(num))


def mismatch_stats(gen: Generation, old: OldPolicy) -> dict:
    """Train/rollout mismatch of the batch: |dlogp| mean/max, k3, and routing disagreement of the trained tokens
    (the experts the trainer ran vs the rollout's: 0 under r3) and of the trainer routers' own choice. All 0 when
    bit-identical; NaN in bypass (no recompute)."""
    if old.routing is None:
        keys = ("logprob_abs_diff_mean", "logprob_abs_diff_max", "k3", "routing_disagreement",
                "routing_disagreement_own")
        return {f"mismatch/{k}": float("nan") for k in keys}
    m, _ = mismatch_metrics(gen.logprobs, old.logprobs, gen.routing, old.used_routing, gen.lengths, rows=False)
    return {
        "mismatch/logprob_abs_diff_mean": m["logprob_abs_diff_mean"],
        "mismatch/logprob_abs_diff_max": m["logprob_abs_diff_max"],
        "mismatch/k3": m["kl_k3"],
        "mismatch/routing_disagreement": m["routing_disagreement"],
        "mismatch/routing_disagreement_own": routing_disagreement(gen.routing, old.routing, gen.lengths),
    }
