"""The engines that run in the trainer's process on a copy of the policy: ``fast`` and ``recompute``.

Each holds a model in the rollout profile the RL decision gives (gate precision, dtype) and receives the trainer's
weights after every update (the weight hand-over, :meth:`ModelEngine.update_weights`): each tensor is copied into
the engine's tensor of the same name, in the dtype the *engine's* policy gives it -- an fp32 gate stays fp32 (the bug
class of FastDeploy #7393 / prime-rl #3524 is a gate downcast right here) -- and the gate dtype is checked after every
hand-over. Copies are in place, so CUDA graphs captured over the engine's weights stay valid.

* ``fast`` (:class:`FastEngine`): the static-KV-cache decoder of :mod:`mtrain.models.decoding` (batched prefill,
  CUDA-graph decode steps). ``exact=True`` runs it on the batch-invariant ops, so the trainer's recompute through the
  same path (``scoring = "invariant"``) equals its logprobs and experts bit for bit.
* ``recompute`` (:class:`RecomputeEngine`): the reference, each step the trainer's full forward over the whole buffer
  (:func:`mtrain.models.generate.generate`), equal to the trainer's standard recompute bit for bit; O(length^2).

``inject`` (:class:`MismatchInjection`) makes either a stand-in for a real engine whose numerics differ: seeded
Gaussian noise on its router logits (experts chosen, and weighted, from the noisy logits) and/or on its output logits
(sampling and the reported logprobs). Only the engine is perturbed (and the fast engine then runs without graphs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from mtrain.models import MoECausalLM, PrecisionPolicy, build_model
from mtrain.models.factory import dtype_of
from mtrain.models.decoding import Decoder
from mtrain.models.generate import generate

from .base import Rollout, RolloutEngine, RolloutRequest, register_engine


@dataclass(frozen=True)
class MismatchInjection:
    """Engine stand-in noise: std of the Gaussian added to each router logit / output logit (0 = none), and its
    seed (mixed with each generate call's seed)."""

    router_noise: float = 0.0
    logit_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.router_noise < 0 or self.logit_noise < 0:
            raise ValueError(f"inject_mismatch noise must be >= 0 (router_noise={self.router_noise}, "
                             f"logit_noise={self.logit_noise})")

    @property
    def active(self) -> bool:
        return self.router_noise > 0 or self.logit_noise > 0


class ModelEngine(RolloutEngine):
    """An engine over a model of its own (``copy_of`` a trainer, in ``policy`` and ``dtype``) or over the trainer's
    model itself (``model=``: nothing to hand over)."""

    def __init__(self, *, copy_of: Optional[MoECausalLM] = None, model: Optional[MoECausalLM] = None,
                 policy: Optional[PrecisionPolicy] = None, dtype=None, eos_ids: Sequence[int] = (), pad_id: int = 0,
                 inject: Optional[MismatchInjection] = None):
        if (copy_of is None) == (model is None):
            raise ValueError("an engine needs either copy_of= (a trainer to copy) or model= (a model to share)")
        self.owns = copy_of is not None
        if copy_of is not None:
            dtype = dtype_of(dtype) or copy_of.output_weight.dtype
            model = build_model(copy_of.config, dtype=dtype, device=copy_of.output_weight.device,
                                policy=policy if policy is not None else copy_of.policy, init=False)
            for p in model.parameters():
                p.requires_grad_(False)
        self.model = model
        self.eos_ids, self.pad_id = list(eos_ids), pad_id
        self.syncs = 0
        self.inject = inject if inject is not None and inject.active else None
        self._noise: Optional[torch.Generator] = None
        self._hooks = []
        if self.inject is not None and self.inject.router_noise > 0:
            for i in model.moe_layers:
                self._hooks.append(model.model.layers[i].mlp.gate.register_forward_hook(self._noisy_router))
        if copy_of is not None:
            self.sync(copy_of)

    # -- the engine stand-in's noise ---------------------------------------------------------------------------------
    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self._noise, device=like.device, dtype=like.dtype)

    def _noisy_router(self, gate, args, out):
        """Forward hook of each engine router: choose and weight the experts from noisy logits."""
        logits = out[2] + self.inject.router_noise * self._randn(out[2])
        weights, idx = gate.route(logits)
        return weights, idx, logits, None

    def _noisy_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.inject.logit_noise * self._randn(logits)

    @property
    def logits_hook(self):
        return self._noisy_logits if self.inject is not None and self.inject.logit_noise > 0 else None

    # -- the weight hand-over ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy every named tensor into the engine's tensor of that name (cast to the engine's dtype per tensor; an
        fp32 gate stays fp32, then checked)."""
        if not self.owns:
            return
        mine = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for name, t in named_tensors:
            if name not in mine:
                raise KeyError(f"the engine's model has no tensor {name!r}")
            mine[name].copy_(t.detach())
        self.model.policy.check(self.model)
        self.syncs += 1

    def sync(self, trainer: MoECausalLM) -> None:
        """The hand-over of every parameter and buffer of ``trainer``."""
        self.update_weights(list(trainer.named_parameters()) + list(trainer.named_buffers()))

    def generate(self, request: RolloutRequest) -> Rollout:
        device = self.model.output_weight.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if self.inject is not None:
            self._noise = torch.Generator(device=device).manual_seed(self.inject.seed * 1_000_033 + request.seed)
        gen = self._generate(request)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return Rollout(gen, time.perf_counter() - t0)

    def _generate(self, request: RolloutRequest):
        raise NotImplementedError

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@register_engine("recompute")
class RecomputeEngine(ModelEngine):
    """The reference: each decode step is the trainer's full forward (standard kernels) over the whole buffer."""

    scoring = "standard"
    exact = True

    def _generate(self, request: RolloutRequest):
        s = request.sampling
        gen = generate(self.model, request.prompts, max_new_tokens=s.max_new_tokens, eos_ids=self.eos_ids,
                       pad_id=self.pad_id, temperature=s.temperature, top_p=s.top_p, seed=request.seed,
                       logits_hook=self.logits_hook)
        return gen


