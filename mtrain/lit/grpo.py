"""``GRPOModule``: group-relative policy optimisation of an mtrain model as a LightningModule (manual optimisation).

One Lightning training step is one RL step: sample a group of responses per prompt with the embedded rollout engine,
score them, compute advantages, recompute the old policy with the trainer, run ``ppo_epochs`` x ``num_minibatches``
optimizer steps, hand the new weights to the engine. Lightning's ``global_step`` counts optimizer steps; the RL step
is ``global_step // updates_per_step``, and everything a step draws (its prompts, its sampling seed, its mini-batch
order) is a function of that number, so a resumed run continues exactly where it stopped.

Logged every RL step (CSV/TensorBoard, ``step`` = RL step): reward mean/std, accuracy, fraction of zero-std groups,
response length mean/max, entropy, clip fraction, approx KL to the old policy, grad norm, learning rate, rollout and
train tokens/s, seconds of each phase, the train/rollout mismatch of the batch (|dlogp| mean/max, k3, routing
disagreement of the trained tokens and of the routers' own choice) and the correction's stats (IS weights, masked and
truncated fractions, ESS).

The rollouts come from a rollout engine (:mod:`mtrain.rl.engines`: the fast engine, the recompute reference, or an
external engine's rollout file); the trainer's old-logprob recompute uses the path the engine names
(``engine.scoring``), so an exact engine is compared with its own numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from mtrain.data.rollouts import header_line, rollout_lines
from mtrain.lit.module import on_host
from mtrain.lit.optim import OptimSettings, adamw_with_schedule
from mtrain.models import MoECausalLM
from mtrain.models.generate import recompute
from mtrain.rl.grpo import (
    LossSettings, MismatchSettings, StepBatch, advantages_of, correct, minibatch_loss, minibatches, mismatch_stats,
    old_policy,
)
from mtrain.rl.engines import RolloutEngine, RolloutRequest, SamplingConfig

# (prompts, responses, examples) -> rewards; and the exact-match flags of the same responses
Scorer = Callable[[Sequence[str], Sequence[str], Sequence[dict]], tuple[list[float], list[Optional[bool]]]]


@dataclass(frozen=True)
class GRPOSettings:
    """What one RL step does. Built from the task's config by field name (``mtrain.job.settings.settings_from``:
    ``task.<field>``, the nested settings from the same node), so it has no defaults of its own: the schema
    (``mtrain.schema.GRPOTaskConfig``) is their one home."""

    prompts_per_step: int
    group_size: int
    sampling: SamplingConfig
    loss: LossSettings
    mismatch: MismatchSettings
    optim: OptimSettings
    ppo_epochs: int
    num_minibatches: int
    advantage: str  # a registered advantage estimator (mtrain.rl.advantages)
    norm_adv_by_std: bool
    advantage_args: Mapping[str, Any]  # its own options
    grad_clip: Optional[float]  # trainer.gradient_clip_val
    seed: int
    eval_every: int
    rollouts_every: int
    rollouts_keep: int = 4  # sample rows per step written to rollouts.jsonl (not a config setting)

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.num_minibatches


class _Steps(IterableDataset):
    """An endless stream of step tokens: a step's work is derived from the global step, not from the loader."""

    def __iter__(self):
        while True:
            yield 0


