"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for mtrain models, and the device mesh it shards over.

Why FSDP2 through Lightning's ``ModelParallelStrategy`` rather than ``FSDPStrategy`` (FSDP1,
``FullyShardedDataParallel``):

* **Per-parameter DTensor sharding.** FSDP2 shards every parameter on dim 0 as a ``DTensor`` and keeps its name and
  global shape; FSDP1 flattens a unit's parameters into one ``FlatParameter``. Dim-0 sharding of the fused experts
  ``[E, 2I, H]`` means "this rank owns experts a..b", so a rank can read exactly its rows from the per-expert HF keys
  (``loading.py``), and the state dict, the HF key mapping and hooks on ``model.model.layers[i].mlp.gate`` see the
  same names as without sharding (no wrapper module, no ``_fsdp_wrapped_module.`` prefixes).
* **Per-module mixed precision.** ``MixedPrecisionPolicy`` is given per ``fully_shard`` call, so the router gate gets
  its own unit with ``param_dtype=float32`` inside a layer whose unit casts to bf16. FSDP also requires one original
  dtype per unit: under ``bf16-true`` with ``moe_gate_fp32`` the fp32 gate *must* be its own unit. FSDP1's
  ``FlatParameter`` has one dtype per unit and one ``MixedPrecision`` per wrap, with ``use_orig_params`` caveats.
* **Meta-device init.** ``fully_shard`` on a model built on the meta device, ``to_empty``, then fill each rank's
  local shard -- the documented FSDP2 recipe (torchtitan). FSDP1 needs ``param_init_fn``/``sync_module_states``
  (rank 0 holds and broadcasts the full model).
* **Distributed checkpoints.** Sharded state dicts are DTensors: ``torch.distributed.checkpoint`` writes each rank's
  shard and re-shards on load (also to another world size). ``ModelParallelStrategy`` saves exactly that.
* FSDP1 is deprecated in PyTorch; ``FSDPStrategy`` is Lightning's FSDP1 strategy.

Cost: ``ModelParallelStrategy`` needs ``configure_model`` in the LightningModule (``mtrain.lit`` calls
:func:`apply_fsdp` there) and is marked experimental in Lightning.

Units, inner first (``fully_shard`` must be called bottom-up):

1. ``layer.mlp.gate`` of each MoE layer, only when the gate is fp32 (``moe_gate_fp32``): ``param_dtype=float32``,
   ``reduce_dtype=float32``. FSDP's bf16 parameter cast never touches it; the router computes its logits in fp32.
2. each decoder layer: the run's policy (``param_dtype=bf16`` under ``bf16-mixed``: fp32 master weights, bf16
   all-gather and compute, fp32 gradient reduce).
3. the root (the ``MoECausalLM``): ``embed_tokens``, the final norm and ``lm_head``. They stay in the root because
   :meth:`MoECausalLM.loss` reads ``output_weight`` directly (and tied embeddings share it); ``loss`` is registered
   as an FSDP forward method so the root's parameters are gathered for it.

``cast_forward_inputs=False`` everywhere: FSDP would otherwise cast the fp32 RoPE ``cos``/``sin`` that each layer
receives to bf16 (the RoPE precision policy decides that, not FSDP), and the activations are already in the
parameter dtype because the embedding output is.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from mtrain.models import MoECausalLM

# Lightning precision -> (stored dtype of the model, FSDP param_dtype, FSDP reduce_dtype)
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None, torch.dtype | None]] = {
    "32-true": (torch.float32, None, None),
    "32": (torch.float32, None, None),
    "bf16-mixed": (torch.float32, torch.bfloat16, torch.float32),
    "bf16-true": (torch.bfloat16, None, torch.float32),
}


def fsdp_precision(precision: str) -> tuple[torch.dtype, torch.dtype | None, torch.dtype | None]:
    """(stored dtype, param_dtype, reduce_dtype) for a Lightning ``trainer.precision`` string under FSDP.

    ``bf16-mixed`` is realised by FSDP's ``MixedPrecisionPolicy`` (fp32 master weights sharded, bf16 all-gather and
    compute, fp32 gradient reduce-scatter), not by autocast; ``bf16-true`` keeps bf16 weights (fp32 gradient reduce).
    """
    try:
        return PRECISIONS[str(precision)]
    except KeyError:
        raise ValueError(
            f"trainer.precision={precision!r} is not supported with FSDP; use one of {', '.join(PRECISIONS)}"
        ) from None


def apply_fsdp(
    model: MoECausalLM,
    mesh: DeviceMesh | None = None,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    moe_gate_fp32: bool | None = None,
    reshard_after_forward: bool = True,
) -> MoECausalLM:
    """Shard ``model`` in place with FSDP2 over ``mesh`` (1-D data-parallel mesh; None = the default group).

    ``param_dtype``/``reduce_dtype``: the ``MixedPrecisionPolicy`` of the decoder layers and the root (None = keep
    the stored dtype). ``moe_gate_fp32`` (default: the model's precision policy): each MoE router gate becomes its own
    unit that gathers and computes in fp32. Works on a meta-device model (then ``to_empty`` + load/init, see
    :func:`mtrain.parallel.build_sharded`) or on a materialised one. Returns ``model``.
    """
    if isinstance(model, FSDPModule):
        raise ValueError("apply_fsdp: the model is already sharded")
    moe_gate_fp32 = model.policy.moe_gate_fp32 if moe_gate_fp32 is None else moe_gate_fp32
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    gate_mp = MixedPrecisionPolicy(
        param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again right away by backward: keep them gathered
        reshard = reshard_after_forward and i < len(layers) - 1
        if moe_gate_fp32 and layer.is_moe:
            fully_shard(layer.mlp.gate, mesh=mesh, mp_policy=gate_mp, reshard_after_forward=reshard)
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(model, "loss")
    return model


@contextmanager
def root_unsharded(model: MoECausalLM) -> Iterator[MoECausalLM]:
    """Gather the root unit's parameters (embeddings, final norm, ``lm_head``) for code that reads them outside the
    FSDP forward methods -- ``generate`` and per-token logprobs call ``hidden_states`` and ``output_weight``
    directly. Decoder layers still gather one at a time in their own forward. No-op for an unsharded model. All
    ranks must run the same code inside (each layer's forward is a collective)."""
    if not isinstance(model, FSDPModule):
        yield model
        return
    # FSDP decides which unit is the root at the first forward; it must be the model, not a layer called on its own
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def dp_mesh(device_type: str | None = None) -> DeviceMesh:
    """A 1-D data-parallel mesh over all ranks of the initialised default process group."""
    if not dist.is_initialized():
        raise RuntimeError("dp_mesh: torch.distributed is not initialised (run under torchrun, or use init_distributed)")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("data_parallel",))


def init_distributed() -> torch.device:
    """Initialise the default process group from torchrun's environment (NCCL on GPUs, gloo on CPU) and return this
    rank's device. Idempotent."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device