@register_engine("fast")
class FastEngine(ModelEngine):
    """Static KV cache, batched prefill, CUDA-graph decode steps (:class:`mtrain.models.decoding.Decoder`).
    ``exact``: on the batch-invariant ops (the trainer's recompute through the same path gives its numbers bit for
    bit); ``graphs``: None = where the decoder can."""

    def __init__(self, *, copy_of: Optional[MoECausalLM] = None, model: Optional[MoECausalLM] = None,
                 policy: Optional[PrecisionPolicy] = None, dtype=None, eos_ids: Sequence[int] = (), pad_id: int = 0,
                 inject: Optional[MismatchInjection] = None, exact: bool = False, graphs: Optional[bool] = None):
        super().__init__(copy_of=copy_of, model=model, policy=policy, dtype=dtype, eos_ids=eos_ids, pad_id=pad_id,
                         inject=inject)
        self.exact = exact
        self.scoring = "invariant" if exact else "standard"
        if len(self.eos_ids) > Decoder.MAX_STOP_IDS:
            raise ValueError(f"the fast engine stops on at most {Decoder.MAX_STOP_IDS} token ids, got "
                             f"{len(self.eos_ids)}: {self.eos_ids}")
        # the stand-in's noise comes from a generator made per request: eager (a graph would replay the first draw)
        self.decoder = Decoder(self.model, exact=exact, graphs=False if self.inject is not None else graphs,
                               logits_hook=self.logits_hook)

    def _generate(self, request: RolloutRequest):
        s = request.sampling
        gen = self.decoder.generate(request.prompts, max_new_tokens=s.max_new_tokens, eos_ids=self.eos_ids,
                                    pad_id=self.pad_id, temperature=s.temperature, top_p=s.top_p, seed=request.seed)
        return gen

    def warmup(self) -> None:
        self.decoder.warmup()

    def describe(self) -> str:
        return f"fast ({'exact, ' if self.exact else ''}{'CUDA graphs' if self.decoder.graphs_on else 'eager'})"

    def close(self) -> None:
        super().close()
        self.decoder.graphs.clear()
