"""``file``: an external engine's rollouts (SGLang, vLLM, FastDeploy, ...) read from a JSONL file
(:mod:`mtrain.data.rollouts`), ``prompts_per_step x group_size`` lines a step. It samples nothing and takes no
weights: RL step ``s`` gets the file's ``s``-th block of lines, with their rewards and text fields."""

from __future__ import annotations

from typing import Sequence

from mtrain.data.rollouts import RolloutRow, generation_of

from .base import Rollout, RolloutEngine, RolloutRequest, register_engine


@register_engine("file")
class FileEngine(RolloutEngine):
    scoring = "standard"
    exact = False

    def __init__(self, *, rows: Sequence[RolloutRow], per_step: int, max_new_tokens: int, temperature: float = 1.0,
                 pad_id: int = 0, device="cpu", scoring: str = "standard"):
        self.rows, self.per_step = list(rows), per_step
        self.scoring = scoring  # mtrain's exact engine wrote the file: recompute through its path
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.pad_id, self.device = pad_id, device

    def generate(self, request: RolloutRequest) -> Rollout:
        rows = self.rows[request.step * self.per_step : (request.step + 1) * self.per_step]
        gen = generation_of(rows, self.max_new_tokens, self.pad_id, self.device, self.temperature)
        rewards = [r.reward for r in rows]
        return Rollout(gen, 0.0, [r.example for r in rows], None if None in rewards else rewards)

    def describe(self) -> str:
        return f"file ({len(self.rows)} responses, logprobs at T={self.temperature:g})"
