"""Streamed Hugging Face export of a sharded model: one parameter gathered at a time, only rank 0 writes.

Every rank walks the parameters in model order and calls ``DTensor.full_tensor()`` on each (a collective: all ranks
take part); rank 0 hands the gathered tensors, split into per-expert HF keys by the family's adapter, to
``save_pretrained(tensors=...)``, which copies each to the CPU and writes a safetensors shard as soon as it reaches
``max_shard_size``. Peak memory: one full parameter on each rank's device plus one shard in rank 0's CPU memory --
never the whole model. The folder is the same as ``save_pretrained`` of the unsharded model writes (config.json,
mtrain_precision.json, index), and loads with ``mtrain.models.from_pretrained`` or ``transformers``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mtrain.models import MoECausalLM
from mtrain.models.errors import CheckpointError
from mtrain.models.saving import hf_tensors, save_pretrained


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gathered(model: MoECausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter and buffer in model order, each gathered just before it is yielded.
    All ranks must iterate it to the end, in step (``full_tensor`` is a collective)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        with torch.no_grad():
            yield name, (t.full_tensor() if isinstance(t, DTensor) else t.detach())


def _broadcast_error(msg: str | None) -> str | None:
    if not (dist.is_available() and dist.is_initialized()):
        return msg
    box = [msg]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def export_hf(
    model: MoECausalLM,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    tokenizer_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path | None:
    """Write ``model`` (FSDP-sharded or not) as an HF checkpoint folder at ``path``; call on every rank.

    ``dtype``: write the weights in this dtype (e.g. bf16 from fp32 master weights); the gate stays fp32 under
    ``moe_gate_fp32`` and what else the family's routers keep fp32 stays fp32 (``MoECausalLM.fp32_names``). Returns the path on rank 0, None elsewhere.
    """
    dest = Path(path)
    rank = _rank()
    problem = None
    if rank == 0 and dest.exists() and any(dest.iterdir()) and not overwrite:
        problem = f"{dest} already exists and is not empty; choose another folder or pass overwrite=True"
    problem = _broadcast_error(problem)  # decide before the collectives start, so no rank is left waiting
    if problem:
        raise CheckpointError(problem)
    tensors = hf_tensors(model, gathered(model))
    if rank != 0:
        for _ in tensors:  # take part in every gather; only rank 0 keeps anything
            pass
        out = None
    else:
        out = save_pretrained(
            model, dest, max_shard_size=max_shard_size, tokenizer_file=tokenizer_file, overwrite=overwrite,
            tensors=tensors, dtype=dtype, extra=extra,
        )
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out
