"""Native PyTorch GLM4-MoE and Qwen3-MoE (no Lightning, no Hydra)."""

from .checkpoint import CheckpointError, build_model, from_pretrained, read_config, save_pretrained
from .config import CONFIGS, Glm4MoeConfig, MoEConfig, Qwen3MoeConfig
from .glm4_moe import Glm4MoeForCausalLM
from .layers import KVCache
from .qwen3_moe import Qwen3MoeForCausalLM
from .transformer import MoECausalLM

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "Glm4MoeConfig",
    "Glm4MoeForCausalLM",
    "KVCache",
    "MoEConfig",
    "MoECausalLM",
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
    "build_model",
    "from_pretrained",
    "read_config",
    "save_pretrained",
]
