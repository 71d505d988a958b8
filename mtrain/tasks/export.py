"""``task=export``: write an HF checkpoint for a rollout engine with the gate in the dtype the RL decision asks for
(fp32 under ``rl=on`` / ``FD_ENABLE_RL=1``, else the model dtype) and ``mtrain_precision.json`` recording the policy.
Loading it back under another policy warns (or refuses, ``gate_mismatch="error"``) -- see ``mtrain.models.gate_check``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mtrain.config import ConfigError
from mtrain.disk import reporting_full_disk
from mtrain.job import Job, export_bytes, model_from_config
from mtrain.job.outputs import copy_tokenizer_side_files
from mtrain.models import CheckpointError, save_pretrained
from mtrain.models.checkpoint import checkpoint_dtype
from mtrain.models.gate_check import read_precision_record

log = logging.getLogger(__name__)


def run(job: Job) -> dict:
    cfg, plan = job.cfg, job.plan
    dest = Path(cfg.task.path) if cfg.task.path else job.dir / "hf_model"
    model = model_from_config(cfg.model, plan.policy, seed=cfg.seed)
    stored = checkpoint_dtype(Path(cfg.model.checkpoint)) if cfg.model.checkpoint else None
    written = model.output_weight.dtype
    if stored is not None and stored.itemsize < written.itemsize:
        log.warning("exporting a %s checkpoint as %s (model.dtype, which follows trainer.precision unless set) "
                    "makes it %dx larger; model.dtype=%s keeps its dtype", str(stored).removeprefix("torch."),
                    str(written).removeprefix("torch."), written.itemsize // stored.itemsize,
                    str(stored).removeprefix("torch."))
    tokenizer = Path(cfg.model.checkpoint) / "tokenizer.json" if cfg.model.checkpoint else None
    try:
        with reporting_full_disk(dest, lambda: export_bytes(model), "export"):
            save_pretrained(
                model, dest, max_shard_size=cfg.task.max_shard_size,
                tokenizer_file=tokenizer if tokenizer is not None and tokenizer.is_file() else None,
                extra=(lambda folder: copy_tokenizer_side_files(tokenizer.parent, folder)) if tokenizer else None,
            )
    except CheckpointError as e:
        raise ConfigError(f"task.path: {e}") from None
    record = read_precision_record(dest)
    print(f"exported {model.config.model_type} to {dest} (gate {record['gate_dtype']}, {plan.summary()})")
    return {"path": str(dest), "gate_dtype": record["gate_dtype"], "moe_gate_fp32": record["moe_gate_fp32"],
            "rope_fp32": record["rope_fp32"], "dtype": record["dtype"]}
