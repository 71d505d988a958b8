"""GLM4-MoE (GLM-4.5 / 4.5-Air): sigmoid group-limited router with a score-correction bias and routed scaling,
shared experts, the first ``first_k_dense_replace`` layers dense, partial RoPE, optional q/k norm, qkv bias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import MoEConfig
from ..layers import SwiGLU
from ..moe import Experts, MoE, SigmoidGroupRouter
from ..registry import ModelFamily, register
from ..transformer import MoECausalLM


@dataclass
class Glm4MoeConfig(MoEConfig):
    model_type: ClassVar[str] = "glm4_moe"
    architectures: ClassVar[list[str]] = ["Glm4MoeForCausalLM"]

    rms_norm_eps: float = 1e-5
    n_routed_experts: int = 8  # HF alias: num_local_experts
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    partial_rotary_factor: float = 0.5
    num_nextn_predict_layers: int = 0  # MTP layers stored after the decoder layers; skipped on load

    @property
    def num_experts(self) -> int:  # type: ignore[override]
        return self.n_routed_experts

    @property
    def shared_expert_intermediate_size(self) -> int:  # type: ignore[override]
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim_ * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def validate(self) -> None:
        super().validate()
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} is not a multiple of n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.rotary_dim % 2:
            raise ValueError(f"head_dim * partial_rotary_factor = {self.rotary_dim} must be even")

    @classmethod
    def _normalize_hf(cls, hf: dict[str, Any]) -> None:
        if "n_routed_experts" not in hf and "num_local_experts" in hf:
            hf["n_routed_experts"] = hf["num_local_experts"]
        if "num_nextn_predict_layers" not in hf and "num_mtp_layers" in hf:
            hf["num_nextn_predict_layers"] = hf["num_mtp_layers"]

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        d["architectures"] = list(self.architectures)
        d["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
        return d


class Glm4MoeForCausalLM(MoECausalLM):
    config_class = Glm4MoeConfig
    config: Glm4MoeConfig

    def qk_norm(self) -> bool:
        return self.config.use_qk_norm

    def make_mlp(self, layer_idx: int) -> nn.Module:
        c = self.config
        if not c.is_moe_layer(layer_idx):
            return SwiGLU(c.hidden_size, c.intermediate_size)
        gate = SigmoidGroupRouter(
            c.hidden_size,
            c.n_routed_experts,
            c.num_experts_per_tok,
            self.policy.moe_gate_fp32,
            n_group=c.n_group,
            topk_group=c.topk_group,
            norm_topk_prob=c.norm_topk_prob,
            scaling=c.routed_scaling_factor,
        )
        shared = SwiGLU(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else None
        return MoE(gate, Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size), shared)


FAMILY = register(ModelFamily("glm4_moe", Glm4MoeConfig, Glm4MoeForCausalLM))
