"""The precision policy of a run, as one object the model, FSDP, export and the matmul backends read.

The *decision* (which values, from which source: an override, ``rl=on|off``, ``FD_ENABLE_RL``) is made once in
``mtrain.config.decide_precision``; this is what it decides, in a form the lower layers can apply without knowing
about Hydra:

* ``moe_gate_fp32`` (``moe_gate_fp32``): router gate weights stored in fp32 and the router computed in fp32
  (:class:`mtrain.models.moe.Router`); FSDP gives each gate its own fp32 unit; export writes the gate in fp32.
* ``rope_fp32``: the rotary rotation runs in fp32 (:class:`mtrain.models.layers.RotaryEmbedding`).
* TF32 off on CUDA when the gate is fp32 (:meth:`apply_backends`): an fp32 gate GEMM must be real fp32.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

log = logging.getLogger("mtrain")


@dataclass(frozen=True)
class PrecisionPolicy:
    moe_gate_fp32: bool = False
    rope_fp32: bool = False

    @property
    def allow_tf32(self) -> bool:
        return not self.moe_gate_fp32

    def apply_backends(self, cuda: bool) -> None:
        """Set the process-wide matmul backends this policy needs (TF32 off for an fp32 gate on CUDA)."""
        if not (cuda and self.moe_gate_fp32):
            return
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        warnings.filterwarnings("ignore", message=r".*TensorFloat32 tensor cores for float32 matrix multiplication.*")
        log.info("moe_gate_fp32: TF32 disabled so the fp32 gate GEMM runs in full fp32")

    def check(self, model: torch.nn.Module) -> None:
        """Raise if ``model``'s router gates are not in the dtype this policy asks for (e.g. after a cast that did
        not go through ``Router._apply``)."""
        gate = model.gate_dtype()
        if self.moe_gate_fp32 and gate not in (None, torch.float32):
            raise RuntimeError(f"moe_gate_fp32 is on but the router gate is {gate}; it must stay float32")

    def describe(self) -> str:
        gate = "fp32" if self.moe_gate_fp32 else "model dtype"
        return f"gate {gate}, rope {'fp32' if self.rope_fp32 else 'model dtype'}"
