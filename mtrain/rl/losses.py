"""Policy-gradient losses: PPO/GSPO clipped surrogate, loss aggregation, KL-to-reference estimators, entropy.

Per-response tensors are ``[B, T]`` (B responses, T response-token positions, right-padded) with a ``mask [B, T]``
(float or bool; nonzero = a real response token that counts). Masked-out positions may hold any value (even inf or
nan): they leave every numerator and denominator. Log-probs are fp32. Pure torch; no Lightning or Hydra here.
"""

from __future__ import annotations

from typing import Optional

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
POLICY_LOSS_KINDS = ("ppo", "gspo")
KL_KINDS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0  # log-ratios are clamped to +-20 before exp (as verl does)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: Optional[int] = None) -> torch.Tensor:
    """Reduce per-token ``values [B, T]`` to a scalar over the tokens where ``mask`` is set.

    - ``token-mean``:              ``sum_{b,t} m v / sum_{b,t} m`` (every token of the batch weighs the same; DAPO).
    - ``seq-mean-token-mean``:     ``mean_b [ sum_t m v / sum_t m ]`` over the sequences with >= 1 token (GRPO).
    - ``seq-mean-token-sum-norm``: ``mean_b [ sum_t m v / norm_len ]`` over the sequences with >= 1 token, with
      ``norm_len`` a fixed maximum response length (Dr.GRPO).

    An all-zero mask gives 0, still connected to ``values``' graph (zero gradient).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg mode {mode!r}; expected one of {LOSS_AGG_MODES}")
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same [B, T] shape")
    m = mask.bool()
    v = torch.where(m, values, torch.zeros_like(values))
    if mode == "token-mean":
        return v.sum() / m.sum().clamp(min=1)
    tokens = m.sum(dim=-1)  # [B]
    if mode == "seq-mean-token-mean":
        per_seq = v.sum(dim=-1) / tokens.clamp(min=1)
    else:
        if norm_len is None or norm_len <= 0:
            raise ValueError(f"loss_agg 'seq-mean-token-sum-norm' needs norm_len > 0 (a fixed max length), "
                             f"got {norm_len}")
        per_seq = v.sum(dim=-1) / norm_len
    has_tokens = tokens > 0
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    loss_agg: str = "token-mean",
    norm_len: Optional[int] = None,
    is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss (to minimise) and its stats.

    Per token, with ratio ``r`` and advantage ``A`` (``advantages`` is ``[B]``, broadcast over tokens, or ``[B, T]``):
    ``loss_t = max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A)``  (= ``-min(r A, clip(r) A)``).

    - ``kind="ppo"``:  ``r_t = exp(logp_t - logp_old_t)``.
    - ``kind="gspo"``: the sequence ratio ``s_i = exp(mean_t (logp - logp_old))`` (mean over the masked tokens),
      written token-wise as ``s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])``: its value is ``s_i`` and its gradient is
      ``s_i * grad logp_t``, so with ``seq-mean-token-mean`` the gradient is the GSPO paper's
      ``s_i * mean_t grad logp_t``. Use small clips (the paper: 3e-4 / 4e-4) and ``loss_agg="seq-mean-token-mean"``.
    - ``dual_clip=c`` (c > 1): for ``A < 0`` the loss is also capped, ``min(loss_t, c |A|)``.
    - ``is_weights`` (e.g. TIS weights, detached here) multiply each token's loss before ``aggregate(loss_agg)``.

    Stats (0-dim detached tensors, over the masked tokens): ``clip_frac`` (the clipped term was chosen and differs),
    ``approx_kl`` (mean k3 of old vs new, ``exp(logp_old - logp) - (logp_old - logp) - 1``), ``ratio_mean``,
    ``ratio_max``, and ``dual_clip_frac`` (tokens with A < 0 whose loss the dual clip capped) when dual clip is on.
    """
    if kind not in POLICY_LOSS_KINDS:
        raise ValueError(f"unknown policy loss kind {kind!r}; expected one of {POLICY_LOSS_KINDS}")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (the loss cap is dual_clip * |A|), got {dual_clip}")
    if not logp.shape == logp_old.shape == mask.shape or logp.dim() != 2:
        raise ValueError(
            f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)} and mask {tuple(mask.shape)} must be [B, T]"
        )
    m = mask.bool()
    adv = torch.where(m, _per_token(advantages, logp), torch.zeros_like(logp))
    log_ratio = torch.where(m, logp - logp_old, torch.zeros_like(logp))
    if kind == "ppo":
        ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    else:
        seq_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True).clamp(min=1)
        token_log_ratio = seq_log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) + (logp - logp.detach())
        ratio = torch.where(m, token_log_ratio, torch.zeros_like(logp)).exp()

    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {"clip_frac": _masked_mean((clipped > unclipped).float(), m)}
    if dual_clip is not None:
        cap = -adv * dual_clip  # = c |A| where A < 0
        capped = (adv < 0) & (loss > cap)
        loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
        stats["dual_clip_frac"] = _masked_mean(capped.float(), m)
    if is_weights is not None:
        if is_weights.shape != logp.shape:
            raise ValueError(f"is_weights {tuple(is_weights.shape)} must match logp {tuple(logp.shape)}")
        loss = loss * torch.where(m, is_weights.detach().to(loss.dtype), torch.zeros_like(loss))

    with torch.no_grad():
        d = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # logp_old - logp
        stats["approx_kl"] = _masked_mean(d.exp() - d - 1.0, m)
        stats["ratio_mean"] = _masked_mean(ratio, m)
        stats["ratio_max"] = torch.where(m, ratio, torch.zeros_like(ratio)).amax() if m.any() else ratio.new_zeros(())
    return aggregate(loss, m, loss_agg, norm_len), {k: v.detach() for k, v in stats.items()}


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimator of KL(pi || pi_ref) on tokens sampled from pi, with ``d = logp_ref - logp``:
    ``k1 = -d``, ``k2 = d^2 / 2``, ``k3 = exp(d) - d - 1`` (unbiased and >= 0; d clamped to +-20 first)."""
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")
    d = logp_ref - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d.square()
    d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return d.exp() - d - 1.0


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy over the last (vocab) dim, in fp32: ``H = logsumexp(z) - sum_v softmax(z)_v z_v``.
    Logits of ``-inf`` (banned tokens) have p = 0 and add nothing."""
    z = logits.float()
    p = z.softmax(dim=-1)
    finite_z = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    return z.logsumexp(dim=-1) - (p * finite_z).sum(dim=-1)


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Advantages ``[B]`` broadcast to ``[B, T]`` (or ``[B, T]`` as given), detached, in ``like``'s dtype."""
    if advantages.shape == like.shape:
        adv = advantages
    elif advantages.shape == like.shape[:1]:
        adv = advantages[:, None].expand_as(like)
    else:
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(like.shape)}, got {tuple(advantages.shape)}")
    return adv.detach().to(like.dtype)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the set entries of bool ``mask`` (0 when none)."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)
