"""Hugging Face checkpoints <-> mtrain models, both directions.

Reading: ``config.json`` + single-file or sharded safetensors, streamed tensor by tensor into a model built on the
meta device (no second full copy in memory). Per-expert keys ``...mlp.experts.E.{gate,up,down}_proj.weight`` (and the
fused v5 in-memory names) are copied into the fused expert tensors; GLM's MTP layers are skipped.

Writing: per-expert keys, shards above ``max_shard_size``, ``config.json`` that ``transformers`` loads, and
``mtrain_precision.json`` recording the gate dtype the run used. Loading a checkpoint whose gate dtype or recorded
policy does not match the requested ``moe_gate_fp32`` says so (or refuses, with ``gate_mismatch="error"``).
"""

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter import UnexpectedKey
from .config import MoEConfig
from .precision import PrecisionPolicy
from .registry import FAMILIES, family_of, get_family
from .transformer import MoECausalLM

log = logging.getLogger(__name__)

PRECISION_FILE = "mtrain_precision.json"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder that mtrain cannot load or write; the message names the file and the fix."""


def dtype_of(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    name = str(name).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def build_model(
    cfg: MoEConfig,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    policy: PrecisionPolicy = PrecisionPolicy(),
    seed: int | None = 0,
    init: bool = True,
) -> MoECausalLM:
    """A model of ``cfg``'s family, allocated directly on ``device`` in ``dtype`` (the gate and RoPE per ``policy``).
    ``device="meta"`` allocates nothing (FSDP fills each rank's shards later)."""
    with torch.device("meta"):
        model = get_family(cfg.model_type).model(cfg, policy)
    model = model.to(dtype=dtype_of(dtype)).to_empty(device=device)
    if init:
        model.init_weights(seed)
    return model


def read_config(path: str | os.PathLike, expected_model_type: str | None = None) -> MoEConfig:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; pass a folder with config.json and *.safetensors")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing; an HF checkpoint folder needs config.json next to its safetensors")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); re-export the checkpoint") from None
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{cfg_file}: model_type={model_type!r} is not supported; mtrain loads {sorted(FAMILIES)}")
    if expected_model_type is not None and model_type != expected_model_type:
        raise CheckpointError(
            f"{cfg_file}: model_type={model_type!r} does not match the chosen model={expected_model_type}; "
            f"use model={model_type} for this checkpoint"
        )
    try:
        return FAMILIES[model_type].config.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def checkpoint_dtype(folder: Path) -> torch.dtype | None:
    hf = json.loads((folder / "config.json").read_text())
    name = hf.get("dtype") or hf.get("torch_dtype")
    return _DTYPES.get(str(name)) if name else None


def shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is malformed ({e!r}); it needs a 'weight_map' of key -> shard file") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f} is listed in {index.name} but missing; copy the complete checkpoint")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors or {INDEX_FILE} in {folder}; mtrain reads safetensors only")


def read_precision_record(path: str | os.PathLike) -> dict | None:
    f = Path(path) / PRECISION_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    policy: PrecisionPolicy = PrecisionPolicy(),
    expected_model_type: str | None = None,
    gate_mismatch: str = "warn",
) -> MoECausalLM:
    """Load an HF checkpoint folder of a registered family. ``dtype=None`` keeps the checkpoint's dtype.

    ``gate_mismatch``: what to do when the stored gate dtype or the recorded export policy differs from
    ``policy.gate_fp32`` -- ``"warn"`` (default) or ``"error"``.
    """
    folder = Path(path)
    cfg = read_config(folder, expected_model_type)
    files = shard_files(folder)
    dtype = dtype_of(dtype) or checkpoint_dtype(folder) or torch.float32
    model = build_model(cfg, dtype=dtype, device=device, policy=policy, init=False)
    params = tensors_of(model)
    gates = gate_names(model)
    filled: set = set()
    gate_dtypes: set[torch.dtype] = set()
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    target = map_key(model, key, params, file)
                    if target is None:
                        continue
                    name, expert, part = target
                    tensor = f.get_tensor(key)
                    if name in gates:
                        gate_dtypes.add(tensor.dtype)
                    _copy_into(model, params[name], target, tensor, key, file)
                    filled.add(target)
        except SafetensorError as e:
            raise CheckpointError(f"{file} is corrupt or truncated ({e}); re-download or re-export it") from None
    check_complete(model, filled, folder)
    check_gate(folder, gate_dtypes, policy.gate_fp32, gate_mismatch)
    return model


