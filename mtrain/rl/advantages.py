"""Group-relative advantages: one scalar per response, computed from the G rewards of its prompt's group.

``rewards`` is ``[N, G]``: N prompts, G sampled responses each. The advantage of a response is later broadcast to
every one of its tokens by the policy loss. Pure torch; no Lightning or Hydra here.

Estimators are registered by name (``task.advantage=<name>``): a new one is a function ``rewards [N, G] ->
advantages [N, G]`` decorated with :func:`register_advantage`. Its keyword parameters are its options: ``norm_std``
(``task.norm_adv_by_std``) and ``eps`` are handed to those that name them; any other comes from
``task.advantage_args`` (``task.advantage_args.scale=3``; :mod:`mtrain.registry`). Rewards arrive in fp32 (or the
input's dtype if wider). A baseline estimator calls :func:`centred` (G >= 2) and :func:`zero_constant_groups`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from mtrain.registry import Registry

ADVANTAGES: Registry = Registry("advantage mode", inputs=1, context=("norm_std", "eps"))
register_advantage = ADVANTAGES.register


def group_advantages(rewards: torch.Tensor, mode: str, norm_std: bool = True, eps: float = 1e-6,
                     options: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """Advantages ``[N, G]`` for rewards ``[N, G]`` by the estimator registered as ``mode`` (``options``: its own,
    ``task.advantage_args``). The built-in ones:

    - ``grpo``:      ``A_i = (R_i - mean(R)) / (std(R) + eps)``; without ``norm_std`` just ``R_i - mean(R)``.
      ``std`` is ``torch.std``'s default, the *unbiased* one (divides by G-1), as verl's GRPO does.
    - ``dr_grpo``:   ``A_i = R_i - mean(R)``, never divided by the std (Dr.GRPO); ``norm_std`` is ignored.
    - ``rloo``:      ``A_i = R_i - mean_{j != i} R_j = G/(G-1) * (R_i - mean(R))`` (leave-one-out baseline).
    - ``reinforce``: ``A_i = R_i``, the raw reward with no baseline (the ablation baseline); works for any G.

    A group whose rewards are all equal gets exactly ``A = 0`` in every baseline mode (set explicitly, so float
    round-off in the mean cannot leak a tiny advantage divided by ``eps``). Computed in fp32 (or the input's
    dtype if wider).
    """
    fn = ADVANTAGES.bind(mode, {"norm_std": norm_std, "eps": eps}, options, where="task.advantage_args")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G] (prompts x responses), got shape {tuple(rewards.shape)}")
    return fn(rewards.to(torch.promote_types(rewards.dtype, torch.float32)))


def centred(rewards: torch.Tensor, mode: str) -> torch.Tensor:
    """``R - mean(R)`` per group; ValueError unless there are G >= 2 responses per prompt (a group baseline)."""
    G = rewards.shape[1]
    if G < 2:
        raise ValueError(f"advantage mode {mode!r} needs a group baseline, so G >= 2 responses per prompt; got G={G}")
    return rewards - rewards.mean(dim=1, keepdim=True)


def zero_constant_groups(rewards: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``advantages`` with exactly 0 in every group whose rewards are all equal."""
    return torch.where(_zero_std_groups(rewards)[:, None], torch.zeros_like(advantages), advantages)


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, *, norm_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    adv = centred(rewards, "grpo")
    if norm_std:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return zero_constant_groups(rewards, adv)


@register_advantage("dr_grpo")
def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    return zero_constant_groups(rewards, centred(rewards, "dr_grpo"))


@register_advantage("rloo")
def rloo(rewards: torch.Tensor) -> torch.Tensor:
    G = rewards.shape[1]
    return zero_constant_groups(rewards, centred(rewards, "rloo") * (G / (G - 1)))


@register_advantage("reinforce")
def reinforce(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.clone()


def frac_zero_std(rewards: torch.Tensor) -> float:
    """Fraction of groups (rows of ``[N, G]``) whose rewards are all equal, i.e. that carry no learning signal
    under a group baseline (DAPO's dynamic sampling drops and refills them). 0.0 for an empty batch."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G] (prompts x responses), got shape {tuple(rewards.shape)}")
    if rewards.shape[0] == 0:
        return 0.0
    return _zero_std_groups(rewards).float().mean().item()


def _zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the group's rewards are all equal (max == min)."""
    return rewards.amax(dim=1) == rewards.amin(dim=1)
