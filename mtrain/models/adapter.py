"""Hugging Face checkpoint keys <-> mtrain's in-memory parameter names.

In memory the experts of a layer are fused as in ``transformers`` v5 (``mlp.experts.gate_up_proj [E, 2I, H]``,
``mlp.experts.down_proj [E, H, I]``); checkpoints keep per-expert keys
``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``. Every other key is the in-memory name. A *target* is
where a checkpoint tensor lands: ``(parameter name, expert index or None, "gate"/"up"/"down" or None)``.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Optional

import torch

Target = tuple[str, Optional[int], Optional[str]]


class UnexpectedKey(ValueError):
    """A checkpoint key that maps to no parameter of the model."""


class ExpertKeyAdapter:
    """The per-expert split/fuse adapter both built-in families use. A family with other HF names subclasses it."""

    expert_key = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    layer_key = re.compile(r"^model\.layers\.(\d+)\.")
    fused = ("experts.gate_up_proj", "experts.down_proj")

    # -- reading -------------------------------------------------------------------------------------------------
    def target(self, key: str, num_layers: int, tied: bool, names: Iterable[str], mtp_layers: int = 0
               ) -> Optional[Target]:
        """Where checkpoint ``key`` goes among ``names`` (the model's parameters and buffers); None = not stored
        in the model (the ``mtp_layers`` MTP layers after the decoder layers, RoPE buffers, a tied ``lm_head``).
        A layer beyond those is :class:`UnexpectedKey`: the checkpoint has more layers than its config says."""
        layer = self.layer_key.match(key)
        if layer and num_layers <= int(layer.group(1)) < num_layers + mtp_layers:
            return None  # GLM MTP (next-token-prediction) layers live after the decoder layers
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and tied):
            return None
        m = self.expert_key.match(key)
        if m and m.group(1) + ".gate_up_proj" in names:
            prefix, expert, part = m.groups()
            return prefix + (".down_proj" if part == "down" else ".gate_up_proj"), int(expert), part
        if key in names:
            return key, None, None
        raise UnexpectedKey(key)

    @staticmethod
    def box(shape: tuple[int, ...], expert: Optional[int], part: Optional[str]) -> tuple[tuple[int, int], ...]:
        """The region ``[(lo, hi)]`` per dim of the in-memory tensor (global ``shape``) a target fills."""
        if expert is None:
            return tuple((0, n) for n in shape)
        rows = [(expert, expert + 1)]
        if part == "down":
            return tuple(rows + [(0, n) for n in shape[1:]])
        half = shape[1] // 2
        second = (0, half) if part == "gate" else (half, shape[1])
        return tuple(rows + [second] + [(0, n) for n in shape[2:]])

    def missing(self, named: Iterable[tuple[str, torch.Tensor]], filled: set[Target]) -> list[str]:
        """Checkpoint keys of the model's tensors that no loaded key filled."""
        out = []
        for name, p in named:
            if name.endswith(self.fused):
                parts = ("down",) if name.endswith("down_proj") else ("gate", "up")
                whole = (name, None, None) in filled
                out += [
                    f"{name.rsplit('.', 1)[0]}.{e}.{part}_proj.weight"
                    for e in range(p.shape[0])
                    for part in parts
                    if not whole and (name, e, part) not in filled
                ]
            elif (name, None, None) not in filled:
                out.append(name)
        return out

    # -- writing -------------------------------------------------------------------------------------------------
    def to_hf(self, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF key, tensor) with per-expert keys, in the order of ``named`` (lazily: a sharded model's tensors can
        be gathered one at a time)."""
        for name, t in named:
            if name.endswith("experts.gate_up_proj"):
                prefix, half = name[: -len(".gate_up_proj")], t.shape[1] // 2
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.gate_proj.weight", t[e, :half]
                    yield f"{prefix}.{e}.up_proj.weight", t[e, half:]
            elif name.endswith("experts.down_proj"):
                prefix = name[: -len(".down_proj")]
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.down_proj.weight", t[e]
            else:
                yield name, t