def tensors_of(model: MoECausalLM) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


def gate_names(model: MoECausalLM) -> set[str]:
    """In-memory names of the router gate weights (whose stored dtype the precision check reads)."""
    return {f"{prefix}.weight" for prefix, _ in model.routers()}


def map_key(model: MoECausalLM, key: str, params: dict, file: Path):
    """Where checkpoint ``key`` lands in ``model`` (the family adapter's target), None = skipped."""
    cfg = model.config
    try:
        return family_of(model).adapter.target(key, cfg.num_hidden_layers, cfg.tie_word_embeddings, params)
    except UnexpectedKey:
        raise CheckpointError(
            f"{file.name}: unexpected key {key!r} for a {cfg.model_type} with {cfg.num_hidden_layers} layers; "
            f"the checkpoint does not match its config.json"
        ) from None


def _copy_into(model: MoECausalLM, param: torch.Tensor, target, tensor: torch.Tensor, key: str, file: Path):
    name, expert, part = target
    box = family_of(model).adapter.box(tuple(param.shape), expert, part)
    dest = param.data[tuple(slice(lo, hi) for lo, hi in box)]
    if expert is not None:
        dest = dest[0]
    if tuple(tensor.shape) != tuple(dest.shape):
        raise CheckpointError(
            f"{file.name}: {key} has shape {tuple(tensor.shape)} but config.json implies {tuple(dest.shape)}; "
            f"the weights and config.json disagree"
        )
    dest.copy_(tensor)


def check_complete(model: MoECausalLM, filled: set, folder: Path) -> None:
    missing = family_of(model).adapter.missing(tensors_of(model).items(), filled)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{folder}: missing keys {missing[:3]}{more}; the checkpoint is incomplete")


def check_gate(folder: Path, gate_dtypes: set, moe_gate_fp32: bool, gate_mismatch: str) -> None:
    """Compare the gate's stored dtype and the checkpoint's precision record (``mtrain_precision.json``, if mtrain
    wrote it) with the policy it is loaded under. Upcasting a bf16-stored gate of a published checkpoint to fp32 is
    what the rollout engine does under ``FD_ENABLE_RL=1``: an info line, not a warning. A warning (or, with
    ``gate_mismatch="error"``, a refusal) when the record disagrees with the policy, or records an fp32 gate that is
    not stored in fp32 (a gate downcast on export)."""
    want = "float32" if moe_gate_fp32 else "the model dtype"
    stored = {str(d).removeprefix("torch.") for d in gate_dtypes}
    record = read_precision_record(folder)
    problems = []
    if record is not None and bool(record.get("moe_gate_fp32")) != moe_gate_fp32:
        problems.append(
            f"it was exported with moe_gate_fp32={str(record.get('moe_gate_fp32')).lower()} "
            f"but is loaded with moe_gate_fp32={str(moe_gate_fp32).lower()} (gate in {want})"
        )
    elif record is not None and record.get("moe_gate_fp32") and stored - {"float32"}:
        problems.append(f"its record says moe_gate_fp32=true but the gate weights are stored as "
                        f"{'/'.join(sorted(stored))}: the export downcast the gate")
    elif moe_gate_fp32 and stored - {"float32"}:
        log.info("gate weights of %s stored as %s are upcast to float32 (moe_gate_fp32=true), as the rollout engine "
                 "does under FD_ENABLE_RL=1", folder, "/".join(sorted(stored)))
    if not problems:
        return
    msg = (
        f"gate precision mismatch for checkpoint {folder}: {'; '.join(problems)}. Trainer and rollout will route "
        f"differently; load with the policy it was exported with (rl=on / moe_gate_fp32) or re-export it."
    )
    if gate_mismatch == "error":
        raise CheckpointError(msg)
    log.warning(msg)


# -- writing ---------------------------------------------------------------------------------------------------------
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
        hf = model.config.to_hf() | {"dtype": str(dtype).removeprefix("torch."), "transformers_version": "5.0.0"}
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
