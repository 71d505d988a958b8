"""mtrain models -> Hugging Face checkpoint folders: per-expert keys (through the family's adapter), shards above
``max_shard_size``, a ``config.json`` that ``transformers`` loads, and ``mtrain_precision.json`` recording the gate
dtype the run used; written into a temporary folder that takes the final name only when complete."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, tensors_of
from .errors import CheckpointError
from .factory import dtype_of
from .gate_check import PRECISION_FILE
from .registry import family_of
from .transformer import MoECausalLM

log = logging.getLogger(__name__)


def hf_tensors(model: MoECausalLM, named=None):
    """Yield (HF key, tensor) in model order through the family's adapter. ``named``: (name, tensor) pairs to write
    instead of the model's own parameters and buffers (e.g. a sharded model's, gathered one at a time)."""
    return family_of(model).adapter.to_hf(tensors_of(model).items() if named is None else named)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use bytes or e.g. '5GB', '500MB'")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def save_pretrained(
    model: MoECausalLM,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    tensors=None,
    dtype: torch.dtype | str | None = None,
    extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write an HF checkpoint folder. The gate is written in the dtype the model holds it in (fp32 under
    ``moe_gate_fp32``); ``mtrain_precision.json`` records the policy. Refuses to replace an existing checkpoint
    unless ``overwrite``; writes into a temporary folder first so a failure leaves nothing half-written.

    ``tensors``: an iterable of (HF key, tensor) to write instead of the model's own (default ``hf_tensors(model)``),
    consumed lazily -- one shard is held in memory at a time (``mtrain.parallel.export_hf`` streams a sharded
    model's parameters through it). ``dtype``: write floating tensors in this dtype (e.g. bf16 from fp32 master
    weights), except what the precision policy keeps fp32 (the gate under ``moe_gate_fp32``, GLM's bias).
    ``extra(folder)``: writes more files (a tokenizer) into the folder before it is published, so a kill at any
    point leaves either the old folder or the complete new one."""
    dest = Path(path)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise CheckpointError(f"{dest} already exists and is not empty; choose another folder or pass overwrite=True")
    limit = _parse_size(max_shard_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shard_keys: list[list[str]] = []  # shards are written as soon as they fill up: one shard in memory
        current: dict[str, torch.Tensor] = {}
        size = total_size = 0

        def flush():
            save_file(current, tmp / f"shard-{len(shard_keys)}.tmp", metadata={"format": "pt"})
            shard_keys.append(list(current))
            current.clear()

        dtype = dtype_of(dtype)
        fp32 = fp32_keys(model)
        for key, t in hf_tensors(model) if tensors is None else tensors:
            if dtype is not None and t.is_floating_point() and key not in fp32:
                t = t.to(dtype)
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > limit:
                flush()
                size = 0
            current[key] = t.detach().to("cpu", copy=True).contiguous()
            size += nbytes
            total_size += nbytes
        flush()
        weight_map = {}
        for i, keys in enumerate(shard_keys):
            name = _shard_name(i, len(shard_keys))
            (tmp / f"shard-{i}.tmp").rename(tmp / name)
            weight_map |= {k: name for k in keys}
        if len(shard_keys) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        gate = model.gate_dtype()
        if dtype is None:
            dtype = next(p for n, p in model.named_parameters() if "embed_tokens" in n).dtype
        elif gate is not None and not model.moe_gate_fp32:
            gate = dtype
        name = str(dtype).removeprefix("torch.")
        # both dtype keys: transformers < 4.56 and the engines built on it read torch_dtype
        hf = model.config.to_hf() | {"dtype": name, "torch_dtype": name, "transformers_version": "5.0.0"}
        if hf.get("num_nextn_predict_layers"):  # mtrain neither trains nor writes the MTP layers
            log.warning("the export holds no MTP (next-token-prediction) layers: its config.json says "
                        "num_nextn_predict_layers=0 (the source checkpoint had %d; MTP speculative decoding needs "
                        "them)", hf["num_nextn_predict_layers"])
            hf["num_nextn_predict_layers"] = 0
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        record = {
            "moe_gate_fp32": model.moe_gate_fp32,
            "rope_fp32": model.rope_fp32,
            "gate_dtype": str(gate).removeprefix("torch.") if gate else None,
            "dtype": hf["dtype"],
        }
        (tmp / PRECISION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        if extra is not None:
            extra(tmp)
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():  # swap: the old folder moves aside, the complete new one takes its name, the old goes
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def fp32_keys(model: MoECausalLM) -> set[str]:
    """HF keys of the tensors the precision policy stores in fp32 whatever the model dtype."""
    fp32 = model.fp32_names()
    return {key for key, _ in family_of(model).adapter.to_hf((n, t) for n, t in tensors_of(model).items() if n in fp32)}


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
