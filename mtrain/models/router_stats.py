"""The routing of every forward, observed where it happens: :class:`RouterStats` is the ``tap`` of each MoE block
(:class:`mtrain.models.moe.MoE` calls it with its router logits and chosen experts), so the load metrics, the
balancing losses and the bias update cost no extra forward.

What it keeps, all on the model's device (nothing is read back to the host per layer or per step):

* a **window** of sums per MoE layer -- token-slots per expert, routing probabilities, per-token routing entropy,
  ``logsumexp**2`` and real tokens -- read once per logging step (:meth:`packed`, one copy, then
  :meth:`window_metrics`);
* the **step's** token counts per layer, for the bias update after the optimizer step (:meth:`update_bias`);
* with a loss on (``settings.has_loss``), the logits/probabilities of the forwards since the last :meth:`loss` call,
  with their gradient.

``grad_only`` (training): forwards without gradient (validation, the GRPO old-policy recompute, generation) are not
counted. A forward run again inside the backward (activation checkpointing) is not counted twice. Real tokens: the
mask given to :meth:`expect` when it matches the forward's ``[B, S]`` (padding excluded), else every position.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .balance import (
    BalanceSettings, Reduce, expert_counts, load_balancing_loss, load_metrics, router_z_loss, seq_load_balancing_loss,
    update_expert_bias,
)


def _in_backward() -> bool:
    """Inside autograd's backward (the recompute of an activation-checkpointed layer)."""
    return torch._C._current_graph_task_id() != -1


