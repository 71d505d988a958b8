"""Build a sharded model on the meta device and fill each rank's shard straight from the (sharded) safetensors.

``build_sharded``: the model is built on ``meta`` (no memory), sharded with :func:`apply_fsdp`, ``to_empty`` allocates
only the local shards, then either :func:`load_sharded` reads each rank's rows from the checkpoint or
:func:`init_sharded` reproduces ``MoECausalLM.init_weights`` shard by shard.

``load_sharded`` reads, per parameter, the region the local DTensor shard covers (``compute_local_shape_and_global_offset``
of its placements: FSDP2 shards dim 0) with ``safe_open(...).get_slice(key)[...]``, so a rank reads only its rows.
The fused experts map dim-0 rows to per-expert keys: a rank that owns experts ``a..b`` of ``gate_up_proj [E, 2I, H]``
reads ``experts.{e}.gate_proj.weight`` into rows ``[:I]`` and ``up_proj`` into rows ``[I:]`` of expert ``e`` for
``e`` in ``a..b`` only, and never opens the other experts' tensors. Nothing larger than one rank's slice of one
tensor is ever materialised. Key mapping, completeness and gate-policy checks are those of
``mtrain.models.checkpoint`` and ``mtrain.models.gate_check`` (shared code, same error messages).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mtrain.models import MoECausalLM, PrecisionPolicy, build_model, family_of
from mtrain.models.checkpoint import (
    CheckpointError,
    check_complete,
    checkpoint_dtype,
    gate_names,
    map_key,
    read_config,
    shard_files,
    tensors_of,
)
from mtrain.models.factory import dtype_of
from mtrain.models.gate_check import check_gate
from mtrain.models.config import MoEConfig

from .fsdp import apply_fsdp

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass
class LoadStats:
    """What one rank read: tensor bytes actually read (its slices) and the checkpoint's total tensor bytes."""

    bytes_read: int = 0
    bytes_total: int = 0
    tensors_read: int = 0


def local_region(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor to write into, its global offset, its shape) of a DTensor shard; a plain tensor is all of it."""
    if isinstance(t, DTensor):
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        local = t.to_local()
        assert tuple(local.shape) == tuple(shape), (tuple(local.shape), shape)
        return local, tuple(offset), tuple(shape)
    return t.data, (0,) * t.dim(), tuple(t.shape)


def _intersect(box, offset, shape):
    """Intersection of ``box`` with the local region; None if empty. Returns (src slices in checkpoint-tensor coords
    (relative to the box), dst slices in local coords)."""
    src, dst = [], []
    for (lo, hi), o, n in zip(box, offset, shape):
        a, b = max(lo, o), min(hi, o + n)
        if a >= b:
            return None
        src.append(slice(a - lo, b - lo))
        dst.append(slice(a - o, b - o))
    return src, dst


@torch.no_grad()
def load_sharded(
    model: MoECausalLM,
    path: str | os.PathLike,
    *,
    gate_mismatch: str = "warn",
) -> LoadStats:
    """Fill ``model`` (sharded or not, materialised) from an HF checkpoint folder, each rank reading only the slices
    its local shards cover. Returns what this rank read."""
    folder = Path(path)
    files = shard_files(folder)
    params = tensors_of(model)
    gates = gate_names(model)
    adapter = family_of(model).adapter
    regions = {name: local_region(t) for name, t in params.items()}
    filled: set = set()
    gate_dtypes: set[torch.dtype] = set()
    stats = LoadStats()
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    target = map_key(model, key, params, file)
                    sl = f.get_slice(key)
                    shape = tuple(sl.get_shape())
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    numel = 1
                    for n in shape:
                        numel *= n
                    stats.bytes_total += numel * (dtype.itemsize if dtype else 0)
                    if target is None:
                        continue
                    name, expert, part = target
                    filled.add(target)
                    if name in gates and dtype is not None:
                        gate_dtypes.add(dtype)
                    full_shape = tuple(params[name].shape)
                    box = adapter.box(full_shape, expert, part)
                    sizes = tuple(hi - lo for lo, hi in box)
                    want = sizes[1:] if expert is not None else sizes  # an expert's key has no expert dim
                    if shape != want:
                        raise CheckpointError(
                            f"{file.name}: {key} has shape {shape} but config.json implies {want}; "
                            f"the weights and config.json disagree"
                        )
                    local, offset, local_shape = regions[name]
                    hit = _intersect(box, offset, local_shape)
                    if hit is None:
                        continue  # another rank's rows: not read
                    src, dst = hit
                    if expert is not None:
                        src = src[1:]  # the checkpoint tensor has no expert dim
                    piece = sl[tuple(src)] if src else sl[:]
                    stats.bytes_read += piece.numel() * piece.element_size()
                    stats.tensors_read += 1
                    local[tuple(dst)].copy_(piece)
        except SafetensorError as e:
            raise CheckpointError(f"{file} is corrupt or truncated ({e}); re-download or re-export it") from None
    check_complete(model, filled, folder)
    check_gate(folder, gate_dtypes, model.policy.moe_gate_fp32, gate_mismatch)
    return stats


@torch.no_grad()
def init_sharded(model: MoECausalLM, seed: int | None = 0) -> None:
    """Random init of a sharded model, identical to ``MoECausalLM.init_weights(seed)`` on an unsharded model on the
    same device: parameters are generated one at a time in full with the same generator sequence, and each rank
    keeps its slice (one parameter, never the model, is materialised at a time)."""
    std = model.config.initializer_range
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        local, offset, shape = local_region(p)
        if name.endswith("norm.weight"):
            local.fill_(1.0)
        elif name.endswith(".bias"):
            local.zero_()
        else:  # the rule of MoECausalLM.init_weights, drawn in full so every world size gets the same weights
            if seed is not None and local.device not in gens:
                gens[local.device] = torch.Generator(device=local.device).manual_seed(seed)
            full = torch.empty(p.shape, dtype=p.dtype, device=local.device)
            full.normal_(0.0, std, generator=gens.get(local.device))
            local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
            del full
    model.init_buffers()


def build_sharded(
    cfg: MoEConfig | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    mesh=None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    policy: PrecisionPolicy = PrecisionPolicy(),
    seed: int | None = 0,
    gate_mismatch: str = "warn",
    expected_model_type: str | None = None,
    reshard_after_forward: bool = True,
) -> tuple[MoECausalLM, LoadStats | None]:
    """Meta build -> :func:`apply_fsdp` -> ``to_empty(device)`` -> load ``checkpoint`` (each rank its slices) or
    random init. ``cfg`` defaults to the checkpoint's ``config.json``; ``dtype`` (stored dtype) to the checkpoint's
    dtype, else float32. Returns (model, this rank's load stats or None)."""
    if checkpoint is not None:
        ck_cfg = read_config(checkpoint, expected_model_type)
        cfg = cfg or ck_cfg
        dtype = dtype_of(dtype) or checkpoint_dtype(Path(checkpoint)) or torch.float32
    elif cfg is None:
        raise ValueError("build_sharded: give cfg or checkpoint")
    dtype = dtype_of(dtype) or torch.float32
    model = build_model(cfg, dtype=dtype, device="meta", policy=policy, init=False)
    apply_fsdp(model, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
               reshard_after_forward=reshard_after_forward)
    model.to_empty(device=device)
    if checkpoint is not None:
        return model, load_sharded(model, checkpoint, gate_mismatch=gate_mismatch)
    init_sharded(model, seed)
    return model, None
