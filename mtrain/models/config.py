"""The architecture config every MoE family extends, with Hugging Face ``config.json`` field names.

Plain dataclasses (no Hydra, no OmegaConf): the Hydra schema reuses each family's subclass as the typed
``model.arch`` node, and ``checkpoint.py`` fills it from ``config.json``. Field names are the HF ones so a user can
copy values across. A family's config lives in its module under ``families/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional


@dataclass
class MoEConfig:
    """Fields both families share. Defaults are a tiny shape that trains on a CPU in seconds."""

    model_type: ClassVar[str] = ""

    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 128  # dense MLP layers
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = 16
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    moe_intermediate_size: int = 32
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: List[int] = field(default_factory=list)
    pad_token_id: Optional[int] = None

    # -- derived -------------------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:  # routed experts
        raise NotImplementedError

    @property
    def rotary_dim(self) -> int:
        return self.head_dim_

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def o_proj_bias(self) -> bool:
        """Whether the attention output projection has a bias (transformers: Qwen3-MoE with ``attention_bias``)."""
        return False

    @property
    def shared_expert_intermediate_size(self) -> int:
        """Intermediate size of the always-active shared expert(s) of an MoE layer (0: none)."""
        return 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; mtrain implements 'silu' (SwiGLU)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_experts}]")

    # -- HF config.json ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "MoEConfig":
        """Build from a ``config.json`` dict: fields at top level or in ``rope_parameters``; unknown keys ignored."""
        hf = dict(hf)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        for key in ("rope_theta", "partial_rotary_factor"):
            if key not in hf and key in rope:
                hf[key] = rope[key]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"rope_type={rope_type!r} is not supported; mtrain implements the default RoPE")
        hf.setdefault("head_dim", None)  # absent: hidden_size / num_attention_heads, as transformers computes it
        cls._normalize_hf(hf)
        eos = hf.get("eos_token_id")
        hf["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in hf.items() if k in names})
        cfg.validate()
        return cfg

    @classmethod
    def _normalize_hf(cls, hf: dict[str, Any]) -> None:
        """Map aliases in ``hf`` (in place) onto this class's field names."""

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers`` (>= 5) loads into the matching ``*ForCausalLM``."""
        d = dataclasses.asdict(self)
        eos = d.pop("eos_token_id")
        d["eos_token_id"] = None if not eos else (eos[0] if len(eos) == 1 else eos)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d["rope_theta"]}
        d["model_type"] = self.model_type
        return d
