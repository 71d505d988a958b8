"""Token log-probabilities: the one place mtrain turns logits into the logprob of chosen tokens.

Every caller goes through :func:`gather_logprobs` (fp32 log-softmax of model-dtype logits, then gather): the eval
logprob file, the rollout's sampled-token logprobs, the trainer's recompute of a rollout, and the RL losses.
:func:`token_logprobs` computes them from hidden states a chunk of positions at a time, so a 150k vocabulary fits.
"""

from __future__ import annotations

import torch

from .loss import IGNORE_INDEX
from .routing import RoutingTrace
from .transformer import MoECausalLM


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [..., V] (any dtype) and tokens [...] -> fp32 log p(token) [...]. Negative tokens give 0."""
    lp = logits.float().log_softmax(-1).gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(tokens >= 0, lp, torch.zeros_like(lp))


def token_logprobs(
    model: MoECausalLM,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    trace: RoutingTrace | None = None,
    chunk: int = 1024,
    with_entropy: bool = False,
    temperature: float = 1.0,
):
    """fp32 log-probability [B, S] of each target (``targets[:, t]`` follows ``input_ids[:, :t+1]``; -100 = none,
    giving 0), from model-dtype logits computed ``chunk`` rows at a time. Differentiable (wrap in ``no_grad`` to
    score). ``with_entropy``: also the entropy [B, S] of each position's distribution (0 where no target).
    ``temperature``: of the distribution (logits / T; 1 = unscaled)."""
    h = model.hidden_states(input_ids, position_ids=position_ids, attn_mask=attn_mask, trace=trace).flatten(0, 1)
    t = targets.flatten()
    w = model.output_weight
    lps, ents = [], []
    for s in range(0, h.shape[0], chunk):
        rows = t[s : s + chunk] != IGNORE_INDEX
        logits = h[s : s + chunk] @ w.t()
        if temperature != 1.0:
            logits = logits.float() / temperature
        lps.append(gather_logprobs(logits, torch.where(rows, t[s : s + chunk], -1)))
        if with_entropy:
            logp = logits.float().log_softmax(-1)
            ents.append(torch.where(rows, -(logp.exp() * logp).sum(-1), 0.0))
    lp = torch.cat(lps).view(targets.shape)
    return (lp, torch.cat(ents).view(targets.shape)) if with_entropy else lp
