"""``trainer=fsdp`` in Lightning: ``trainer.strategy=fsdp2`` becomes a ``ModelParallelStrategy`` whose
``configure_model`` hook (``MoELitModule.configure_model``) shards the meta-device model with :func:`apply_fsdp` and
fills each rank's shards (:class:`FSDPPlan`).

* The model is built on the meta device before the LightningModule (``mtrain.job.meta_model``: no memory, dtype and
  gate policy as decided for the run), so no rank ever holds the full model.
* ``trainer.precision=bf16-mixed`` is realised by FSDP's ``MixedPrecisionPolicy`` (fp32 master weights, bf16
  all-gather/compute, fp32 reduce), so Lightning gets ``32-true`` (no autocast on top); ``bf16-true`` stays
  (bf16 weights, Lightning's cast keeps an fp32 gate fp32) with an fp32 gradient reduce.
* Checkpoints: ``ModelParallelStrategy(save_distributed_checkpoint=True)`` writes ``last.ckpt`` etc. as DCP folders
  (one file per rank + Lightning's ``meta.pt``); ``task.ckpt_path=<that folder>`` resumes (weights, optimizer,
  scheduler, step), also on another number of GPUs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from mtrain.models import MoECausalLM

from .errors import ParallelError
from .fsdp import apply_fsdp, fsdp_precision, is_sharded
from .launch import STRATEGY, check_launch, num_devices
from .loading import LoadStats, init_sharded, load_sharded

log = logging.getLogger("mtrain")


@dataclass
class FSDPPlan:
    """What ``configure_model`` does to the meta model: shard, allocate the local shards, fill them."""

    param_dtype: Optional[torch.dtype] = None
    reduce_dtype: Optional[torch.dtype] = None
    checkpoint: Optional[str] = None  # HF folder each rank reads its slices from; None = random init with ``seed``
    seed: int = 0
    reshard_after_forward: bool = True
    gate_mismatch: str = "warn"
    compile: bool = False  # torch.compile each decoder layer after sharding (CUDA): FSDP's hooks stay outside it

    def apply(self, model: MoECausalLM, mesh, device: torch.device) -> Optional[LoadStats]:
        """Idempotent: a model that is already sharded is left as is (configure_model runs for fit and validate)."""
        if is_sharded(model):
            return None
        apply_fsdp(
            model, mesh, param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
            moe_gate_fp32=model.policy.moe_gate_fp32, reshard_after_forward=self.reshard_after_forward,
        )
        model.to_empty(device=device)
        if self.checkpoint:
            stats = load_sharded(model, self.checkpoint, gate_mismatch=self.gate_mismatch)
            log.info("rank shards filled from %s: read %.1f of %.1f MB", self.checkpoint, stats.bytes_read / 2**20,
                     stats.bytes_total / 2**20)
            self._compile(model, device)
            return stats
        init_sharded(model, self.seed)
        self._compile(model, device)
        return None

    def _compile(self, model: MoECausalLM, device: torch.device) -> None:
        # torch._dynamo skips FSDP2's hooks (skip_fsdp_hooks): the all-gathers run eagerly around each compiled layer
        if self.compile and device.type == "cuda":
            model.compile_layers()
            log.info("trainer=fsdp: decoder layers compiled after sharding (task.compile)")


def plan_for(precision: str, checkpoint: Optional[str] = None, seed: int = 0,
             reshard_after_forward: bool = True) -> FSDPPlan:
    """The :class:`FSDPPlan` of a run: ``trainer.precision`` -> the FSDP mixed-precision policy; the HF folder each
    rank reads its shards from (None = random init with ``seed``); ``trainer.fsdp_reshard_after_forward``."""
    try:
        _, param_dtype, reduce_dtype = fsdp_precision(precision)
    except ValueError as e:
        raise ParallelError(str(e)) from None
    return FSDPPlan(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                    checkpoint=str(checkpoint) if checkpoint else None, seed=int(seed),
                    reshard_after_forward=bool(reshard_after_forward))


def trainer_kwargs(kw: dict[str, Any], *, multirun: bool) -> dict[str, Any]:
    """Turn ``cfg.trainer`` kwargs into ``lightning.Trainer`` kwargs: refuse a multi-process job Lightning would
    launch by re-running ``sys.argv`` under ``-m``; for ``strategy=fsdp2`` a ``ModelParallelStrategy`` (pure FSDP:
    data-parallel size = all processes) and the Lightning precision that leaves mixed precision to FSDP."""
    kw = dict(kw)
    kw.pop("fsdp_reshard_after_forward", None)  # mtrain's FSDPPlan reads it (plan_for), not Lightning
    check_launch(kw.get("devices", 1), kw.get("num_nodes", 1), multirun=multirun, accelerator=str(kw.get("accelerator")))
    if kw.get("strategy") != STRATEGY:
        return kw
    from lightning.pytorch.strategies import ModelParallelStrategy

    world = num_devices(kw.get("devices", 1), str(kw.get("accelerator"))) * int(kw.get("num_nodes", 1))
    kw["strategy"] = ModelParallelStrategy(
        data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True
    )
    precision = str(kw.get("precision"))
    try:
        fsdp_precision(precision)
    except ValueError as e:
        raise ParallelError(str(e)) from None
    if precision == "bf16-mixed":
        kw["precision"] = "32-true"  # FSDP's MixedPrecisionPolicy casts; no autocast on top
    return kw

