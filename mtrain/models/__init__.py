"""Native PyTorch MoE language models (no Lightning, no Hydra): shared blocks, one module per family under
``families/`` registered in ``registry``, HF checkpoint I/O, the rollout path, token logprobs and routing traces."""

from . import families  # noqa: F401  (registers every family)
from .checkpoint import from_pretrained, read_config
from .errors import CheckpointError
from .factory import build_model
from .saving import save_pretrained
from .config import MoEConfig
from .families.glm4_moe import Glm4MoeConfig, Glm4MoeForCausalLM
from .families.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from .cache import StaticCache
from .logprobs import gather_logprobs, token_logprobs
from .precision import PrecisionPolicy
from .registry import FAMILIES, ModelFamily, family_of, get_family, register
from .routing import RoutingTrace
from .transformer import MoECausalLM

__all__ = [
    "FAMILIES", "CheckpointError", "Glm4MoeConfig", "Glm4MoeForCausalLM", "MoEConfig", "MoECausalLM",
    "ModelFamily", "PrecisionPolicy", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "RoutingTrace", "StaticCache", "build_model",
    "family_of", "from_pretrained", "gather_logprobs", "get_family", "read_config", "register", "save_pretrained",
    "token_logprobs",
]
