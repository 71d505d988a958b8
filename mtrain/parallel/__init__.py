"""Beyond one GPU. FSDP2 sharding of mtrain models (``fsdp``: why FSDP2 via Lightning's ``ModelParallelStrategy``),
per-rank loading from (sharded) safetensors on a meta-built model (``loading``), streamed HF export (``export``),
launch checks for torchrun / SLURM / ``-m`` (``launch``) and the Lightning glue of ``trainer=fsdp`` (``lightning``).
No Hydra and no tasks here; errors are plain :class:`ParallelError`. Sharded save/resume is Lightning's
(``ModelParallelStrategy`` writes distributed checkpoints), the one resume story of mtrain.
"""

from mtrain._lazy import lazy_exports

_EXPORTS = {
    "ParallelError": "errors",
    "slurm_requeue": "launch",
    "export_hf": "export",
    "gathered": "export",
    "PRECISIONS": "fsdp",
    "apply_fsdp": "fsdp",
    "dp_mesh": "fsdp",
    "fsdp_precision": "fsdp",
    "init_distributed": "fsdp",
    "is_sharded": "fsdp",
    "root_unsharded": "fsdp",
    "LoadStats": "loading",
    "build_sharded": "loading",
    "init_sharded": "loading",
    "load_sharded": "loading",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
