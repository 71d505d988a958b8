"""Train-rollout mismatch: recompute rollout tokens with the trainer's full forward and compare.

The rollout side decodes token by token (``mtrain.models.generate``); the trainer side runs one full-sequence forward
over the same tokens. Both record the logprob of every generated token and the top-k experts every MoE layer chose at
the position that produced it. :func:`mismatch_metrics` turns the two into the numbers RL practitioners watch
(logprob / probability differences, KL k1 and k3, perplexity ratio, probability correlation, routing disagreement).
No Lightning or Hydra here.
"""

from __future__ import annotations

import math

import torch

from mtrain.models.decoding import score
from mtrain.models.generate import Generation, eager, recompute
from mtrain.models.routing import RoutingTrace
from mtrain.models.transformer import MoECausalLM


@torch.no_grad()
def trainer_recompute(model: MoECausalLM, gen: Generation, pad_id: int = 0, trace: RoutingTrace | None = None,
                      scoring: str = "standard") -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's numbers for a rollout: the logprob [B, N] of every generated token (one full forward in the
    rollout's layout) and the routing [B, N, moe_layers, k] at the position that produced each token: the experts
    the routers chose (under a replay ``trace``: the experts they *would* have chosen, ``trace.own``).
    ``scoring``: ``standard`` (the trainer's forward, :func:`recompute`) or ``invariant`` (one prefill through the
    exact engine's path, :func:`mtrain.models.decoding.score`: what an exact engine is compared with)."""
    trace = trace if trace is not None else RoutingTrace()
    if scoring == "invariant":
        logprobs = score(model, gen, trace=trace)
    else:
        with eager():
            logprobs = recompute(model, gen, pad_id, trace=trace)
    if not trace.ids:
        return logprobs, gen.routing.new_zeros(*logprobs.shape, 0, 0)
    producing = slice(gen.first - 1, gen.first - 1 + gen.tokens.shape[1])
    return logprobs, trace.stacked(own=trace.mode == "replay")[:, producing]


def layers_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Routing [B, N, L, k] x2 -> [B, N, L] bool: the two chose a different set of experts in that layer."""
    return (a.sort(-1).values != b.sort(-1).values).any(-1)


def routing_disagreement(a: torch.Tensor, b: torch.Tensor, lengths: torch.Tensor) -> float:
    """The share of (generated token, MoE layer) pairs whose expert sets differ (0 without MoE layers; NaN when
    one side has no routing: an engine's file without ``routed_experts``)."""
    if a.shape[-2] != b.shape[-2]:
        return float("nan")
    if a.shape[-2] == 0:
        return 0.0
    valid = torch.arange(a.shape[1], device=lengths.device)[None, :] < lengths[:, None]
    return layers_differ(a, b)[valid].double().mean().item()


def mismatch_metrics(
    rollout_lp: torch.Tensor,
    trainer_lp: torch.Tensor,
    rollout_routing: torch.Tensor,
    trainer_routing: torch.Tensor,
    lengths: torch.Tensor,
    rows: bool = True,
) -> tuple[dict, list[dict]]:
    """Aggregate metrics and (``rows``) one row per generated token. Logprobs [B, N]; routing [B, N, L, k];
    lengths [B]."""
    B, N = rollout_lp.shape
    valid = torch.arange(N, device=lengths.device)[None, :] < lengths[:, None]
    r, t = rollout_lp[valid].double(), trainer_lp[valid].double()
    p_r, p_t = r.exp(), t.exp()
    log_ratio = t - r  # log(trainer / rollout), tokens sampled from the rollout policy
    if rollout_routing.shape[-2] != trainer_routing.shape[-2]:  # the engine gave no routing: not known
        differs = torch.full((B, N, trainer_routing.shape[-2]), float("nan"), dtype=torch.float64,
                             device=trainer_routing.device)
    else:
        differs = layers_differ(rollout_routing, trainer_routing).double()  # [B, N, L]
    layers = differs.shape[-1]
    per_layer = differs[valid].mean(0) if layers else torch.zeros(0, dtype=torch.float64)
    n = int(valid.sum())
    metrics = {
        "tokens": n,
        "logprob_abs_diff_mean": (r - t).abs().mean().item(),
        "logprob_abs_diff_max": (r - t).abs().max().item(),
        "prob_abs_diff_mean": (p_r - p_t).abs().mean().item(),
        "prob_abs_diff_max": (p_r - p_t).abs().max().item(),
        "kl_k1": (-log_ratio).mean().item(),
        "kl_k3": (log_ratio.exp() - 1 - log_ratio).mean().item(),
        "log_ppl_diff": ((-r).mean() - (-t).mean()).item(),
        "ppl_ratio": math.exp(((-t).mean() - (-r).mean()).item()),
        "prob_pearson": _pearson(p_r, p_t),
        "routing_disagreement": per_layer.mean().item() if layers else 0.0,
        "routing_disagreement_per_layer": [round(x, 6) for x in per_layer.tolist()],
        "tokens_any_layer_differs": differs.amax(-1)[valid].mean().item() if layers else 0.0,
    }
    if not rows:
        return metrics, []
    table = []
    for b in range(B):
        for i in range(int(lengths[b])):
            table.append({
                "sequence": b,
                "position": i,
                "rollout_logprob": rollout_lp[b, i].item(),
                "trainer_logprob": trainer_lp[b, i].item(),
                "abs_diff": abs(rollout_lp[b, i].item() - trainer_lp[b, i].item()),
                "layers_differ": (None if differs[b, i].isnan().any() else int(differs[b, i].sum())) if layers else 0,
            })
    return metrics, table


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2 or a.std() == 0 or b.std() == 0:
        return 1.0 if torch.equal(a, b) else float("nan")
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()