class RouterStats:
    def __init__(self, settings: BalanceSettings = BalanceSettings(), *, grad_only: bool = True):
        self.settings, self.grad_only = settings, grad_only
        self.blocks: list[nn.Module] = []
        self._row: dict[int, int] = {}
        self._mask: Optional[torch.Tensor] = None
        self._pending: list[tuple] = []
        self._sums: Optional[dict[str, torch.Tensor]] = None  # the window, allocated at the first forward
        self._step: Optional[torch.Tensor] = None  # [L, E] int64 counts since the last bias update
        self.last_losses: dict[str, torch.Tensor] = {}  # the unweighted losses of the last loss() call (detached)

    # -- wiring --------------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "RouterStats":
        """Tap every MoE block of ``model`` (an ``MoECausalLM``)."""
        self.blocks = [layer.mlp for layer in model.model.layers if layer.is_moe]
        self._row = {block.layer_idx: i for i, block in enumerate(self.blocks)}
        for block in self.blocks:
            block.tap = self
        return self

    def detach(self) -> None:
        for block in self.blocks:
            if block.tap is self:
                block.tap = None
        self._pending.clear()
        self._mask = None

    @property
    def layers(self) -> list[int]:
        return [block.layer_idx for block in self.blocks]

    @property
    def num_experts(self) -> int:
        return self.blocks[0].gate.num_experts if self.blocks else 0

    def expect(self, mask: Optional[torch.Tensor]) -> None:
        """The real tokens [B, S] (bool) of the forwards that follow; None: every position counts."""
        self._mask = mask

    # -- the tap -------------------------------------------------------------------------------------------------
    @torch.compiler.disable  # host-side bookkeeping: a compiled layer calls it eagerly
    def __call__(self, moe: nn.Module, logits: torch.Tensor, idx: torch.Tensor, tokens_shape: torch.Size) -> None:
        if (self.grad_only and not torch.is_grad_enabled()) or _in_backward():
            return
        row, E = self._row[moe.layer_idx], moe.gate.num_experts
        mask = self._mask if self._mask is not None and tuple(self._mask.shape) == tuple(tokens_shape) else None
        flat_mask = mask.reshape(-1).to(logits.device) if mask is not None else None
        keep = self.settings.has_loss and torch.is_grad_enabled()
        probs = moe.gate.probs(logits.float() if keep else logits.detach().float())
        with torch.no_grad():
            counts = expert_counts(idx, E, flat_mask)
            w = flat_mask.to(torch.float32) if flat_mask is not None else None  # per token in fp32, sums in fp64
            p = probs.detach()
            entropy = torch.special.entr(p).sum(-1)
            z = torch.logsumexp(logits.detach().float(), dim=-1).square()
            sums = self._window(len(self.blocks), E, logits.device)
            sums["counts"][row] += counts
            sums["prob_sum"][row] += (p * w[:, None]).sum(0) if w is not None else p.sum(0)
            sums["entropy_sum"][row] += (entropy * w).sum() if w is not None else entropy.sum()
            sums["z_sum"][row] += (z * w).sum() if w is not None else z.sum()
            sums["rows"][row] += w.sum() if w is not None else float(idx.shape[0])
            self._step[row] += counts
        if keep:
            self._pending.append((probs, idx, logits, mask, tuple(tokens_shape)))

    def _window(self, L: int, E: int, device: torch.device) -> dict[str, torch.Tensor]:
        if self._sums is None:
            f64 = dict(dtype=torch.float64, device=device)
            self._sums = {"counts": torch.zeros(L, E, dtype=torch.int64, device=device),
                          "prob_sum": torch.zeros(L, E, **f64), "entropy_sum": torch.zeros(L, **f64),
                          "z_sum": torch.zeros(L, **f64), "rows": torch.zeros(L, **f64)}
            self._step = torch.zeros(L, E, dtype=torch.int64, device=device)
        return self._sums

    # -- the losses ----------------------------------------------------------------------------------------------
    def loss(self, reduce: Optional[Reduce] = None) -> Optional[torch.Tensor]:
        """The weighted balancing and z losses of the forwards since the last call (None when there is nothing to
        add). ``reduce`` sums over the data-parallel ranks (``global_aux``)."""
        pending, self._pending = self._pending, []
        s = self.settings
        if not pending or not s.has_loss:
            return None
        probs, experts, logits, masks, shapes = zip(*pending)
        mask = masks[0]
        flat = mask.reshape(-1) if mask is not None else None
        total = torch.zeros((), device=logits[0].device)
        if s.aux_on:
            E = probs[0].shape[-1]
            if s.load_balancing == "seq_aux":
                shape = shapes[0]
                aux = seq_load_balancing_loss([p.view(*shape, -1) for p in probs],
                                              [e.view(*shape, -1) for e in experts], E, mask)
            else:
                aux = load_balancing_loss(probs, experts, E, flat, reduce if s.load_balancing == "global_aux" else None)
            total = total + s.aux_loss_coef * aux
            self.last_losses["aux_loss"] = aux.detach()
        if s.z_on:
            z = router_z_loss(logits, flat)
            total = total + s.z_loss_coef * z
            self.last_losses["z_loss"] = z.detach()
        return total

    # -- the bias update -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, rate: float, reduce: Optional[Reduce] = None) -> None:
        """``bias += rate * sign(mean load - load_i)`` for each layer's router with a bias, from the token counts
        since the last update (summed over the ranks by ``reduce``), then those counts restart."""
        if self._step is None:
            return
        counts = reduce(self._step.clone()) if reduce is not None else self._step
        for row, block in enumerate(self.blocks):
            bias = block.gate.expert_bias
            if bias is not None:  # a layer that saw no token: sign(0) = 0, no change
                update_expert_bias(bias, counts[row], rate)
        self._step.zero_()

    # -- reading the window --------------------------------------------------------------------------------------
    def packed(self) -> Optional[torch.Tensor]:
        """The window's sums as one fp64 device tensor (to sum over ranks, then copy to the host once), and the
        window restarts. None before any forward."""
        if self._sums is None:
            return None
        s = self._sums
        out = torch.cat([s["counts"].double().flatten(), s["prob_sum"].flatten(), s["entropy_sum"], s["z_sum"],
                         s["rows"]])
        for t in s.values():
            t.zero_()
        return out

    def window_metrics(self, packed: torch.Tensor) -> Optional[dict]:
        """:func:`mtrain.models.balance.load_metrics` of a :meth:`packed` window (host tensor); None if it saw no
        token."""
        L, E = len(self.blocks), self.num_experts
        counts, rest = packed[: L * E].view(L, E), packed[L * E :]
        prob_sum, rest = rest[: L * E].view(L, E), rest[L * E :]
        entropy_sum, z_sum, rows = rest[:L], rest[L : 2 * L], rest[2 * L :]
        if float(rows.sum()) == 0:
            return None
        return load_metrics(counts, prob_sum, entropy_sum, z_sum, rows)
