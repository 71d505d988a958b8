"""``task=export``: write an HF checkpoint for a rollout engine with the gate in the dtype the RL decision asks for
(fp32 under ``rl=on`` / ``FD_ENABLE_RL=1``, else the model dtype) and ``mtrain_precision.json`` recording the policy.
Loading it back under another policy warns (or refuses, ``gate_mismatch="error"``) -- see ``mtrain.models.checkpoint``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mtrain.config import ConfigError, job_dir, prepare_run
from mtrain.models import CheckpointError
from mtrain.models.checkpoint import read_precision_record
from mtrain.tasks.common import model_from_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    cfg, plan = prepare_run(cfg)
    unknown = set(cfg.task) - {"name", "path", "max_shard_size"}
    if unknown:
        raise ConfigError(f"task (export): unknown keys {sorted(unknown)}; known: name, path, max_shard_size")
    dest = Path(cfg.task.path) if cfg.task.path else job_dir() / "hf_model"
    model = model_from_config(cfg.model, seed=cfg.seed)
    tokenizer = Path(cfg.model.checkpoint) / "tokenizer.json" if cfg.model.checkpoint else None
    try:
        model.save_pretrained(
            dest, max_shard_size=cfg.task.max_shard_size,
            tokenizer_file=tokenizer if tokenizer is not None and tokenizer.is_file() else None,
        )
    except CheckpointError as e:
        raise ConfigError(f"task.path: {e}") from None
    record = read_precision_record(dest)
    print(f"exported {model.config.model_type} to {dest} (gate {record['gate_dtype']}, {plan.summary()})")
    return {"path": str(dest), "gate_dtype": record["gate_dtype"], "moe_gate_fp32": record["moe_gate_fp32"],
            "rope_fp32": record["rope_fp32"], "dtype": record["dtype"]}
