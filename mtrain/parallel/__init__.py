"""Beyond one GPU. FSDP2 sharding of mtrain models (``fsdp``: why FSDP2 via Lightning's ``ModelParallelStrategy``),
per-rank loading from (sharded) safetensors on a meta-built model (``loading``), streamed HF export (``export``),
launch checks for torchrun / SLURM / ``-m`` (``launch``) and the Lightning glue of ``trainer=fsdp`` (``lightning``).
No Hydra and no tasks here; errors are plain :class:`ParallelError`. Sharded save/resume is Lightning's
(``ModelParallelStrategy`` writes distributed checkpoints), the one resume story of mtrain."""

from .errors import ParallelError
from .export import export_hf, gathered
from .fsdp import PRECISIONS, apply_fsdp, dp_mesh, fsdp_precision, init_distributed, is_sharded, root_unsharded
from .loading import LoadStats, build_sharded, init_sharded, load_sharded

__all__ = [
    "LoadStats",
    "PRECISIONS",
    "ParallelError",
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
