"""Group-relative advantages: one scalar per response, computed from the G rewards of its prompt's group.

``rewards`` is ``[N, G]``: N prompts, G sampled responses each. The advantage of a response is later broadcast to
every one of its tokens by the policy loss. Pure torch; no Lightning or Hydra here.
"""

from __future__ import annotations

import torch

ADVANTAGE_MODES = ("grpo", "dr_grpo", "rloo", "reinforce")
_NEEDS_BASELINE = ("grpo", "dr_grpo", "rloo")


def group_advantages(rewards: torch.Tensor, mode: str, norm_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantages ``[N, G]`` for rewards ``[N, G]``.

    - ``grpo``:      ``A_i = (R_i - mean(R)) / (std(R) + eps)``; without ``norm_std`` just ``R_i - mean(R)``.
      ``std`` is ``torch.std``'s default, the *unbiased* one (divides by G-1), as verl's GRPO does.
    - ``dr_grpo``:   ``A_i = R_i - mean(R)``, never divided by the std (Dr.GRPO); ``norm_std`` is ignored.
    - ``rloo``:      ``A_i = R_i - mean_{j != i} R_j = G/(G-1) * (R_i - mean(R))`` (leave-one-out baseline).
    - ``reinforce``: ``A_i = R_i``, the raw reward with no baseline (the ablation baseline); works for any G.

    A group whose rewards are all equal gets exactly ``A = 0`` in every baseline mode (set explicitly, so float
    round-off in the mean cannot leak a tiny advantage divided by ``eps``). Computed in fp32 (or the input's
    dtype if wider).
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; expected one of {ADVANTAGE_MODES}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G] (prompts x responses), got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if mode == "reinforce":
        return r.clone()
    G = r.shape[1]
    if G < 2:
        raise ValueError(f"advantage mode {mode!r} needs a group baseline, so G >= 2 responses per prompt; got G={G}")
    centred = r - r.mean(dim=1, keepdim=True)
    if mode == "grpo" and norm_std:
        adv = centred / (r.std(dim=1, keepdim=True) + eps)
    elif mode == "rloo":
        adv = centred * (G / (G - 1))
    else:  # dr_grpo, or grpo without std normalisation
        adv = centred
    return torch.where(_zero_std_groups(r)[:, None], torch.zeros_like(adv), adv)


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
