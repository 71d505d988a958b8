"""RL math for policy-gradient fine-tuning: group advantages, clipped policy losses, KL/entropy, and train/rollout
mismatch corrections. Pure torch (no Lightning or Hydra); formulas follow verl / slime / NeMo-RL / TRL.

Each kind of piece is a registry by name (:mod:`mtrain.registry`): ``ADVANTAGES`` (``register_advantage``),
``POLICY_LOSSES``, ``LOSS_AGGS``, ``KL_ESTIMATORS`` (``register_policy_loss``, ``register_loss_agg``,
``register_kl_estimator``) and ``CORRECTIONS`` (``register_correction``); rewards are in :mod:`mtrain.data.rewards`
and rollout engines in :mod:`mtrain.rl.engines`."""

from mtrain.rl.advantages import ADVANTAGES, frac_zero_std, group_advantages, register_advantage
from mtrain.rl.corrections import CORRECTIONS, CorrectionConfig, register_correction, rollout_correction
from mtrain.rl.losses import (
    KL_ESTIMATORS,
    LOSS_AGGS,
    POLICY_LOSSES,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    register_kl_estimator,
    register_loss_agg,
    register_policy_loss,
)

__all__ = [
    "ADVANTAGES",
    "CORRECTIONS",
    "KL_ESTIMATORS",
    "LOSS_AGGS",
    "POLICY_LOSSES",
    "CorrectionConfig",
    "aggregate",
    "entropy_from_logits",
    "frac_zero_std",
    "group_advantages",
    "kl_penalty",
    "policy_loss",
    "register_advantage",
    "register_correction",
    "register_kl_estimator",
    "register_loss_agg",
    "register_policy_loss",
    "rollout_correction",
]
