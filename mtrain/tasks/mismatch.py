"""``task=mismatch``: how far the rollout engine's numbers are from the trainer's, with and without ``rl=on``.

Two precision profiles over the same weights:

* **rollout** -- what an inference engine runs: gate precision from the RL decision (model dtype unless
  ``FD_ENABLE_RL`` / ``rl=on``), RoPE likewise, the fast engine (static KV cache). Under ``rl=on`` the engine runs
  exact (``task.exact``: batch-invariant kernels), and the trainer recomputes through the same path.
* **trainer** -- one full-sequence forward, gate fp32 by default (Megatron's ``moe_router_dtype=fp32``).

The rollout generates from prompts (the built-in task or a JSONL file), the trainer recomputes the same tokens, and
``mtrain.rl.mismatch.mismatch_metrics`` compares them. Writes ``metrics.json``, ``tokens.csv``,
``logprob_diff_hist.png`` and ``routing_disagreement.png`` into the run dir.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from mtrain.config import ConfigError
from mtrain.data import DataError, build_datamodule, load_tokenizer
from mtrain.job import Job, model_from_config, write_json
from mtrain.job.settings import settings_from
from mtrain.models import PrecisionPolicy, build_model
from mtrain.plots import figure
from mtrain.rl.engines import RolloutRequest, SamplingConfig, build_engine
from mtrain.rl.engines.base import task_engine
from mtrain.rl.mismatch import mismatch_metrics, trainer_recompute

log = logging.getLogger(__name__)


def _prompts(cfg: DictConfig, task) -> tuple[list[list[int]], object, int, list[int]]:
    """Token-id prompts, the tokenizer, pad id and stop ids."""
    tokenizer = load_tokenizer(cfg.model.checkpoint) if cfg.model.checkpoint else None
    dm = build_datamodule(cfg.data, tokenizer=tokenizer)
    if task.prompts_path is None:
        dm.setup()
        texts = [ex["prompt"] for ex in dm.val_examples]
    else:
        path = Path(task.prompts_path)
        if not path.is_file():
            raise ConfigError(f"task.prompts_path={path} does not exist; give a JSONL file with one {{\"prompt\": ...}} a line")
        texts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{path}:{n}: expected a JSON object with a \"prompt\" string") from None
    if not texts:
        raise ConfigError("task=mismatch found no prompts; check data or task.prompts_path")
    prompts = [dm.encode_prompt(t) for t in texts[: task.num_prompts]]
    eos = [dm.eos_id] if dm.eos_id is not None else []
    return prompts, dm, dm.pad_id, eos


def run(job: Job) -> dict:
    cfg, plan = job.cfg, job.plan
    task = cfg.task
    try:
        name, exact = task_engine(task, plan.exact_rollout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    device = ("cuda" if torch.cuda.is_available() else "cpu") if task.device == "auto" else str(task.device)
    trainer_rope = cfg.model.rope_fp32 if task.trainer_rope_fp32 is None else task.trainer_rope_fp32
    trainer_policy = PrecisionPolicy(moe_gate_fp32=task.trainer_gate_fp32, rope_fp32=bool(trainer_rope))
    for policy in (plan.policy, trainer_policy):
        policy.apply_backends(device == "cuda")
    torch.manual_seed(cfg.seed)
    try:
        prompts, dm, pad_id, eos = _prompts(cfg, task)
    except DataError as e:
        raise ConfigError(str(e)) from None

    dtype = task.dtype or cfg.model.dtype
    rollout = model_from_config(cfg.model, plan.policy, device=device, vocab_size=dm.vocab_size, seed=cfg.seed,
                                dtype=dtype).eval()
    trainer = build_model(rollout.config, dtype=dtype, device=device, policy=trainer_policy, init=False).eval()
    trainer.load_state_dict(rollout.state_dict())  # same weights; a bf16 gate is upcast exactly

    engine = build_engine(name, task.engine_args, model=rollout, eos_ids=eos, pad_id=pad_id, exact=exact)
    sampling = settings_from(SamplingConfig, task)
    out_rollout = engine.generate(RolloutRequest(prompts, sampling, seed=task.seed))
    gen, rollout_s = out_rollout.gen, out_rollout.seconds
    start = time.perf_counter()
    trainer_lp, trainer_routing = trainer_recompute(trainer, gen, pad_id, scoring=engine.scoring)
    if device == "cuda":
        torch.cuda.synchronize()
    trainer_s = time.perf_counter() - start
    metrics, rows = mismatch_metrics(gen.logprobs, trainer_lp, gen.routing, trainer_routing, gen.lengths)
    metrics |= {
        "rollout_profile": f"gate {'fp32' if rollout.moe_gate_fp32 else dtype}, "
        f"rope {'fp32' if rollout.rope_fp32 else dtype}, engine={engine.describe()}",
        "trainer_profile": f"gate {'fp32' if task.trainer_gate_fp32 else dtype}, "
        f"rope {'fp32' if trainer_rope else dtype}, full forward"
        f"{' (exact path)' if engine.scoring == 'invariant' else ''}",
        "rollout_tokens_per_s": metrics["tokens"] / rollout_s,
        "trainer_tokens_per_s": metrics["tokens"] / trainer_s,
        "device": device,
        "dtype": dtype,
    }
    out = job.dir
    _write(out, metrics, rows)
    del rollout, trainer
    log.info(
        "mismatch (%s): routing disagreement %.4f, tokens with any layer differing %.4f, |dlogprob| mean %.2e max %.2e",
        plan.summary(), metrics["routing_disagreement"], metrics["tokens_any_layer_differs"],
        metrics["logprob_abs_diff_mean"], metrics["logprob_abs_diff_max"],
    )
    print(f"mismatch results in {out}: metrics.json, tokens.csv, logprob_diff_hist.png, routing_disagreement.png")
    return metrics


def _write(out: Path, metrics: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    with open(out / "tokens.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["sequence"])
        writer.writeheader()
        writer.writerows(rows)
    diffs = [r["abs_diff"] for r in rows]
    per_layer = metrics["routing_disagreement_per_layer"]
    with figure(out / "logprob_diff_hist.png") as ax:
        ax.hist(diffs, bins=50, color="tab:blue")
        ax.set_yscale("log")
        ax.set_xlabel("|rollout logprob - trainer logprob|")
        ax.set_ylabel("tokens")
        ax.set_title(f"{metrics['rollout_profile']}\nvs trainer: {metrics['trainer_profile']}", fontsize=8)
    with figure(out / "routing_disagreement.png") as ax:
        ax.bar(range(len(per_layer)), [100 * x for x in per_layer], color="tab:orange")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("routing disagreement (%)")
        ax.set_title(f"top-k expert set differs, mean {100 * metrics['routing_disagreement']:.2f}%", fontsize=9)
