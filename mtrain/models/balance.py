"""Keeping the experts' load balanced: the auxiliary losses, the aux-loss-free bias update, a frozen router, and the
load metrics. Pure torch; the routing these read comes from the forward itself (:mod:`mtrain.models.router_stats`).

* **Load-balancing loss** in ``transformers``' form (``load_balancing_loss_func`` of Qwen3-MoE, Switch Transformer
  eqs. 4-6): ``num_experts * sum_i f_i * P_i``, with ``f_i`` the share of token-slots routed to expert ``i`` (the
  top-k choices: ``sum_i f_i = top_k``) and ``P_i`` the mean routing probability of expert ``i``, both pooled over
  the MoE layers and the real (unmasked) tokens. Only ``P`` carries a gradient. ``aux``: over the batch;
  ``seq_aux``: per sequence, then the mean over sequences (DeepSeek-V3's sequence-wise loss, in this scale);
  ``global_aux``: ``f`` from the token counts summed over the data-parallel group (``reduce``), each rank's ``P``
  weighted by its share of the group's tokens, so the ranks' mean is the loss of the global batch (N processes take
  the step one process takes on the whole batch, as with the language-model loss). The routing probability is the
  router's own (:meth:`mtrain.models.moe.Router.probs`): the softmax for Qwen3-MoE, the sigmoid scores normalised over the experts
  for GLM4-MoE.
* **Router z-loss** (ST-MoE): the mean over layers and real tokens of ``logsumexp(router logits)**2``.
* **Aux-loss-free balancing** (DeepSeek-V3, GLM-4.5): after each optimizer step, for each MoE layer,
  ``bias += rate * sign(mean load - load_i)`` in fp32, from the step's token counts; the bias only selects experts.
* **MaxVio** of a layer: ``(max_i load_i - mean load) / mean load``; 0 is perfectly balanced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

LOAD_BALANCING = ("none", "aux", "seq_aux", "global_aux")

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over the data-parallel ranks (identity on one process)


@dataclass(frozen=True)
class BalanceSettings:
    """``model.routing``: every option off by default (the schema's ``RoutingConfig`` carries the same names)."""

    load_balancing: str = "none"  # none | aux | seq_aux | global_aux
    aux_loss_coef: float = 1e-3  # transformers' router_aux_loss_coef (Qwen3-MoE's default)
    z_loss_coef: float = 0.0
    bias_update: bool = False  # aux-loss-free balancing of routers with a selection bias (GLM4-MoE)
    bias_update_rate: float = 1e-3
    freeze_router: bool = False  # the gate weight (and its bias) get no updates

    def __post_init__(self) -> None:
        """ValueError naming the first bad field (the config layer prefixes ``model.routing.``)."""
        if self.load_balancing not in LOAD_BALANCING:
            raise ValueError(f"load_balancing={self.load_balancing!r} is not one of {', '.join(LOAD_BALANCING)}")
        for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, key)
            if not value >= 0:  # NaN too
                raise ValueError(f"{key}={value} must be >= 0")
        if self.bias_update and self.bias_update_rate == 0:
            raise ValueError("bias_update_rate=0 with bias_update=true updates nothing: give a rate > 0 "
                             "(1e-3 is DeepSeek-V3's) or set bias_update=false")
        if self.freeze_router and self.bias_update:
            raise ValueError("freeze_router=true keeps the router (its gate and its bias) as it is, and "
                             "bias_update=true updates the bias: choose one")

    @property
    def aux_on(self) -> bool:
        return self.load_balancing != "none" and self.aux_loss_coef > 0

    @property
    def z_on(self) -> bool:
        return self.z_loss_coef > 0

    @property
    def has_loss(self) -> bool:
        """Whether training adds a routing loss (the losses need the router logits of the step, with gradient)."""
        return self.aux_on or self.z_on


