"""The one registry of model families. Checkpoint I/O, the Hydra schemas, FLOPs, the Lightning module and FSDP all
read a family from here; nothing outside a family's own module names its parameters.

A family is one module in ``mtrain/models/families/`` (found automatically) that defines its config dataclass, its
model class and calls :func:`register`. Adding one: that module, ``conf/model/<name>.yaml`` and a parity test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .adapter import ExpertKeyAdapter

if TYPE_CHECKING:  # typing only: the model classes import this module's users, not the other way round
    from .config import MoEConfig
    from .transformer import MoECausalLM

@dataclass(frozen=True)
class ModelFamily:
    """Everything mtrain needs to know about one architecture.

    ``name``: the HF ``model_type`` (also the Hydra option ``model=<name>``). ``adapter``: HF checkpoint keys <->
    in-memory names (per-expert split/fuse). ``no_decay``: extra name fragments AdamW must not decay (every vector,
    bias and norm is already exempt). The tensors kept fp32 under the gate policy come from the family's routers
    (``MoECausalLM.fp32_names``) and its FLOPs from its config (``MoEConfig.active_params_per_token``).
    """

    name: str
    config: type["MoEConfig"]
    model: type["MoECausalLM"]
    adapter: ExpertKeyAdapter = field(default_factory=ExpertKeyAdapter)
    no_decay: tuple[str, ...] = ()

    def no_decay_param(self, name: str, ndim: int) -> bool:
        """Whether AdamW must leave this parameter undecayed: vectors (norms, biases) and the family's extras."""
        return ndim < 2 or name.endswith(".bias") or "norm" in name or any(f in name for f in self.no_decay)

FAMILIES: dict[str, ModelFamily] = {}

def register(family: ModelFamily) -> ModelFamily:
    """Add (or replace) a family; returns it. Its config class must carry ``model_type == family.name``."""
    if family.config.model_type != family.name or family.model.config_class is not family.config:
        raise ValueError(f"family {family.name!r}: config.model_type and model.config_class must match the family")
    FAMILIES[family.name] = family
    return family

def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"model family {name!r} is not registered; known: {', '.join(sorted(FAMILIES))}") from None

def family_of(obj: "MoECausalLM | MoEConfig") -> ModelFamily:
    cfg = getattr(obj, "config", obj)
    return get_family(cfg.model_type)
