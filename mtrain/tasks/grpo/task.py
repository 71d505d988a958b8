"""``task=grpo``'s run: data/prompts -> model (checkpoint or random init) -> [SFT warm start] -> rollout engine in
the profile the RL decision gives -> Lightning fit of :class:`mtrain.lit.grpo.GRPOModule` (``trainer.max_steps`` RL
steps) -> HF export -> ``metrics.json``, ``reward_curve.png``, ``mismatch_curve.png``, ``rollouts.jsonl``, CSV
(and the other configured loggers') logs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mtrain.config import ConfigError
from mtrain.job import Job, export_hf, finish, greedy_accuracy, start_job
from mtrain.job.settings import settings_from
from mtrain.job.warm_start import warm_start, warm_start_steps
from mtrain.job.preflight import routing_settings
from mtrain.lit import OptimSettings, build_trainer, csv_log
from mtrain.lit.routing import RoutingHealth
from mtrain.lit.grpo import GRPOModule, GRPOSettings
from mtrain.lit.resume import check_resume, resume_path
from mtrain.models import MoECausalLM, build_model
from mtrain.rl.engines import FastEngine, FileEngine, RolloutEngine, SamplingConfig, build_engine
from mtrain.rl.grpo import LossSettings

from .checks import check_config, engine_choice, injection, mismatch_settings
from .inputs import file_rollouts, make_scorer, prompt_sets, reward_function
from .report import plot_curves, print_summary, summarize

log = logging.getLogger("mtrain")


def settings(job: Job, max_new: int) -> GRPOSettings:
    """The run's :class:`GRPOSettings`, each field from the ``task`` key of its name (``max_new``: the longest
    response a rollout may have, the sampling's and the ``seq-mean-token-sum-norm`` length)."""
    cfg, t = job.cfg, job.cfg.task
    return settings_from(
        GRPOSettings, t,
        sampling=settings_from(SamplingConfig, t, max_new_tokens=max_new),
        loss=settings_from(LossSettings, t, norm_len=max_new),
        mismatch=mismatch_settings(t),
        optim=settings_from(OptimSettings, t),
        grad_clip=cfg.trainer.gradient_clip_val, seed=cfg.seed,
    )


