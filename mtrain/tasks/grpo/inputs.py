"""What ``task=grpo`` trains on: the prompt sets, the reward (and the exact-match flags beside it), and an external
engine's rollout file checked against the model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import hydra
from omegaconf import OmegaConf

from mtrain.config import ConfigError
from mtrain.data.errors import DataError
from mtrain.data.prompts import read_prompt_jsonl
from mtrain.data.rewards import exact_match, resolve_reward, score
from mtrain.data.rollout_formats import DeclaredLayout
from mtrain.data.rollouts import FileSettings, ModelShape, RolloutRow, check_groups, read_rollout_file
from mtrain.job.run import Job
from mtrain.job.settings import settings_from
from mtrain.models import MoECausalLM

if TYPE_CHECKING:  # the check imports this module before Lightning; Setup's module imports it
    from mtrain.job.build import Setup


def reward_function(task) -> Callable:
    """``task.reward_fn`` (a Hydra ``_target_`` node, instantiated as a partial) or ``task.reward`` (a registered
    name or a dotted path) with its options ``task.reward_args``."""
    if task.reward_fn is not None:
        node = OmegaConf.to_container(task.reward_fn, resolve=True)
        try:
            return hydra.utils.instantiate(node, _partial_=True)
        except Exception as e:  # noqa: BLE001  (Hydra wraps import errors; report one line)
            raise ConfigError(f"task.reward_fn: cannot instantiate {node.get('_target_')!r}: {e}".split("\n")[0]) from None
    return resolve_reward(task.reward, OmegaConf.to_container(task.reward_args, resolve=True))


def prompt_sets(job: Job, s: "Setup") -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt sets ``{"prompt", "answer", ...}``: JSONL files, else the synthetic task's splits."""
    t = job.cfg.task
    need_answer = t.reward_fn is None and t.reward in ("exact", "numeric")
    if t.prompts_path:
        train = read_prompt_jsonl(t.prompts_path, require_answer=need_answer)
        val = read_prompt_jsonl(t.val_prompts_path, require_answer=need_answer) if t.val_prompts_path else []
        return train, val
    dm = s.datamodule
    if not dm.train_examples:
        raise ConfigError("task=grpo needs prompts: set task.prompts_path=/path/prompts.jsonl or use data=synthetic "
                          "(or JSONL data with prompt/response pairs)")
    as_prompt = lambda e: {"prompt": e["prompt"], "answer": e["response"]}  # noqa: E731
    return [as_prompt(e) for e in dm.train_examples], [as_prompt(e) for e in dm.val_examples]


def make_scorer(reward_fn: Callable):
    """(prompts, responses, examples) -> (rewards, exact-match flags: None where an example has no answer)."""
    def scorer(prompts, responses, examples):
        rewards = score(reward_fn, prompts, responses, examples)
        exact = [bool(exact_match(p, r, e)) if "answer" in e else None for p, r, e in zip(prompts, responses, examples)]
        return rewards, exact
    return scorer


def file_rollouts(job: Job, model: MoECausalLM) -> tuple[list[RolloutRow], DeclaredLayout | None]:
    """``task.rollouts_path``, checked against the model, the declared layout, the group size, the replay mode and
    the step count; and the file's declaration (temperature, scoring)."""
    t, cfg = job.cfg.task, job.cfg
    c = model.config
    moe = tuple(model.moe_layers)
    k = c.num_experts_per_tok
    experts = model.model.layers[moe[0]].mlp.gate.num_experts if moe else 0
    settings = settings_from(FileSettings, format=t.rollout_format, temperature=t.rollout_logprob_temperature,
                             layout=t.rollout_layout)
    rows, declared = read_rollout_file(t.rollouts_path, ModelShape(c.vocab_size, c.num_hidden_layers, moe, k, experts),
                                       settings)
    check_groups(rows, t.group_size)
    if t.routing_replay == "r3" and any(r.routed is None for r in rows):
        where = next(r.where for r in rows if r.routed is None)
        raise DataError(f"{where}: no \"routed_experts\", which task.routing_replay=r3 replays. Fix: export the "
                        "engine's routed experts, or use routing_replay=off|r2")
    per_step = t.prompts_per_step * t.group_size
    if cfg.trainer.max_steps * per_step > len(rows):
        raise ConfigError(f"task.rollouts_path holds {len(rows)} responses = {len(rows) // per_step} steps of "
                          f"{t.prompts_per_step} prompts x {t.group_size}; trainer.max_steps={cfg.trainer.max_steps} "
                          f"asks for more. Lower trainer.max_steps (or task.prompts_per_step)")
    return rows, declared