# -- losses -------------------------------------------------------------------------------------------------------
def expert_counts(experts: torch.Tensor, num_experts: int, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How many of the token-slots ``experts`` [T, k] go to each expert: int64 [E], fixed size (no host sync, unlike
    ``bincount``). ``weight`` [T] (int, 0/1): only the tokens with weight 1 count."""
    flat = experts.reshape(-1)
    ones = (torch.ones_like(flat) if weight is None
            else weight.to(torch.int64).repeat_interleave(experts.shape[-1]))
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, ones)


def _sums(probs: torch.Tensor, experts: torch.Tensor, num_experts: int, mask: Optional[torch.Tensor]):
    """(token-slot counts [E] fp32, probability sums [E] fp32 (with gradient), real tokens) of one layer."""
    probs = probs.float()
    if mask is None:
        return expert_counts(experts, num_experts).float(), probs.sum(0), float(probs.shape[0])
    m = mask.reshape(-1).to(probs.dtype)
    return expert_counts(experts, num_experts, mask.reshape(-1)).float(), (probs * m[:, None]).sum(0), m.sum()


def load_balancing_loss(
    probs: Sequence[torch.Tensor],
    experts: Sequence[torch.Tensor],
    num_experts: int,
    mask: Optional[torch.Tensor] = None,
    reduce: Optional[Reduce] = None,
) -> torch.Tensor:
    """``num_experts * sum_i f_i P_i`` over every layer's tokens: ``probs[l]`` [T, E] routing probabilities,
    ``experts[l]`` [T, k] the experts chosen, ``mask`` [T] (1 = a real token; None: all). ``reduce`` (global_aux): a
    sum over the data-parallel ranks; ``f`` and the token count are the group's, and the mean of the ranks' values is
    the loss of the whole group's batch."""
    counts = torch.zeros(num_experts, device=probs[0].device)
    prob_sum = torch.zeros(num_experts, device=probs[0].device)
    rows = torch.zeros((), device=probs[0].device)
    for p, e in zip(probs, experts):
        c, s, n = _sums(p, e, num_experts, mask)
        counts, prob_sum, rows = counts + c, prob_sum + s, rows + n
    if reduce is None:
        rows = rows.clamp(min=1)  # no real token: 0, as the other losses
        return num_experts * torch.sum(counts / rows * (prob_sum / rows))
    # global: f and the token count over the ranks; this rank's P weighted by its share of the global tokens (x the
    # world size, which data parallelism divides by), so the ranks' mean is the loss of the global batch
    summed = reduce(torch.cat([counts, rows.reshape(1), torch.ones(1, device=counts.device)]))
    counts, rows, world = summed[:-2], summed[-2].clamp(min=1), summed[-1]
    return num_experts * torch.sum(counts / rows * (prob_sum * world / rows))


def seq_load_balancing_loss(
    probs: Sequence[torch.Tensor],
    experts: Sequence[torch.Tensor],
    num_experts: int,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`load_balancing_loss` of each sequence, averaged over the sequences that hold a real token:
    ``probs[l]`` [B, S, E], ``experts[l]`` [B, S, k], ``mask`` [B, S]."""
    B, S, E = probs[0].shape
    mask = torch.ones(B, S, device=probs[0].device) if mask is None else mask.float()
    counts = torch.zeros(B, E, device=probs[0].device)
    prob_sum = torch.zeros(B, E, device=probs[0].device)
    for p, e in zip(probs, experts):
        onehot_w = mask[..., None].repeat_interleave(e.shape[-1], dim=-1)  # [B, S, k]
        counts = counts + torch.zeros(B, E, device=p.device).scatter_add_(1, e.reshape(B, -1), onehot_w.reshape(B, -1))
        prob_sum = prob_sum + (p.float() * mask[..., None]).sum(1)
    rows = mask.sum(1) * len(probs)  # [B]
    has = (rows > 0).float()  # weights, not a boolean index: no host sync on the GPU
    n = rows.clamp(min=1)[:, None]
    per_seq = num_experts * (counts / n * (prob_sum / n)).sum(-1)
    return (per_seq * has).sum() / has.sum().clamp(min=1)


def router_z_loss(logits: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over layers and real tokens of ``logsumexp(logits)**2`` (``logits[l]`` [T, E], ``mask`` [T])."""
    z = torch.stack([torch.logsumexp(x.float(), dim=-1).square() for x in logits])  # [L, T]
    if mask is None:
        return z.mean()
    m = mask.reshape(-1).float()
    return (z * m).sum() / (m.sum() * len(logits)).clamp(min=1)


# -- aux-loss-free balancing, frozen routers ------------------------------------------------------------------------
@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """One layer: ``bias += rate * sign(mean load - load_i)`` in fp32 (``counts`` [E]: the step's token counts)."""
    load = counts.to(torch.float32)
    bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=rate)


def routers_with_bias(model: nn.Module) -> list[nn.Module]:
    """The model's routers that have a selection bias (:attr:`mtrain.models.moe.Router.expert_bias`)."""
    return [r for _, r in model.routers() if r.expert_bias is not None]


def freeze_routers(model: nn.Module) -> int:
    """No gradient (and so no optimizer update) for any router's parameters; returns how many were frozen."""
    n = 0
    for _, router in model.routers():
        for p in router.parameters():
            p.requires_grad_(False)
            n += 1
    return n


# -- metrics --------------------------------------------------------------------------------------------------------
def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio of each row of ``counts`` [..., E]: ``(max - mean) / mean`` (0 where a row is empty)."""
    c = counts.double()
    mean = c.mean(-1)
    return torch.where(mean > 0, (c.amax(-1) - mean) / mean.clamp(min=1e-30), torch.zeros_like(mean))


def load_metrics(counts: torch.Tensor, prob_sum: torch.Tensor, entropy_sum: torch.Tensor, z_sum: torch.Tensor,
                 rows: torch.Tensor) -> dict:
    """Per layer and summarised, from a window's sums (host tensors): ``counts`` [L, E] token-slots per expert,
    ``prob_sum`` [L, E] summed routing probabilities, ``entropy_sum`` / ``z_sum`` / ``rows`` [L] summed per-token
    routing entropy (nats), ``logsumexp**2`` and real tokens. Returns plain Python numbers and lists."""
    counts, prob_sum = counts.double(), prob_sum.double()
    E = counts.shape[-1]
    n = rows.double().clamp(min=1)
    maxvio = max_violation(counts)
    dead = (counts == 0).double().mean(-1)
    entropy = entropy_sum.double() / n
    z = z_sum.double() / n
    aux = E * (counts / n[:, None] * (prob_sum / n[:, None])).sum(-1)
    total = rows.double().sum().clamp(min=1)
    aux_all = E * (counts.sum(0) / total * (prob_sum.sum(0) / total)).sum()  # pooled as the training loss is
    return {
        "maxvio": float(maxvio.mean()), "maxvio_max": float(maxvio.max()), "dead_expert_frac": float(dead.mean()),
        "entropy": float(entropy_sum.double().sum() / total), "aux_loss": float(aux_all),
        "z_loss": float(z_sum.double().sum() / total), "tokens": int(rows.sum()),
        "layers": {"maxvio": maxvio.tolist(), "dead_expert_frac": dead.tolist(), "entropy": entropy.tolist(),
                   "aux_loss": aux.tolist(), "z_loss": z.tolist()},
        "tokens_per_expert": counts.round().long().tolist(),
    }
