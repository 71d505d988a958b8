"""The embedded rollout engine: a copy of the policy in the rollout profile the RL decision gives, fed the trainer's
weights after every update (the weight hand-over), generating groups of responses.

* ``rl=on``: the engine holds the gate in fp32 and decodes with the trainer's computation (``decode="recompute"``:
  each step is the trainer's full forward over the fixed-width buffer), so its logprobs and expert choices equal the
  trainer's recompute bit for bit. It costs a full forward per generated token.
* ``rl=off``: KV-cache decoding with the gate in the model dtype, as inference engines run by default.

``inject`` (:class:`MismatchInjection`) makes the engine a stand-in for a real one whose numerics differ: seeded
Gaussian noise on its router logits (experts chosen, and weighted, from the noisy logits) and/or on its output logits
(sampling and the reported logprobs). Only the engine is perturbed; the trainer never sees the noise.

The hand-over copies each trainer tensor into the engine's tensor of the same name, in the dtype the *engine's*
policy gives it: an fp32 gate stays fp32 (the bug class of FastDeploy #7393 / prime-rl #3524 is a gate downcast right
here), and :meth:`sync` checks it after every copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from mtrain.models import MoECausalLM, PrecisionPolicy, build_model
from mtrain.models.checkpoint import dtype_of
from mtrain.models.generate import Generation, generate

DECODES = ("kv", "recompute")


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


@dataclass
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


class RolloutEngine:
    """``engine = RolloutEngine.like(policy_model, policy, dtype, decode)``; ``engine.sync(policy_model)`` after each
    update; ``engine.generate(prompts, sampling, seed)``."""

    def __init__(self, model: MoECausalLM, decode: str, *, eos_ids: Sequence[int] = (), pad_id: int = 0,
                 inject: MismatchInjection | None = None):
        if decode not in DECODES:
            raise ValueError(f"rollout decode={decode!r}: use one of {', '.join(DECODES)}")
        self.model, self.decode = model.eval(), decode
        self.eos_ids, self.pad_id = list(eos_ids), pad_id
        self.syncs = 0
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.inject = inject if inject is not None and inject.active else None
        self._noise: torch.Generator | None = None
        if self.inject is not None and self.inject.router_noise > 0:
            for i in model.moe_layers:
                model.model.layers[i].mlp.gate.register_forward_hook(self._noisy_router)

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self._noise, device=like.device, dtype=like.dtype)

    def _noisy_router(self, gate, args, out):
        """Forward hook of each engine router: choose and weight the experts from noisy logits."""
        logits = out[2] + self.inject.router_noise * self._randn(out[2])
        weights, idx = gate.route(logits)
        return weights, idx, logits, None

    def _noisy_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.inject.logit_noise * self._randn(logits)

    @classmethod
    def like(cls, trainer: MoECausalLM, policy: PrecisionPolicy, dtype: str | torch.dtype | None, decode: str,
             **kw) -> "RolloutEngine":
        """An engine model of the trainer's architecture under ``policy`` in ``dtype`` (None = the trainer's), on
        the trainer's device, holding the trainer's weights."""
        dtype = dtype_of(dtype) or trainer.output_weight.dtype
        model = build_model(trainer.config, dtype=dtype, device=trainer.output_weight.device, policy=policy, init=False)
        engine = cls(model, decode, **kw)
        engine.sync(trainer)
        return engine

    @torch.no_grad()
    def sync(self, trainer: MoECausalLM) -> None:
        """The weight hand-over: copy every trainer tensor into the engine (cast to the engine's dtype per tensor)."""
        mine = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for name, t in list(trainer.named_parameters()) + list(trainer.named_buffers()):
            mine[name].copy_(t.detach())
        self.model.policy.check(self.model)
        self.syncs += 1

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int) -> tuple[Generation, float]:
        """Sample one response per prompt (repeat a prompt for a group). Returns the generation and its seconds."""
        device = self.model.output_weight.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        hook = None
        if self.inject is not None:
            self._noise = torch.Generator(device=device).manual_seed(self.inject.seed * 1_000_033 + seed)
            hook = self._noisy_logits if self.inject.logit_noise > 0 else None
        gen = generate(
            self.model, prompts, max_new_tokens=sampling.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
            temperature=sampling.temperature, top_p=sampling.top_p, seed=seed, decode=self.decode, logits_hook=hook,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return gen, time.perf_counter() - t0
