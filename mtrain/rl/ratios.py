"""Log-ratios of two policies' log-probs, and their exponent: clamped to +-20 first (as verl does), so ``exp``
cannot overflow. Shared by the policy losses and the rollout corrections."""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0


def clamped_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    """``exp(clamp(log_ratio, -20, 20))``."""
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