class GRPOModule(L.LightningModule):
    def __init__(
        self,
        model: MoECausalLM,
        engine: RolloutEngine,
        prompts: list[list[int]],
        examples: list[dict],
        decode: Callable[[list[int]], str],
        scorer: Scorer,
        settings: GRPOSettings,
        *,
        ref_model: Optional[MoECausalLM] = None,
        evaluate: Optional[Callable[[MoECausalLM], float]] = None,
        rollouts_file: Optional[Path] = None,
        dump_file: Optional[Path] = None,
        pad_id: int = 0,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.engine, self.ref_model = model, engine, ref_model
        self.prompts, self.examples, self.decode, self.scorer = prompts, examples, decode, scorer
        self.s = settings
        self.evaluate = evaluate
        self.rollouts_file = rollouts_file
        self.dump_file = dump_file  # every step's batch written to a rollout file
        self.pad_id = pad_id
        # set by RoutingHealth: tells the router statistics which positions of the next forward are real tokens
        self.expect_tokens: Optional[Callable[[torch.Tensor], None]] = None
        self.history: list[dict] = []  # one dict of metrics per RL step (a resumed run's from its checkpoint too)
        self.evals: list[tuple[int, float]] = []  # (RL step, held-out accuracy)
        self.seconds = {"rollout": 0.0, "old_logprobs": 0.0, "update": 0.0, "eval": 0.0}
        self.eval_seconds: list[float] = []
        if ref_model is not None:
            for p in ref_model.parameters():
                p.requires_grad_(False)

    # -- Lightning plumbing --------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(), batch_size=None)

    def configure_optimizers(self):
        s = self.s  # task.warmup_steps counts RL steps; the schedule counts optimizer steps
        return adamw_with_schedule(self.model, s.optim, s.optim.warmup_steps * s.updates_per_step,
                                   max(1, self.trainer.max_steps))

    @property
    def rl_step(self) -> int:
        return self.global_step // self.s.updates_per_step

    def on_train_start(self) -> None:
        self.model.policy.check(self.model)
        self._hand_over()  # a resumed run's weights reach the engine before its first rollout
        if self.evaluate is not None and not self.evals:  # a resumed run has its evals, the one before RL first
            self._evaluate()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the run's per-step metrics and held-out evals: a resumed run reports the whole run (accuracy before RL,
        # means over every step), not only its own part. Plain numbers: a checkpoint loads with weights_only.
        checkpoint["mtrain_grpo"] = {
            "history": [{k: on_host(v) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
                        for row in self.history],
            "evals": [[step, float(acc)] for step, acc in self.evals],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("mtrain_grpo") or {}
        self.history = list(state.get("history") or [])
        self.evals = [(int(step), float(acc)) for step, acc in state.get("evals") or []]

    def on_train_end(self) -> None:
        if self.evaluate is not None and (not self.evals or self.evals[-1][0] != self.rl_step):
            self._evaluate()

    # -- one RL step ---------------------------------------------------------------------------------------------
    def step_prompts(self, step: int) -> list[int]:
        """Indices of the prompts of RL step ``step``: a seeded permutation per pass over the prompt set."""
        n, p = len(self.prompts), self.s.prompts_per_step
        out = []
        pos = step * p
        while len(out) < p:
            epoch, offset = divmod(pos, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.s.seed * 100003 + epoch))
            take = min(p - len(out), n - offset)
            out += order[offset : offset + take].tolist()
            pos += take
        return out

    def sample(self, step: int) -> tuple:
        """The rollout of RL step ``step`` from the engine: (generation, examples, engine rewards or None,
        seconds)."""
        s, G = self.s, self.s.group_size
        rows = self.step_prompts(step)
        prompts = [self.prompts[i] for i in rows for _ in range(G)]
        examples = [self.examples[i] for i in rows for _ in range(G)]
        out = self.engine.generate(RolloutRequest(prompts, s.sampling, seed=s.seed * 1_000_003 + step, step=step))
        return out.gen, out.examples or examples, out.rewards, out.seconds

    def _hand_over(self) -> None:
        self.engine.update_weights(list(self.model.named_parameters()) + list(self.model.named_buffers()))

    def rollout(self, step: int) -> tuple[StepBatch, dict, list[dict]]:
        """Sample, score and prepare the batch of RL step ``step`` (no parameter changes)."""
        s, G = self.s, self.s.group_size
        gen, examples, given, rollout_s = self.sample(step)
        responses = [self.decode(gen.tokens[j, : int(gen.lengths[j])].tolist()) for j in range(len(examples))]
        if given is None:
            rewards_list, exact = self.scorer([e.get("prompt", "") for e in examples], responses, examples)
        else:
            rewards_list, exact = given, [None] * len(given)
        rewards = torch.tensor(rewards_list, dtype=torch.float32, device=gen.tokens.device)
        advantages, zero_std = advantages_of(rewards, G, s.advantage, s.norm_adv_by_std, s.advantage_args)
        if self.dump_file is not None and self.trainer.is_global_zero:
            if not self.dump_file.exists():
                self.dump_file.write_text(json.dumps(header_line(gen.temperature, self.engine.scoring)) + "\n")
            with self.dump_file.open("a") as f:
                for line in rollout_lines(gen, rewards_list, examples):
                    f.write(json.dumps(line) + "\n")

        t0 = self._now()
        was_training = self.model.training
        self.model.eval()
        old = old_policy(self.model, gen, self.pad_id, s.mismatch, self.engine.scoring)
        ref_lp = None
        if self.ref_model is not None:  # logprobs only: no routing trace, the fast projection
            with torch.no_grad():
                ref_lp = recompute(self.ref_model, gen, self.pad_id, rollout_shapes=False)
        self.model.train(was_training)
        old_s = self._now() - t0
        batch = StepBatch(gen, rewards, advantages, old.logprobs, ref_lp, replay=old.replay)
        corrections = {} if s.mismatch.bypass else correct(batch, s.mismatch.rollout_correction)

        lengths = gen.lengths.float()
        generated = int(gen.lengths.sum())
        known = [x for x in exact if x is not None]
        metrics = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "accuracy": sum(known) / len(known) if known else float("nan"),
            "frac_zero_std": zero_std,
            "response_length/mean": lengths.mean().item(),
            "response_length/max": lengths.max().item(),
            "rollout/tokens_per_s": generated / rollout_s if rollout_s > 0 else float("nan"),
            "time/rollout_s": rollout_s,
            "time/old_logprobs_s": old_s,
            **mismatch_stats(gen, old),
            **corrections,
        }
        self.seconds["rollout"] += rollout_s
        self.seconds["old_logprobs"] += old_s
        samples = [
            {"step": step, "prompt": examples[j].get("prompt", ""), "response": responses[j], "reward": rewards_list[j],
             "advantage": round(advantages[j].item(), 4)}
            for j in range(0, len(examples), G)[: s.rollouts_keep]
        ]
        return batch, metrics, samples

    def training_step(self, _token, _idx) -> None:
        step = self.rl_step
        s = self.s
        batch, metrics, samples = self.rollout(step)

        opt = self.optimizers()
        sched = self.lr_schedulers()
        t0 = self._now()
        stats_sum: dict[str, float] = {}
        norms = []
        gen = torch.Generator().manual_seed(s.seed * 7919 + step)
        real = batch.gen.real_tokens() if self.expect_tokens is not None else None
        for _ in range(s.ppo_epochs):
            for rows in minibatches(len(batch), s.num_minibatches, gen):
                if real is not None:  # routing statistics count these, not the padding
                    self.expect_tokens(real[rows.to(real.device)])
                loss, stats = minibatch_loss(self.model, batch, rows.to(batch.rewards.device), s.loss,
                                             self.pad_id, s.mismatch.rollout_correction if s.mismatch.bypass else None)
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                max_norm = s.grad_clip if s.grad_clip else float("inf")
                norms.append(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
                opt.step()
                sched.step()
                for k, v in {"loss": loss.detach(), **stats}.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
        updates = s.updates_per_step
        update_s = self._now() - t0
        self.seconds["update"] += update_s
        self._hand_over()  # the weight hand-over

        width = batch.gen.width
        metrics |= {(k if k.startswith("correction/") else f"train/{k}"): v / updates for k, v in stats_sum.items()}
        metrics |= {
            "train/grad_norm": float(torch.stack(norms).float().mean()) if norms else 0.0,
            "lr": sched.get_last_lr()[0],
            "train/tokens_per_s": len(batch) * width * s.ppo_epochs / update_s if update_s > 0 else float("nan"),
            "time/update_s": update_s,
        }
        if s.eval_every and (step + 1) % s.eval_every == 0:
            metrics["val/accuracy"] = self._evaluate(step + 1)
        self._record(step, metrics, samples)

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def _evaluate(self, step: Optional[int] = None) -> float:
        t0 = self._now()
        acc = self.evaluate(self.model)
        self.eval_seconds.append(self._now() - t0)
        self.seconds["eval"] += self.eval_seconds[-1]
        self.evals.append((self.rl_step if step is None else step, acc))
        return acc

    def _record(self, step: int, metrics: dict, samples: list[dict]) -> None:
        self.history.append({"step": step, **metrics})
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)
            if self.rollouts_file is not None and self.s.rollouts_every and step % self.s.rollouts_every == 0:
                with self.rollouts_file.open("a") as f:
                    for row in samples:
                        f.write(json.dumps(row) + "\n")
        bar = {k: metrics[k] for k in ("reward/mean", "accuracy", "mismatch/k3") if k in metrics}
        self.log_dict({k.replace("/", "_"): on_host(v) for k, v in bar.items()}, prog_bar=True, logger=False)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
