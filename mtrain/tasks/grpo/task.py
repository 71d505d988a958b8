"""``task=grpo``: RL fine-tuning of an MoE model with GRPO-family losses on the embedded rollout path.

data/prompts -> model (checkpoint or random init) -> [SFT warm start] -> rollout engine in the profile the RL decision
gives -> Lightning fit of :class:`mtrain.lit.grpo.GRPOModule` (``trainer.max_steps`` RL steps) -> HF export ->
``metrics.json``, ``reward_curve.png``, ``mismatch_curve.png``, ``rollouts.jsonl``, CSV (+TensorBoard) logs.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import lightning as L
from omegaconf import OmegaConf

from mtrain.config import ConfigError
from mtrain.data.errors import DataError
from mtrain.data.prompts import read_prompt_jsonl
from mtrain.data.rollout_formats import FORMATS, DeclaredLayout
from mtrain.data.rollouts import FileSettings, ModelShape, RolloutRow, check_groups, read_rollout_file
from mtrain.data.rewards import exact_match, resolve_reward, score
from mtrain.job import Job, Setup, export_hf, finish, greedy_accuracy, start_job
from mtrain.lit import MoELitModule, build_trainer
from mtrain.lit.grpo import GRPOModule, GRPOSettings
from mtrain.lit.resume import check_resume, resume_path
from mtrain.models import MoECausalLM, build_model
from mtrain.plots import figure
from mtrain.rl import ADVANTAGE_MODES, KL_KINDS, LOSS_AGG_MODES, POLICY_LOSS_KINDS, CorrectionConfig
from mtrain.rl.grpo import REPLAY_MODES, LossSettings, MismatchSettings
from mtrain.rl.engines import FastEngine, FileEngine, MismatchInjection, RolloutEngine, SamplingConfig, build_engine
from mtrain.rl.engines.base import choose_engine

log = logging.getLogger("mtrain")


def check_config(job: Job) -> None:
    """Refuse settings that cannot work, before anything is built or written."""
    t, cfg = job.cfg.task, job.cfg
    choices = {"advantage": ADVANTAGE_MODES, "loss": POLICY_LOSS_KINDS, "loss_agg": LOSS_AGG_MODES,
               "kl_estimator": KL_KINDS, "routing_replay": REPLAY_MODES}
    for key, allowed in choices.items():
        if t[key] not in allowed:
            raise ConfigError(f"task.{key}={t[key]!r} is not one of {', '.join(allowed)}")
    if t.group_size < 2:
        raise ConfigError(f"task.group_size={t.group_size}: GRPO compares responses within a group; use >= 2")
    if t.max_new_tokens is not None and t.max_new_tokens <= 0:
        raise ConfigError(f"task.max_new_tokens={t.max_new_tokens} must be > 0 (or null: longest answer + 2)")
    for key in ("prompts_per_step", "ppo_epochs", "num_minibatches"):
        if t[key] < 1:
            raise ConfigError(f"task.{key}={t[key]} must be >= 1")
    if t.num_minibatches > t.prompts_per_step * t.group_size:
        raise ConfigError(f"task.num_minibatches={t.num_minibatches} exceeds the {t.prompts_per_step * t.group_size} "
                          "responses of a step; lower it")
    if t.lr <= 0:
        raise ConfigError(f"task.lr={t.lr} must be > 0 (the peak learning rate)")
    if t.warm_start_accuracy is not None and not 0 <= t.warm_start_accuracy <= 1:
        raise ConfigError(f"task.warm_start_accuracy={t.warm_start_accuracy} must be in [0, 1] (a share of exact "
                          "answers; null = run all task.warm_start_steps)")
    if t.temperature <= 0:
        raise ConfigError(f"task.temperature={t.temperature}: RL samples; use > 0")
    if cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be >= 1 (the number of RL steps)")
    if str(cfg.trainer.strategy) == "fsdp2":
        raise ConfigError("task=grpo does not run under trainer=fsdp yet; use trainer=gpu or trainer=cpu")
    if t.rollout_format is not None and t.rollout_format not in (*FORMATS, "custom"):
        raise ConfigError(f"task.rollout_format={t.rollout_format!r} is not one of {', '.join([*FORMATS, 'custom'])} "
                          "(the engine that wrote task.rollouts_path; docs/rollout-files.md)")
    mismatch_settings(t)
    engine_choice(job)
    inj = injection(t, cfg.seed)
    if t.rollouts_path and inj is not None:
        raise ConfigError("task.inject_mismatch perturbs the embedded rollout engine; with task.rollouts_path the "
                          "rollouts come from a file. Drop one of them")


def engine_choice(job: Job) -> tuple[str, bool]:
    """(engine name, exact) from ``task.engine``, ``task.exact``, ``task.rollouts_path`` and the RL decision."""
    t = job.cfg.task
    try:
        return choose_engine(t.engine, t.exact, job.plan.rl, bool(t.rollouts_path))
    except ValueError as e:
        raise ConfigError(f"task.engine / task.exact: {e}") from None


def mismatch_settings(t) -> MismatchSettings:
    """``task.routing_replay`` and ``task.rollout_correction`` as typed settings (ConfigError naming the bad key)."""
    c = OmegaConf.to_container(t.rollout_correction, resolve=True)
    old = c.pop("old_logprobs")
    try:
        return MismatchSettings(t.routing_replay, old, CorrectionConfig(**c))
    except ValueError as e:
        raise ConfigError(f"task.rollout_correction / task.routing_replay: {e}") from None


def injection(t, seed: int) -> MismatchInjection | None:
    try:
        inj = MismatchInjection(t.inject_mismatch.router_noise, t.inject_mismatch.logit_noise, seed)
    except ValueError as e:
        raise ConfigError(f"task.{e}") from None
    return inj if inj.active else None


def file_rollouts(job: Job, model: MoECausalLM) -> tuple[list[RolloutRow], DeclaredLayout | None]:
    """``task.rollouts_path``, checked against the model, the declared layout, the group size, the replay mode and
    the step count; and the file's declaration (temperature, scoring)."""
    t, cfg = job.cfg.task, job.cfg
    c = model.config
    moe = tuple(model.moe_layers)
    k = c.num_experts_per_tok
    experts = model.model.layers[moe[0]].mlp.gate.num_experts if moe else 0
    settings = FileSettings(t.rollout_format, t.rollout_logprob_temperature,
                            OmegaConf.to_container(t.rollout_layout, resolve=True))
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


