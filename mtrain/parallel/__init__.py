"""Beyond one GPU. FSDP2 sharding of mtrain models (``fsdp``: why FSDP2 via Lightning's ``ModelParallelStrategy``),
per-rank loading from (sharded) safetensors on a meta-built model (``loading``), streamed HF export (``export``),
distributed checkpoints for the plain loop (``dcp``), a plain training loop (``loop``), launch checks for torchrun /
SLURM / ``-m`` (``launch``) and the Lightning glue of ``trainer=fsdp`` (``lightning``). No Hydra in ``fsdp``,
``loading``, ``export``, ``dcp`` and ``loop``: they work on any ``MoECausalLM`` under ``torchrun``."""

from .export import export_hf, gathered
from .fsdp import PRECISIONS, apply_fsdp, dp_mesh, fsdp_precision, init_distributed, is_sharded, root_unsharded
from .loading import LoadStats, build_sharded, init_sharded, load_sharded

__all__ = [
    "LoadStats",
    "PRECISIONS",
    "apply_fsdp",
    "build_sharded",
    "dp_mesh",
    "export_hf",
    "fsdp_precision",
    "gathered",
    "init_distributed",
    "init_sharded",
    "is_sharded",
    "load_sharded",
    "root_unsharded",
]
