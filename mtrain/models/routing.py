"""Routing as a model API: a :class:`RoutingTrace` handed to a forward records or replays each MoE layer's experts.

* ``record``: every MoE layer stores its top-k expert ids ``[B, S, k]`` (and, with ``logits=True``, its router
  logits ``[B, S, E]`` in fp32) under its layer index.
* ``replay``: every MoE layer uses the given expert ids instead of choosing its own (a token whose ids are -1, e.g.
  a position the rollout never routed, chooses its own); the routing *weights* are
  recomputed from the live router scores at those ids (softmax/sigmoid of the full logits, gathered, normalised as
  the family does), so the router keeps its gradient. This is R3 (replay the rollout engine's choice) and R2
  (replay the trainer's own choice across several updates).

A replay trace also records, per layer, the experts the router would have chosen on its own (``own``): the
disagreement an R3 replay hides, measured at no extra forward.

Entries are keyed by layer index and written by assignment, so the recompute of an activation-checkpointed layer
records the same values again and replays the same ids (the trace is an argument of the checkpointed call).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

MODES = ("record", "replay")


class RoutingTrace:
    def __init__(self, mode: str = "record", ids: Optional[Dict[int, torch.Tensor]] = None, *, logits: bool = False):
        if mode not in MODES:
            raise ValueError(f"RoutingTrace mode={mode!r}: use one of {', '.join(MODES)}")
        if mode == "replay" and not ids:
            raise ValueError("RoutingTrace(mode='replay') needs the expert ids to replay: {layer index: [B, S, k]}")
        self.mode = mode
        self.ids: Dict[int, torch.Tensor] = dict(ids or {})
        self.record_logits = logits
        self.logits: Dict[int, torch.Tensor] = {}
        self.own: Dict[int, torch.Tensor] = {}  # replay: the router's own top-k per layer

    @classmethod
    def replay(cls, ids: Dict[int, torch.Tensor] | "RoutingTrace") -> "RoutingTrace":
        """A replay trace of ``ids`` (a dict, or another trace's recorded ids)."""
        return cls("replay", ids.ids if isinstance(ids, RoutingTrace) else ids)

    # -- what an MoE layer calls ---------------------------------------------------------------------------------
    def forced(self, layer: int, tokens_shape: torch.Size) -> Optional[torch.Tensor]:
        """The ids layer ``layer`` must use, flattened to ``[T, k]`` (replay), or None (record: choose freely)."""
        if self.mode != "replay":
            return None
        if layer not in self.ids:
            raise KeyError(f"routing replay has no expert ids for MoE layer {layer}; recorded: {sorted(self.ids)}")
        ids = self.ids[layer]
        if tuple(ids.shape[:-1]) != tuple(tokens_shape):
            raise ValueError(f"routing replay ids of layer {layer} have shape {tuple(ids.shape)}, "
                             f"the forward has tokens {tuple(tokens_shape)}")
        return ids.reshape(-1, ids.shape[-1]).contiguous()

    def record(self, layer: int, idx: torch.Tensor, logits: Optional[torch.Tensor], tokens_shape: torch.Size,
               own: Optional[torch.Tensor] = None) -> None:
        """Store layer ``layer``'s experts (record) or, replaying, the experts it would have chosen (``own``)."""
        if self.mode == "record":
            self.ids[layer] = idx.detach().view(*tokens_shape, -1)
            if self.record_logits and logits is not None:
                self.logits[layer] = logits.detach().float().view(*tokens_shape, -1)
        elif own is not None:
            self.own[layer] = own.detach().view(*tokens_shape, -1)

    # -- reading ---------------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self.ids)

    def stacked(self, own: bool = False) -> torch.Tensor:
        """Expert ids of every layer stacked on dim 2: ``[B, S, moe_layers, k]`` (layer order): those the forward
        used, or (``own``, replay only) those the routers would have chosen."""
        src = self.own if own else self.ids
        return torch.stack([src[i] for i in self.layers], dim=2)