def reward_function(task) -> Callable:
    """``task.reward_fn`` (a Hydra ``_target_`` node, instantiated as a partial) or ``task.reward`` (a name or a
    dotted path)."""
    if task.reward_fn is not None:
        node = OmegaConf.to_container(task.reward_fn, resolve=True)
        try:
            return hydra.utils.instantiate(node, _partial_=True)
        except Exception as e:  # noqa: BLE001  (Hydra wraps import errors; report one line)
            raise ConfigError(f"task.reward_fn: cannot instantiate {node.get('_target_')!r}: {e}".split("\n")[0]) from None
    return resolve_reward(task.reward)


def prompt_sets(job: Job, s: Setup) -> tuple[list[dict], list[dict]]:
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
    def scorer(prompts, responses, examples):
        rewards = score(reward_fn, prompts, responses, examples)
        exact = [bool(exact_match(p, r, e)) if "answer" in e else None for p, r, e in zip(prompts, responses, examples)]
        return rewards, exact
    return scorer


class StopAtAccuracy(L.Callback):
    """Stop an SFT warm start once the greedy exact match of ``accuracy()`` reaches ``target`` (checked every
    ``every`` optimizer steps); records each check in ``checks`` as (step, accuracy)."""

    def __init__(self, accuracy: Callable[[], float], target: float, every: int = 10):
        self.accuracy, self.target, self.every = accuracy, target, every
        self.checks: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            self.checks.append((step, self.accuracy()))
            if self.checks[-1][1] >= self.target:
                trainer.should_stop = True


