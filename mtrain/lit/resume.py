"""Check a ``task.ckpt_path`` before Lightning resumes from it: one clear line instead of a traceback.

A Lightning ``.ckpt`` file is opened memory-mapped with ``weights_only=True`` (nothing is read in full and no pickle
runs), then its ``state_dict`` keys and shapes are compared with the module's; the tasks then resume with
``trainer.fit(..., weights_only=True)`` (explicit, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off). A
folder is a distributed checkpoint (``trainer=fsdp``), only that strategy may resume from one, and only when its
signed manifest (:mod:`mtrain.lit.manifest`) shows an mtrain job of this user wrote it, unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch

from mtrain.lit.manifest import verify_manifest
from mtrain.models.errors import CheckpointError
from mtrain.parallel.launch import resume_request


AUTO = "auto"


def resume_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """``task.ckpt_path`` as a path: ``auto`` is ``<run dir>/checkpoints/last.ckpt`` when it exists (a requeued or
    re-run job continues where it stopped) and a fresh start otherwise. A requeued SLURM job
    (``SLURM_RESTART_COUNT`` > 0) without a ``task.ckpt_path`` resumes as with ``auto``."""
    ckpt_path = resume_request(ckpt_path)
    if ckpt_path != AUTO:
        return ckpt_path
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


def check_resume(path: str | Path, module: L.LightningModule, sharded: bool = False) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the fix unless it is a checkpoint of this module."""
    p = Path(path).expanduser()
    fix = "Fix: point task.ckpt_path at <run dir>/checkpoints/last.ckpt of a run of this model"
    if not p.exists():
        raise CheckpointError(f"task.ckpt_path={p}: no such file. {fix}")
    if p.is_dir():
        if sharded and (p / ".metadata").is_file():
            verify_manifest(p)  # before Lightning/DCP unpickle anything in it
            return
        what = "a distributed checkpoint folder, which only trainer=fsdp resumes" if (p / ".metadata").is_file() \
            else "a folder, not a checkpoint file"
        raise CheckpointError(f"task.ckpt_path={p} is {what}. {fix}")
    if sharded:
        raise CheckpointError(f"task.ckpt_path={p} is a single-file checkpoint; trainer=fsdp resumes the "
                              f"distributed checkpoint folder it wrote. {fix}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (truncated zip, not a torch file, a pickle weights_only refuses, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"task.ckpt_path={p} is not a readable Lightning checkpoint ({first[:160]}). "
                              f"{fix}") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "global_step" not in ckpt:
        raise CheckpointError(f"task.ckpt_path={p} is a torch file but not a Lightning checkpoint (no state_dict / "
                              f"global_step). {fix}")
    mine = module.state_dict()
    missing = sorted(set(mine) - set(state))
    if missing:
        raise CheckpointError(f"task.ckpt_path={p} lacks {len(missing)} of this model's tensors (e.g. "
                              f"{missing[0]}): it belongs to another model. {fix}")
    for name, t in mine.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(f"task.ckpt_path={p}: {name} has shape {tuple(state[name].shape)}, this model "
                                  f"{tuple(t.shape)}: it belongs to another model size. {fix}")
