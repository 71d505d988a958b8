"""Train/rollout mismatch corrections: importance weights and masks from the trainer's vs the engine's log-probs.

The rollout engine samples with ``pi_roll`` but reports log-probs ``logp_roll`` that differ from the trainer's
``logp_old`` for the same tokens. With ``w_t = exp(logp_old_t - logp_roll_t)`` (log-ratio clamped to +-20):

- ``off``:        weights 1, mask unchanged (stats only).
- ``token_tis``:  truncated IS per token, weight ``min(w_t, cap)`` (verl/slime, cap 2).
- ``token_mask``: IcePop / MIS, drop tokens with ``w_t`` outside ``[lower, upper]`` (default ``[1/cap, cap]``).
- ``seq_tis``:    one weight per sequence, ``rho_i = exp(sum_t log w_t)`` truncated at ``cap``.
- ``seq_mask``:   drop whole sequences with ``rho_i`` outside ``[lower, upper]``.
- ``geo_mask``:   drop sequences whose geometric mean ``exp(mean_t log w_t)`` is outside ``[geo_low, geo_high]``.
- ``k3_filter``:  drop sequences whose mean k3 (``w - log w - 1``, KL(roll || old)) exceeds ``k3_threshold``.

Dropped tokens leave the new mask, hence the loss's numerator and denominator. Pure torch; no Lightning or Hydra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

CORRECTION_MODES = ("off", "token_tis", "token_mask", "seq_tis", "seq_mask", "geo_mask", "k3_filter")
LOG_RATIO_CLAMP = 20.0


@dataclass
class CorrectionConfig:
    """Which correction to apply and its thresholds. ``lower``/``upper`` default to ``1/cap``/``cap``."""

    mode: str = "off"
    cap: float = 2.0
    lower: Optional[float] = None
    upper: Optional[float] = None
    geo_low: float = 0.999
    geo_high: float = 1.001
    k3_threshold: float = 0.01

    def __post_init__(self) -> None:
        self.validate()

    def bounds(self) -> tuple[float, float]:
        """The ``[lower, upper]`` band of the masking modes, with the defaults ``1/cap`` and ``cap`` filled in."""
        lower = 1.0 / self.cap if self.lower is None else self.lower
        upper = self.cap if self.upper is None else self.upper
        return lower, upper

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.mode not in CORRECTION_MODES:
            raise ValueError(f"CorrectionConfig.mode: unknown mode {self.mode!r}; expected one of {CORRECTION_MODES}")
        if self.cap <= 0 or (self.mode in ("token_tis", "seq_tis") and self.cap <= 1):
            raise ValueError(f"CorrectionConfig.cap must be > 1 (the IS weight's truncation level), got {self.cap}")
        lower, upper = self.bounds()
        if self.mode in ("token_mask", "seq_mask") and not 0 < lower < upper:
            raise ValueError(f"CorrectionConfig.lower ({lower}) must be > 0 and < upper ({upper})")
        if not 0 < self.geo_low < self.geo_high:
            raise ValueError(f"CorrectionConfig.geo_low ({self.geo_low}) must be in (0, geo_high={self.geo_high})")
        if self.k3_threshold < 0:
            raise ValueError(f"CorrectionConfig.k3_threshold must be >= 0, got {self.k3_threshold}")


@torch.no_grad()
def rollout_correction(
    logp_old: torch.Tensor, logp_roll: torch.Tensor, mask: torch.Tensor, cfg: CorrectionConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Weights ``[B, T]`` (detached fp32, 0 outside the new mask), the new mask (``mask``'s dtype) and stats.

    Stats (0-dim tensors) over the originally valid tokens: ``is_weight_mean``/``is_weight_max`` of the raw token
    weight ``w_t``; ``frac_truncated`` (tokens whose weight the TIS modes cut to ``cap``); ``frac_masked`` (tokens
    the masking modes removed); ``ess = (sum w)^2 / (n sum w^2)`` of the raw ``w_t`` (1 for equal weights, and for
    no tokens); mismatch metrics ``mismatch_abs_mean``/``mismatch_abs_max`` of ``|logp_old - logp_roll|``,
    ``mismatch_k3`` (mean ``w - log w - 1``) and ``frac_abs_gt_ln2`` (tokens with ``|delta| > ln 2``).
    """
    cfg.validate()
    if not logp_old.shape == logp_roll.shape == mask.shape or logp_old.dim() != 2:
        raise ValueError(
            f"logp_old {tuple(logp_old.shape)}, logp_roll {tuple(logp_roll.shape)} and mask {tuple(mask.shape)} "
            "must all be [B, T]"
        )
    valid = mask.bool()
    delta = torch.where(valid, logp_old.float() - logp_roll.float(), torch.zeros_like(logp_old, dtype=torch.float32))
    log_w = delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    w = log_w.exp()
    k3 = w - log_w - 1.0

    weights = torch.ones_like(w)
    keep = valid.clone()
    truncated = torch.zeros_like(valid)
    mode = cfg.mode
    if mode == "token_tis":
        truncated = valid & (w > cfg.cap)
        weights = w.clamp(max=cfg.cap)
    elif mode == "token_mask":
        lower, upper = cfg.bounds()
        keep = valid & (w >= lower) & (w <= upper)
    elif mode != "off":
        keep_seq, weights = _sequence_rule(log_w, k3, valid, cfg)
        keep = valid & keep_seq[:, None]
        if mode == "seq_tis":
            truncated = valid & (weights > cfg.cap)
            weights = weights.clamp(max=cfg.cap)
    weights = torch.where(keep, weights, torch.zeros_like(weights))

    n = valid.sum()
    n_f = n.clamp(min=1).float()
    w_valid = torch.where(valid, w, torch.zeros_like(w))
    sum_w, sum_w2 = w_valid.sum(), w_valid.square().sum()
    abs_delta = delta.abs()
    stats = {
        "is_weight_mean": sum_w / n_f,
        "is_weight_max": w_valid.amax() if n > 0 else w.new_zeros(()),
        "frac_truncated": truncated.sum() / n_f,
        "frac_masked": (valid & ~keep).sum() / n_f,
        "ess": sum_w.square() / (n_f * sum_w2) if n > 0 else w.new_ones(()),
        "mismatch_abs_mean": abs_delta.sum() / n_f,
        "mismatch_abs_max": abs_delta.amax() if n > 0 else w.new_zeros(()),
        "mismatch_k3": torch.where(valid, k3, torch.zeros_like(k3)).sum() / n_f,
        "frac_abs_gt_ln2": (valid & (abs_delta > math.log(2.0))).sum() / n_f,
    }
    return weights, keep.to(mask.dtype), stats