def warm_start(job: Job, s: Setup, steps: int, lr: float, target: float | None, probe: list[dict]) -> dict[str, Any]:
    """A short SFT of the model on ``data`` (the synthetic task: prompt -> exact answer), ``steps`` optimizer steps
    or fewer: with ``target``, it stops once greedy exact match on ``probe`` (train prompts) reaches it. Returns what
    it did: steps, seconds, and the probe accuracy at the end (with a target)."""
    t0 = time.perf_counter()
    # With a target the learning rate stays constant after warm-up: the stop is not on an annealed model (RL from
    # an annealed one first loses accuracy when its learning rate rises again).
    lit = MoELitModule(s.model, lr=lr, warmup_steps=min(50, steps // 4),
                       min_lr_ratio=1.0 if target is not None else 0.1, weight_decay=0.0)
    stop = None
    if target is not None and probe:
        stop = StopAtAccuracy(lambda: greedy_accuracy(s.model, s.datamodule, probe, device=s.device)["accuracy"],
                              target)
    trainer = build_trainer(job.cfg, job.dir, has_val=False, checkpoint=False, max_steps=steps,
                            multirun=job.multirun, enable_progress_bar=False, loggers=False,
                            callbacks=[stop] if stop else [])
    trainer.fit(lit, datamodule=s.datamodule)
    losses = lit.train_losses()
    done = {"steps": trainer.global_step, "seconds": round(time.perf_counter() - t0, 3)}
    if stop is not None and stop.checks:
        done["train_accuracy"] = stop.checks[-1][1]
    log.info("warm start: %d SFT steps, loss %.3f -> %.3f%s", trainer.global_step, losses[0][1], losses[-1][1],
             f", greedy exact match on {len(probe)} train prompts {100 * done['train_accuracy']:.1f}%"
             if "train_accuracy" in done else "")
    return done


def run(job: Job) -> dict[str, Any]:
    t_start = time.perf_counter()
    check_config(job)
    cfg, plan, out, t = job.cfg, job.plan, job.dir, job.cfg.task
    ckpt = resume_path(t.ckpt_path, out)  # task.ckpt_path=auto: this run dir's last.ckpt, if any
    reward_fn = reward_function(t)
    s = start_job(job)
    dm, model = s.datamodule, s.model
    train_prompts, val_prompts = prompt_sets(job, s)
    encoded = [dm.encode_prompt(e["prompt"]) for e in train_prompts]
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
    if t.warm_start_steps > 0 and not ckpt:
        probe = [{"prompt": e["prompt"], "response": str(e["answer"])} for e in train_prompts if "answer" in e]
        done = warm_start(job, s, t.warm_start_steps, t.warm_start_lr, t.warm_start_accuracy,
                          probe[: t.max_accuracy_examples])
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
        engine = build_engine(name, copy_of=model, policy=plan.policy, dtype=t.rollout_dtype, eos_ids=eos,
                              pad_id=dm.pad_id, inject=injection(t, cfg.seed), **({"exact": exact} if name == "fast"
                                                                                    else {}))
    log.info("rollout engine: %s", engine.describe())
    # the held-out greedy eval decodes with the fast engine: the rollout engine when it is one (it holds the
    # weights of the last hand-over), else a fast engine over the policy itself
    eval_engine = engine if isinstance(engine, FastEngine) else FastEngine(model=model, eos_ids=eos, pad_id=dm.pad_id)
    ref = frozen_copy(model, plan) if t.kl_coef > 0 else None  # the policy at RL start
    val = [{"prompt": e["prompt"], "response": str(e["answer"])} for e in val_prompts if "answer" in e]
    val = val[: t.max_accuracy_examples]

    def evaluate(m: MoECausalLM) -> float:
        return greedy_accuracy(m, dm, val, device=s.device, batch_size=t.gen_batch_size,
                               max_new_tokens=t.max_new_tokens, engine=eval_engine)["accuracy"] \
            if val else float("nan")

    settings = GRPOSettings(
        prompts_per_step=t.prompts_per_step, group_size=t.group_size,
        sampling=SamplingConfig(max_new, t.temperature, t.top_p),
        loss=LossSettings(t.loss, t.clip_low, t.clip_high, t.dual_clip, t.loss_agg, max_new, t.kl_coef, t.kl_estimator),
        mismatch=mismatch_settings(t),
        ppo_epochs=t.ppo_epochs, num_minibatches=t.num_minibatches, advantage=t.advantage,
        norm_adv_by_std=t.norm_adv_by_std, lr=t.lr, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.eps, grad_clip=cfg.trainer.gradient_clip_val,
        seed=cfg.seed, eval_every=t.eval_every, rollouts_every=t.rollouts_every,
    )
    rollouts_file = out / "rollouts.jsonl"
    lit = GRPOModule(model, engine, encoded, train_prompts, dm.decode, make_scorer(reward_fn), settings, ref_model=ref,
                     evaluate=evaluate if val else None, rollouts_file=rollouts_file,
                     dump_file=out / "rollout_batches.jsonl" if t.dump_rollouts else None, pad_id=dm.pad_id)
    if ckpt:
        check_resume(ckpt, lit)
    updates = settings.updates_per_step
    trainer = build_trainer(
        cfg, out, has_val=False, checkpoint=t.checkpoints, checkpoint_every=t.checkpoint_every_n_steps * updates,
        resume=bool(ckpt),
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
    metrics["time_share"] = {k: round(lit.seconds[k] / seconds["fit"], 4) if seconds["fit"] > 0 else None
                             for k in ("rollout", "old_logprobs", "update", "eval")}

    metrics |= summarize(lit, trainer.global_step // updates)
    metrics["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    files = {"run_dir": str(out), "metrics": str(out / "metrics.json"), "rollouts": str(rollouts_file),
             **({"rollout_batches": str(out / "rollout_batches.jsonl")} if t.dump_rollouts else {}),
             "csv_log": str(Path(trainer.loggers[0].log_dir) / "metrics.csv"), "checkpoints": str(out / "checkpoints")}
    files |= plot_curves(lit, out, f"grpo {cfg.model.name}, rl={'on' if plan.rl else 'off'}, {engine.describe()}")
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


def summarize(lit: GRPOModule, steps: int) -> dict[str, Any]:
    """Final values: the last step's metrics, accuracy before/after, the run's mean/max mismatch."""
    h = lit.history
    out: dict[str, Any] = {"steps": steps}
    if lit.evals:
        out["val_accuracy_before"] = lit.evals[0][1]
        out["val_accuracy"] = lit.evals[-1][1]
        out["val_accuracy_curve"] = [[s, round(a, 4)] for s, a in lit.evals]
    if h:
        last = h[-1]
        for key in ("reward/mean", "reward/std", "accuracy", "frac_zero_std", "response_length/mean",
                    "response_length/max", "train/entropy", "train/clip_frac", "train/approx_kl", "train/grad_norm",
                    "lr", "rollout/tokens_per_s", "train/tokens_per_s"):
            if key in last:
                out[key.replace("/", "_")] = last[key]
        tail = h[-10:]
        out["reward_mean_last10"] = sum(r["reward/mean"] for r in tail) / len(tail)
        for key in ("mismatch/k3", "mismatch/routing_disagreement", "mismatch/routing_disagreement_own",
                    "mismatch/logprob_abs_diff_mean", "correction/ess", "correction/frac_masked",
                    "correction/frac_truncated", "correction/is_weight_mean"):
            values = [r[key] for r in h if key in r]
            if values:
                out[key.replace("/", "_") + "_mean"] = sum(values) / len(values)
        out["mismatch_logprob_abs_diff_max"] = max(r["mismatch/logprob_abs_diff_max"] for r in h)
        out["mismatch_routing_disagreement_max"] = max(r["mismatch/routing_disagreement"] for r in h)
    out["engine_syncs"] = lit.engine.syncs if lit.engine is not None else 0
    return out


def plot_curves(lit: GRPOModule, out: Path, title: str) -> dict[str, str]:
    h = lit.history
    if not h:
        return {}
    steps = [r["step"] for r in h]
    with figure(out / "reward_curve.png", size=(7, 4)) as ax:
        ax.plot(steps, [r["reward/mean"] for r in h], color="tab:blue", lw=1.2, label="reward (train, mean)")
        acc = [r["accuracy"] for r in h]
        if not all(math.isnan(a) for a in acc):
            ax.plot(steps, acc, color="tab:green", lw=0.8, alpha=0.6, label="exact match (train samples)")
        if lit.evals:
            xs, ys = zip(*lit.evals)
            ax.plot(xs, ys, "o-", color="tab:orange", ms=4, lw=1.6, label="exact match (held-out, greedy)")
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
    with figure(out / "mismatch_curve.png", size=(9, 3.5), ncols=2) as (a1, a2):
        a1.plot(steps, [r["mismatch/k3"] for r in h], color="tab:red", lw=1.2)
        a1.set_title("train/rollout KL (k3) of each step's batch", fontsize=9)
        a2.plot(steps, [100 * r["mismatch/routing_disagreement"] for r in h], color="tab:purple", lw=1.2)
        a2.set_title("routing disagreement (%)", fontsize=9)
        for a in (a1, a2):
            a.set_xlabel("RL step")
            a.grid(alpha=0.3)
    return {"reward_curve": str(out / "reward_curve.png"), "mismatch_curve": str(out / "mismatch_curve.png")}


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def print_summary(m: dict[str, Any]) -> None:
    acc = f"held-out accuracy {_pct(m.get('val_accuracy_before'))} -> {_pct(m.get('val_accuracy'))}"
    mis = (f"mismatch k3 mean {m.get('mismatch_k3_mean', 0):.2e}, routing disagreement mean "
           f"{100 * m.get('mismatch_routing_disagreement_mean', 0):.2f}%")
    print(f"\nmtrain grpo: {m['steps']} RL steps in {m['wall_s']:.0f} s: reward {m.get('reward_mean_last10', 0):.3f} "
          f"(mean of last 10 steps), {acc}; {mis}")
    for key, value in (("run dir", m["files"]["run_dir"]), ("metrics", "metrics.json"),
                       ("curves", "reward_curve.png, mismatch_curve.png"), ("rollouts", "rollouts.jsonl"),
                       ("logs", "csv/metrics.csv"), ("HF model", "hf_model/" if m["files"].get("hf_model") else None)):
        if value:
            print(f"  {key:<12} {value}")
