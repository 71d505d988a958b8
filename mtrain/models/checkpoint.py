"""Hugging Face checkpoints -> mtrain models: ``config.json`` + single-file or sharded safetensors, streamed tensor by
tensor into a model built on the meta device (no second full copy in memory). Per-expert keys
``...mlp.experts.E.{gate,up,down}_proj.weight`` (and the fused v5 in-memory names) are copied into the fused expert
tensors; GLM's MTP layers are skipped. A checkpoint whose gate dtype or recorded policy does not match the requested
``moe_gate_fp32`` gets a warning (or a refusal, with ``gate_mismatch="error"``): :mod:`.gate_check`.

The other direction, mtrain models -> HF folders, is :mod:`.saving`; the model factory (``build_model``,
``dtype_of``) is :mod:`.factory`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .adapter import UnexpectedKey
from .config import MoEConfig
from .errors import CheckpointError
from .factory import DTYPES, build_model, dtype_of
from .gate_check import check_gate
from .precision import PrecisionPolicy
from .registry import FAMILIES, family_of
from .transformer import MoECausalLM

INDEX_FILE = "model.safetensors.index.json"
__all__ = ["CheckpointError", "check_complete", "checkpoint_dtype", "from_pretrained", "gate_names", "map_key",
           "read_config", "shard_files", "tensors_of"]


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
    quant = hf.get("quantization_config")
    if quant:  # fp8 weights would be upcast as they are, without their scales
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise CheckpointError(f"{cfg_file}: a quantized checkpoint (quant_method={method}); mtrain trains the bf16 "
                              "release of the model: point model.checkpoint at it")
    try:
        return FAMILIES[model_type].config.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def checkpoint_dtype(folder: Path) -> torch.dtype | None:
    hf = json.loads((folder / "config.json").read_text())
    name = hf.get("dtype") or hf.get("torch_dtype")
    return DTYPES.get(str(name)) if name else None


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
    ``policy.moe_gate_fp32`` -- ``"warn"`` (default) or ``"error"``.
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
    check_gate(folder, gate_dtypes, policy.moe_gate_fp32, gate_mismatch)
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
        return family_of(model).adapter.target(key, cfg.num_hidden_layers, cfg.tie_word_embeddings, params,
                                               getattr(cfg, "num_nextn_predict_layers", 0))
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
