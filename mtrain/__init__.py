"""mtrain: a Hydra-configured PyTorch/Lightning trainer for MoE LLMs (GLM4-MoE, Qwen3-MoE).

Importing mtrain registers its OmegaConf resolvers and Hydra schemas (idempotently), so they exist in every
process that imports it: the CLI, joblib/submitit workers and Lightning subprocesses.
"""

__version__ = "0.1.0"

from mtrain import config as _config  # noqa: E402,F401  (registers resolvers + schemas)
