"""RL math for policy-gradient fine-tuning: group advantages, clipped policy losses, KL/entropy, and train/rollout
mismatch corrections. Pure torch (no Lightning or Hydra); formulas follow verl / slime / NeMo-RL / TRL."""

from mtrain.rl.advantages import ADVANTAGE_MODES, frac_zero_std, group_advantages
from mtrain.rl.corrections import CORRECTION_MODES, CorrectionConfig, rollout_correction
from mtrain.rl.losses import (
    KL_KINDS,
    LOSS_AGG_MODES,
    POLICY_LOSS_KINDS,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
)

__all__ = [
    "ADVANTAGE_MODES",
    "CORRECTION_MODES",
    "KL_KINDS",
    "LOSS_AGG_MODES",
    "POLICY_LOSS_KINDS",
    "CorrectionConfig",
    "aggregate",
    "entropy_from_logits",
    "frac_zero_std",
    "group_advantages",
    "kl_penalty",
    "policy_loss",
    "rollout_correction",
]
