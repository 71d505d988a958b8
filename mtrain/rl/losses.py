"""Policy-gradient losses: PPO/GSPO clipped surrogate, loss aggregation, KL-to-reference estimators, entropy.

Per-response tensors are ``[B, T]`` (B responses, T response-token positions, right-padded) with a ``mask [B, T]``
(float or bool; nonzero = a real response token that counts). Masked-out positions may hold any value (even inf or
nan): they leave every numerator and denominator. Log-probs are fp32. Pure torch; no Lightning or Hydra here.

Three registries, chosen by name in the config (:mod:`mtrain.registry`):

- policy losses (``task.loss``, :func:`register_policy_loss`): ``fn(logp, logp_old, advantages, mask, *, ...)
  -> (loss, stats)``, with ``advantages`` per token ``[B, T]`` (detached, 0 outside the mask) and ``mask`` bool. The
  framework hands ``clip_low``, ``clip_high``, ``dual_clip``, ``is_weights`` and ``agg`` (``agg(values, mask)``: the
  configured aggregation) to those that name them; other options come from ``task.loss_args``.
- aggregations (``task.loss_agg``, :func:`register_loss_agg`): ``fn(values, mask, *, ...) -> scalar`` with
  ``values`` 0 outside the bool ``mask``; ``norm_len`` is handed over; options from ``task.loss_agg_args``.
- KL estimators (``task.kl_estimator``, :func:`register_kl_estimator`): ``fn(logp, logp_ref, *, ...) -> [B, T]``;
  options from ``task.kl_estimator_args``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from mtrain.registry import Registry

from .ratios import LOG_RATIO_CLAMP, clamped_exp

POLICY_LOSSES: Registry = Registry("policy loss kind", inputs=4,
                                    context=("clip_low", "clip_high", "dual_clip", "is_weights", "agg"))
LOSS_AGGS: Registry = Registry("loss_agg mode", inputs=2, context=("norm_len",))
KL_ESTIMATORS: Registry = Registry("KL estimator", inputs=2)
register_policy_loss = POLICY_LOSSES.register
register_loss_agg = LOSS_AGGS.register
register_kl_estimator = KL_ESTIMATORS.register


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: Optional[int] = None,
              options: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """Reduce per-token ``values [B, T]`` to a scalar over the tokens where ``mask`` is set, by the aggregation
    registered as ``mode`` (``options``: its own, ``task.loss_agg_args``). The built-in ones:

    - ``token-mean``:              ``sum_{b,t} m v / sum_{b,t} m`` (every token of the batch weighs the same; DAPO).
    - ``seq-mean-token-mean``:     ``mean_b [ sum_t m v / sum_t m ]`` over the sequences with >= 1 token (GRPO).
    - ``seq-mean-token-sum-norm``: ``mean_b [ sum_t m v / norm_len ]`` over the sequences with >= 1 token, with
      ``norm_len`` a fixed maximum response length (Dr.GRPO).

    An all-zero mask gives 0, still connected to ``values``' graph (zero gradient).
    """
    fn = LOSS_AGGS.bind(mode, {"norm_len": norm_len}, options, where="task.loss_agg_args")
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same [B, T] shape")
    m = mask.bool()
    return fn(torch.where(m, values, torch.zeros_like(values)), m)


@register_loss_agg("token-mean")
def token_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return v.sum() / m.sum().clamp(min=1)


@register_loss_agg("seq-mean-token-mean")
def seq_mean_token_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    tokens = m.sum(dim=-1)  # [B]
    return _mean_over_sequences(v.sum(dim=-1) / tokens.clamp(min=1), tokens)


@register_loss_agg("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(v: torch.Tensor, m: torch.Tensor, *, norm_len: Optional[int] = None) -> torch.Tensor:
    if norm_len is None or norm_len <= 0:
        raise ValueError(f"loss_agg 'seq-mean-token-sum-norm' needs norm_len > 0 (a fixed max length), got {norm_len}")
    return _mean_over_sequences(v.sum(dim=-1) / norm_len, m.sum(dim=-1))


def _mean_over_sequences(per_seq: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_seq [B]`` over the sequences with at least one token."""
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
    options: Optional[Mapping[str, Any]] = None,
    agg_options: Optional[Mapping[str, Any]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss registered as ``kind`` (to minimise) and its stats (0-dim, detached). ``options``: the
    loss's own (``task.loss_args``); ``agg_options``: the aggregation's (``task.loss_agg_args``). The built-in ones
    are the clipped surrogate, per token, with ratio ``r`` and advantage ``A`` (``advantages`` is ``[B]``, broadcast
    over tokens, or ``[B, T]``): ``loss_t = max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A)``
    (= ``-min(r A, clip(r) A)``).

    - ``kind="ppo"``:  ``r_t = exp(logp_t - logp_old_t)``.
    - ``kind="gspo"``: the sequence ratio ``s_i = exp(mean_t (logp - logp_old))`` (mean over the masked tokens),
      written token-wise as ``s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])``: its value is ``s_i`` and its gradient is
      ``s_i * grad logp_t``, so with ``seq-mean-token-mean`` the gradient is the GSPO paper's
      ``s_i * mean_t grad logp_t``. Use small clips (the paper: 3e-4 / 4e-4) and ``loss_agg="seq-mean-token-mean"``.
    - ``dual_clip=c`` (c > 1): for ``A < 0`` the loss is also capped, ``min(loss_t, c |A|)``.
    - ``is_weights`` (e.g. TIS weights, detached here) multiply each token's loss before ``aggregate(loss_agg)``.

    Stats (over the masked tokens): ``clip_frac`` (the clipped term was chosen and differs), ``approx_kl`` (mean k3
    of old vs new, ``exp(logp_old - logp) - (logp_old - logp) - 1``), ``ratio_mean``, ``ratio_max``, and
    ``dual_clip_frac`` (tokens with A < 0 whose loss the dual clip capped) when dual clip is on.
    """
    def agg(values: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return aggregate(values, m, loss_agg, norm_len, agg_options)

    context = {"clip_low": clip_low, "clip_high": clip_high, "dual_clip": dual_clip, "is_weights": is_weights,
               "agg": agg}
    fn = POLICY_LOSSES.bind(kind, context, options, where="task.loss_args")
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
    if is_weights is not None and is_weights.shape != logp.shape:
        raise ValueError(f"is_weights {tuple(is_weights.shape)} must match logp {tuple(logp.shape)}")
    m = mask.bool()
    adv = torch.where(m, _per_token(advantages, logp), torch.zeros_like(logp))
    loss, stats = fn(logp, logp_old, adv, m)
    return loss, {k: v.detach() for k, v in stats.items()}


@register_policy_loss("ppo")
def ppo(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, m: torch.Tensor, *, clip_low: float,
        clip_high: float, dual_clip: Optional[float], is_weights: Optional[torch.Tensor], agg: Callable):
    """The token ratio ``r_t = exp(logp_t - logp_old_t)`` in the clipped surrogate."""
    log_ratio = torch.where(m, logp - logp_old, torch.zeros_like(logp))
    ratio = clamped_exp(log_ratio)
    return clipped_surrogate(ratio, log_ratio, adv, m, clip_low, clip_high, dual_clip, is_weights, agg)


@register_policy_loss("gspo")
def gspo(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, m: torch.Tensor, *, clip_low: float,
         clip_high: float, dual_clip: Optional[float], is_weights: Optional[torch.Tensor], agg: Callable):
    """The sequence ratio ``s_i = exp(mean_t (logp - logp_old))``, token-wise ``sg[s_i] * exp(logp_t - sg[logp_t])``,
    in the clipped surrogate."""
    log_ratio = torch.where(m, logp - logp_old, torch.zeros_like(logp))
    seq_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True).clamp(min=1)
    token_log_ratio = seq_log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) + (logp - logp.detach())
    ratio = torch.where(m, token_log_ratio, torch.zeros_like(logp)).exp()
    return clipped_surrogate(ratio, log_ratio, adv, m, clip_low, clip_high, dual_clip, is_weights, agg)


def clipped_surrogate(ratio: torch.Tensor, log_ratio: torch.Tensor, adv: torch.Tensor, m: torch.Tensor,
                      clip_low: float, clip_high: float, dual_clip: Optional[float],
                      is_weights: Optional[torch.Tensor], agg: Callable) -> tuple[torch.Tensor, dict]:
    """``agg`` of ``max(-A r, -A clip(r))`` per token (capped at ``dual_clip |A|`` for A < 0, times the detached
    ``is_weights``), and the stats of :func:`policy_loss`. ``log_ratio``: ``logp - logp_old``, 0 outside ``m``."""
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
        loss = loss * torch.where(m, is_weights.detach().to(loss.dtype), torch.zeros_like(loss))

    with torch.no_grad():
        d = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # logp_old - logp
        stats["approx_kl"] = _masked_mean(d.exp() - d - 1.0, m)
        stats["ratio_mean"] = _masked_mean(ratio, m)
        stats["ratio_max"] = torch.where(m, ratio, torch.zeros_like(ratio)).amax() if m.any() else ratio.new_zeros(())
    return agg(loss, m), stats


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str,
               options: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """Per-token estimator of KL(pi || pi_ref) on tokens sampled from pi, registered as ``kind`` (``options``: its
    own, ``task.kl_estimator_args``). The built-in ones, with ``d = logp_ref - logp``: ``k1 = -d``,
    ``k2 = d^2 / 2``, ``k3 = exp(d) - d - 1`` (unbiased and >= 0; d clamped to +-20 first)."""
    return KL_ESTIMATORS.bind(kind, {}, options, where="task.kl_estimator_args")(logp, logp_ref)


@register_kl_estimator("k1")
def k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    return -(logp_ref - logp)


@register_kl_estimator("k2")
def k2(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp_ref - logp).square()


@register_kl_estimator("k3")
def k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    d = (logp_ref - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
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
