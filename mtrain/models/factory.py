"""The model factory: a model of a registered family, allocated directly on its device in its dtype, with the gate
and RoPE precision of its policy; and the dtype names a config uses."""

from __future__ import annotations

import torch

from .config import MoEConfig
from .precision import PrecisionPolicy
from .registry import get_family
from .transformer import MoECausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def build_model(
    cfg: MoEConfig,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    policy: PrecisionPolicy = PrecisionPolicy(),
    seed: int | None = 0,
    init: bool = True,
) -> MoECausalLM:
    """A model of ``cfg``'s family, allocated directly on ``device`` in ``dtype`` (the gate and RoPE per ``policy``).
    ``device="meta"`` allocates nothing (FSDP fills each rank's shards later)."""
    with torch.device("meta"):
        model = get_family(cfg.model_type).model(cfg, policy)
    model = model.to(dtype=dtype_of(dtype)).to_empty(device=device)
    if init:
        model.init_weights(seed)
    return model
