"""Sharded save/resume with ``torch.distributed.checkpoint`` (DCP) for the plain training loop.

Each rank writes its own shards of the model and optimizer state (DTensors) into one folder; loading re-shards, so a
checkpoint saved on N ranks resumes on M. Lightning's ``ModelParallelStrategy`` writes the same kind of folder
(``trainer.save_checkpoint`` / ``ModelCheckpoint``) and resumes from it with ``trainer.fit(ckpt_path=...)``; this
module is the same thing without Lightning, for the loop in :mod:`mtrain.parallel.loop` and the benchmark.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

META_FILE = "mtrain_meta.json"


def save_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **meta) -> Path:
    """Write model + optimizer shards of every rank to ``path`` (call on all ranks); ``meta`` (JSON) from rank 0."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return path


def load_sharded_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a :func:`save_sharded` folder into an (identically sharded or re-sharded) model and its optimizer, in
    place; returns the saved ``meta``."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a distributed checkpoint (no .metadata); give a folder save_sharded wrote")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = path / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}