def run(job: Job) -> dict[str, Any]:
    t_start = time.perf_counter()
    check_config(job)
    cfg, plan, out, t = job.cfg, job.plan, job.dir, job.cfg.task
    ckpt = resume_path(t.ckpt_path, out)  # task.ckpt_path=auto: this run dir's last.ckpt, if any
    reward_fn = reward_function(t)
    ws_steps = warm_start_steps(job)
    if ws_steps == 0 and not cfg.model.checkpoint and not ckpt:
        log.warning("task=grpo: a random-init model without a warm start (task.warm_start_steps=0) answers nothing "
                    "right, so an exact-match reward stays 0 and RL has nothing to learn from")
    s = start_job(job)
    dm, model = s.datamodule, s.model
    train_prompts, val_prompts = prompt_sets(job, s)
    encoded = [dm.encode_prompt(e["prompt"]) for e in train_prompts]
    if t.max_new_tokens is None and not any("answer" in e for e in train_prompts):
        raise ConfigError("task.max_new_tokens=null sizes responses by the longest answer + 2, but the prompts have "
                          "no \"answer\"; set task.max_new_tokens")
    max_new = t.max_new_tokens or 2 + max(
        len(dm.tokenizer.encode(str(e.get("answer", "")), add_special_tokens=False).ids) for e in train_prompts)
    limit = model.config.max_position_embeddings
    for i, ids in enumerate(encoded):
        if len(ids) + max_new > limit:
            raise ConfigError(f"prompt #{i} ({train_prompts[i]['prompt'][:40]!r}...) has {len(ids)} tokens; with "
                              f"max_new_tokens={max_new} it exceeds the model's context of {limit}; shorten it or "
                              "lower task.max_new_tokens")

    from_file, declared = file_rollouts(job, model) if t.rollouts_path else (None, None)
    if from_file is not None:
        max_new = max(max_new, max(len(r.response_ids) for r in from_file))

    metrics: dict[str, Any] = {"task": "grpo", "model": cfg.model.name, "checkpoint": cfg.model.checkpoint,
                               "dtype": cfg.model.dtype, "moe_gate_fp32": plan.moe_gate_fp32,
                               "resumed_from": ckpt, "prompts": len(train_prompts),
                               "val_prompts": len(val_prompts)}
    seconds = {"warm_start": 0.0}
    if ws_steps > 0 and not ckpt:
        probe = [{"prompt": e["prompt"], "response": str(e["answer"])} for e in train_prompts if "answer" in e]
        done = warm_start(job, s, ws_steps, t.warm_start_lr, t.warm_start_accuracy, probe[: t.max_accuracy_examples])
        seconds["warm_start"] = done.pop("seconds")
        metrics["warm_start"] = done
        model = s.model
    if t.compile and s.cuda:
        model.compile_layers()

    eos = [dm.eos_id] if dm.eos_id is not None else []
    name, exact = engine_choice(job)
    if name == "file":
        engine: RolloutEngine = FileEngine(
            rows=from_file, per_step=t.prompts_per_step * t.group_size, max_new_tokens=max_new, pad_id=dm.pad_id,
            device=s.device, temperature=declared.temperature if declared else 1.0,
            scoring=declared.scoring if declared else "standard")
    else:
        engine = build_engine(name, t.engine_args, copy_of=model, policy=plan.policy, dtype=t.rollout_dtype,
                              eos_ids=eos, pad_id=dm.pad_id, inject=injection(t, cfg.seed), exact=exact)
    log.info("rollout engine: %s", engine.describe())
    # the held-out greedy eval decodes with the fast engine: the rollout engine when it is one (it holds the
    # weights of the last hand-over), else a fast engine over the policy itself
    eval_engine = engine if isinstance(engine, FastEngine) else FastEngine(model=model, eos_ids=eos, pad_id=dm.pad_id)
    t_warm = time.perf_counter()
    for e in {id(engine): engine, id(eval_engine): eval_engine}.values():
        e.warmup()  # kernel compilation, before the fit's clock
    seconds["engine_warmup"] = round(time.perf_counter() - t_warm, 3)
    ref = frozen_copy(model, plan) if t.kl_coef > 0 else None  # the policy at RL start
    val = [{"prompt": e["prompt"], "response": str(e["answer"])} for e in val_prompts if "answer" in e]
    val = val[: t.max_accuracy_examples]

    def evaluate(m: MoECausalLM) -> float:
        return greedy_accuracy(m, dm, val, device=s.device, batch_size=t.gen_batch_size,
                               max_new_tokens=t.max_new_tokens, engine=eval_engine)["accuracy"] \
            if val else float("nan")

    rl = settings(job, max_new)
    rollouts_file = out / "rollouts.jsonl"
    lit = GRPOModule(model, engine, encoded, train_prompts, dm.decode, make_scorer(reward_fn), rl, ref_model=ref,
                     evaluate=evaluate if val else None, rollouts_file=rollouts_file,
                     dump_file=out / "rollout_batches.jsonl" if t.dump_rollouts else None, pad_id=dm.pad_id)
    if ckpt:
        check_resume(ckpt, lit)
    updates = rl.updates_per_step
    # routing health: load metrics every RL step, bias update / frozen router per model.routing
    health = RoutingHealth.of(routing_settings(cfg.model), out, every=updates, step_of=lambda tr, m: m.rl_step - 1)
    trainer = build_trainer(
        cfg, out, has_val=False, checkpoint=t.checkpoints, checkpoint_every=t.checkpoint_every_n_steps * updates,
        resume=bool(ckpt), callbacks=[health],
        multirun=job.multirun,
        max_steps=cfg.trainer.max_steps * updates, gradient_clip_val=None, accumulate_grad_batches=1,
        val_check_interval=None,
    )
    t_fit = time.perf_counter()
    trainer.fit(lit, ckpt_path=ckpt, weights_only=True)
    seconds["fit"] = time.perf_counter() - t_fit
    seconds |= lit.seconds
    engine.close()
    metrics["engine"] = engine.describe()
    metrics["eval_seconds"] = [round(x, 3) for x in lit.eval_seconds]  # each held-out eval
    metrics["time_share"] = {k: round(lit.seconds[k] / seconds["fit"], 4) if seconds["fit"] > 0 else None
                             for k in ("rollout", "old_logprobs", "update", "eval")}

    metrics |= summarize(lit, trainer.global_step // updates)
    metrics["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    files = {"run_dir": str(out), "metrics": str(out / "metrics.json"), "rollouts": str(rollouts_file),
             **({"rollout_batches": str(out / "rollout_batches.jsonl")} if t.dump_rollouts else {}),
             "csv_log": csv_log(trainer), "checkpoints": str(out / "checkpoints")}
    files |= plot_curves(lit, out, f"grpo {cfg.model.name}, rl={'on' if plan.rl else 'off'}, {engine.describe()}")
    metrics |= health.results()
    files |= health.plot(out, f"grpo {cfg.model.name}") if trainer.is_global_zero else {}
    if t.export and trainer.is_global_zero:
        files["hf_model"] = str(export_hf(model, dm, s.tokenizer_from, out / "hf_model"))
    return finish(out, metrics, files, t_start, trainer.is_global_zero, print_summary)


def frozen_copy(model: MoECausalLM, plan) -> MoECausalLM:
    """A copy of ``model`` (same dtype, device and precision policy) that never trains."""
    ref = build_model(model.config, dtype=model.output_weight.dtype, device=model.output_weight.device,
                      policy=plan.policy, init=False)
    ref.load_state_dict(model.state_dict())
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()
