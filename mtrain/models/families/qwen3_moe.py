"""Qwen3-MoE: softmax top-k router, q/k RMSNorm per head, full RoPE, MoE every ``decoder_sparse_step`` layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List

from torch import nn

from ..config import MoEConfig
from ..layers import SwiGLU
from ..moe import Experts, MoE, SoftmaxTopKRouter
from ..registry import ModelFamily, register
from ..transformer import MoECausalLM


@dataclass
class Qwen3MoeConfig(MoEConfig):
    model_type: ClassVar[str] = "qwen3_moe"
    architectures: ClassVar[list[str]] = ["Qwen3MoeForCausalLM"]

    num_experts: int = 8  # type: ignore[assignment]  # HF: num_experts or num_local_experts
    decoder_sparse_step: int = 1
    mlp_only_layers: List[int] = field(default_factory=list)
    norm_topk_prob: bool = True
    use_sliding_window: bool = False

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias  # transformers' Qwen3MoeAttention: o_proj too (GLM's has none)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def validate(self) -> None:
        super().validate()
        if self.use_sliding_window:
            raise ValueError("use_sliding_window=true is not supported by mtrain's Qwen3-MoE")

    @classmethod
    def _normalize_hf(cls, hf: dict[str, Any]) -> None:
        if "num_experts" not in hf and "num_local_experts" in hf:
            hf["num_experts"] = hf["num_local_experts"]
        hf.setdefault("norm_topk_prob", False)  # transformers' Qwen3MoeConfig default (mtrain's own configs: True)
        if hf.get("mlp_only_layers") is None:
            hf["mlp_only_layers"] = []

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        d["architectures"] = list(self.architectures)
        return d


class Qwen3MoeForCausalLM(MoECausalLM):
    config_class = Qwen3MoeConfig
    config: Qwen3MoeConfig

    def qk_norm(self) -> bool:
        return True

    def make_mlp(self, layer_idx: int) -> nn.Module:
        c = self.config
        if not c.is_moe_layer(layer_idx):
            return SwiGLU(c.hidden_size, c.intermediate_size)
        gate = SoftmaxTopKRouter(
            c.hidden_size, c.num_experts, c.num_experts_per_tok, self.policy.moe_gate_fp32,
            norm_topk_prob=c.norm_topk_prob
        )
        return MoE(gate, Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size))


FAMILY = register(ModelFamily("qwen3_moe", Qwen3MoeConfig, Qwen3MoeForCausalLM))
