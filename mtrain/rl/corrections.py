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

Modes are registered by name (``task.rollout_correction.mode=<name>``, :func:`register_correction`): a new one is
``fn(r: TokenRatios, cfg: CorrectionConfig, *, ...) -> (weights [B, T], keep [B, T] bool, truncated [B, T] bool)``
(weights before the mask is applied; ``truncated`` marks the tokens whose weight was cut, for the stats). Its own
options come from ``task.rollout_correction.args`` (``cfg.args``; :mod:`mtrain.registry`); ``check(cfg)``, given to
the decorator, refuses thresholds the mode cannot use when the config is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from mtrain.registry import Registry

from .ratios import LOG_RATIO_CLAMP, clamped_exp

CORRECTIONS: Registry = Registry("correction mode", inputs=2)
_CHECKS: dict[str, Callable[["CorrectionConfig"], None]] = {}


def register_correction(name: str, check: Optional[Callable[["CorrectionConfig"], None]] = None):
    """Decorator: a correction mode by name; ``check(cfg)`` raises ValueError on thresholds it cannot use."""
    add = CORRECTIONS.register(name)

    def register(fn):
        if check is not None:
            _CHECKS[name] = check
        return add(fn)

    return register


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
    args: Dict[str, Any] = field(default_factory=dict)  # the mode's own options (task.rollout_correction.args)

    def __post_init__(self) -> None:
        self.validate()

    def bounds(self) -> tuple[float, float]:
        """The ``[lower, upper]`` band of the masking modes, with the defaults ``1/cap`` and ``cap`` filled in."""
        lower = 1.0 / self.cap if self.lower is None else self.lower
        upper = self.cap if self.upper is None else self.upper
        return lower, upper

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.mode not in CORRECTIONS and "." not in self.mode:
            raise ValueError(f"CorrectionConfig.mode: unknown mode {self.mode!r}; expected one of "
                             f"{', '.join(CORRECTIONS.names())}")
        CORRECTIONS.bind(self.mode, {}, self.args, where="task.rollout_correction.args")  # a known mode, its options
        if self.cap <= 0:
            _cap_above_one(self)
        if self.mode in _CHECKS:
            _CHECKS[self.mode](self)
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

    fn = CORRECTIONS.bind(cfg.mode, {}, cfg.args, where="task.rollout_correction.args")
    weights, keep, truncated = fn(TokenRatios(valid, log_w, w, k3), cfg)
    keep = valid & keep
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


@dataclass
class TokenRatios:
    """What a correction mode decides from, per token ``[B, T]`` (all 0 at invalid tokens but ``w``): ``valid``
    (bool, the tokens that count), ``log_w`` (``logp_old - logp_roll``, clamped to +-20), ``w = exp(log_w)`` and
    ``k3 = w - log_w - 1``."""

    valid: torch.Tensor
    log_w: torch.Tensor
    w: torch.Tensor
    k3: torch.Tensor

    def tokens(self) -> torch.Tensor:
        """Valid tokens per sequence ``[B]``, at least 1."""
        return self.valid.sum(dim=-1).clamp(min=1)

    def keep_sequences(self, keep_seq: torch.Tensor) -> torch.Tensor:
        """Per-token ``keep`` of a per-sequence decision ``[B]``."""
        return self.valid & keep_seq[:, None]

    def nothing_truncated(self) -> torch.Tensor:
        return torch.zeros_like(self.valid)


def _cap_above_one(cfg: CorrectionConfig) -> None:
    if cfg.cap <= 1:
        raise ValueError(f"CorrectionConfig.cap must be > 1 (the IS weight's truncation level), got {cfg.cap}")


def _band(cfg: CorrectionConfig) -> None:
    lower, upper = cfg.bounds()
    if not 0 < lower < upper:
        raise ValueError(f"CorrectionConfig.lower ({lower}) must be > 0 and < upper ({upper})")


@register_correction("off")
def off(r: TokenRatios, cfg: CorrectionConfig):
    return torch.ones_like(r.w), r.valid, r.nothing_truncated()


@register_correction("token_tis", check=_cap_above_one)
def token_tis(r: TokenRatios, cfg: CorrectionConfig):
    return r.w.clamp(max=cfg.cap), r.valid, r.valid & (r.w > cfg.cap)


@register_correction("token_mask", check=_band)
def token_mask(r: TokenRatios, cfg: CorrectionConfig):
    lower, upper = cfg.bounds()
    return torch.ones_like(r.w), r.valid & (r.w >= lower) & (r.w <= upper), r.nothing_truncated()


@register_correction("seq_tis", check=_cap_above_one)
def seq_tis(r: TokenRatios, cfg: CorrectionConfig):
    rho = clamped_exp(r.log_w.sum(dim=-1))  # rho_i = prod_t w_t, clamped so exp cannot overflow
    weights = rho[:, None].expand_as(r.log_w).clone()
    return weights.clamp(max=cfg.cap), r.valid, r.valid & (weights > cfg.cap)


@register_correction("seq_mask", check=_band)
def seq_mask(r: TokenRatios, cfg: CorrectionConfig):
    lower, upper = cfg.bounds()
    log_rho = r.log_w.sum(dim=-1)
    keep = (log_rho >= math.log(lower)) & (log_rho <= math.log(upper))
    return torch.ones_like(r.log_w), r.keep_sequences(keep), r.nothing_truncated()


@register_correction("geo_mask")
def geo_mask(r: TokenRatios, cfg: CorrectionConfig):
    log_geo = r.log_w.sum(dim=-1) / r.tokens()
    keep = (log_geo >= math.log(cfg.geo_low)) & (log_geo <= math.log(cfg.geo_high))
    return torch.ones_like(r.log_w), r.keep_sequences(keep), r.nothing_truncated()


@register_correction("k3_filter")
def k3_filter(r: TokenRatios, cfg: CorrectionConfig):
    keep = r.k3.sum(dim=-1) / r.tokens() <= cfg.k3_threshold
    return torch.ones_like(r.log_w), r.keep_sequences(keep), r.nothing_truncated()