def _sequence_rule(
    log_w: torch.Tensor, k3: torch.Tensor, valid: torch.Tensor, cfg: CorrectionConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the sequence modes: which sequences to keep ``[B]`` and the per-token weight ``[B, T]`` (``rho_i``
    broadcast for ``seq_tis``, else 1). ``log_w``/``k3`` are already 0 at invalid tokens."""
    tokens = valid.sum(dim=-1).clamp(min=1)
    log_rho = log_w.sum(dim=-1)  # log of rho_i = prod_t w_t
    ones = torch.ones_like(log_w)
    if cfg.mode == "seq_tis":
        rho = log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # clamped so exp cannot overflow
        return torch.ones_like(valid[:, 0]), rho[:, None].expand_as(log_w).clone()
    if cfg.mode == "seq_mask":
        lower, upper = cfg.bounds()
        keep = (log_rho >= math.log(lower)) & (log_rho <= math.log(upper))
    elif cfg.mode == "geo_mask":
        log_geo = log_rho / tokens
        keep = (log_geo >= math.log(cfg.geo_low)) & (log_geo <= math.log(cfg.geo_high))
    elif cfg.mode == "k3_filter":
        keep = k3.sum(dim=-1) / tokens <= cfg.k3_threshold
    else:
        raise ValueError(f"CorrectionConfig.mode: {cfg.mode!r} is not a sequence mode")
    return keep, ones
