"""``task=sft``: supervised fine-tuning of an MoE model with Lightning.

data -> model (``model.checkpoint`` or random init) -> [accuracy before] -> fit (AdamW, warm-up + cosine, clipping
and accumulation from ``trainer``, val loss, checkpoints last + best, resume from ``task.ckpt_path``) -> final val
loss -> [accuracy after] -> HF export -> ``metrics.json``, ``loss_curve.png``, the ``logger=`` logs (CSV).

Loss: mean cross-entropy over target tokens only; prompt/response data (the synthetic task, JSONL with
``prompt``/``response``) has targets on the response (and eos) only, so the prompt never reaches the loss.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mtrain.config import ConfigError
from mtrain.job import Job, accuracy_examples, export_hf, finish, greedy_accuracy, start_job
from mtrain.job.preflight import routing_settings
from mtrain.job.records import pct
from mtrain.job.settings import settings_from
from mtrain.lit import LossCurve, MoELitModule, OptimSettings, build_trainer, csv_log
from mtrain.lit.resume import check_resume, resume_path
from mtrain.lit.routing import RoutingHealth
from mtrain.models.flops import peak_tflops

log = logging.getLogger("mtrain")

LAST_K = 10  # train_loss_last = mean of the last LAST_K training batches


def run(job: Job) -> dict[str, Any]:
    t_start = time.perf_counter()
    cfg, plan, out = job.cfg, job.plan, job.dir
    t = cfg.task
    ckpt = resume_path(t.ckpt_path, out)  # task.ckpt_path=auto: this run dir's last.ckpt, if any
    if cfg.trainer.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} must be >= 1 (the optimizer steps to train)")
    if t.lr <= 0:
        raise ConfigError(f"task.lr={t.lr} must be > 0 (the peak learning rate)")
    s = start_job(job)
    dm, model = s.datamodule, s.model
    examples = accuracy_examples(cfg, dm)
    gen_kw = dict(batch_size=t.gen_batch_size, max_new_tokens=t.max_new_tokens, device=s.device)

    metrics: dict[str, Any] = {
        "task": "sft",
        "model": cfg.model.name,
        "checkpoint": cfg.model.checkpoint,
        "dtype": cfg.model.dtype,
        "moe_gate_fp32": plan.moe_gate_fp32,
        "resumed_from": ckpt,
    }
    if examples and t.accuracy_before and not ckpt:
        if s.fsdp is None:
            metrics["val_accuracy_before"] = greedy_accuracy(model, dm, examples, **gen_kw)["accuracy"]
        else:  # the weights exist only once fit has sharded and filled them
            log.info("trainer=fsdp: accuracy before training is not measured (the model is built inside fit)")

    if t.compile and s.cuda:
        if s.fsdp is None:
            model.compile_layers()
        else:  # compiled after sharding, in configure_model
            s.fsdp.compile = True
    health = RoutingHealth.of(routing_settings(cfg.model), out, every=cfg.trainer.log_every_n_steps)
    lit = MoELitModule(model, settings_from(OptimSettings, t), peak_tflops=peak_tflops(t.peak_tflops, s.cuda),
                       sharding=s.fsdp, router_losses=health.losses)
    if ckpt:
        check_resume(ckpt, lit, sharded=s.fsdp is not None)
    has_val = dm.val_set is not None
    curve = LossCurve(out / "loss_curve.png", title=f"sft {cfg.model.name} on {dm.cfg.name} data")
    trainer = build_trainer(cfg, out, has_val=has_val, callbacks=[curve, health], checkpoint=t.checkpoints,
                            save_top_k=t.save_top_k, checkpoint_every=t.checkpoint_every_n_steps or None, resume=bool(ckpt),
                            multirun=job.multirun)
    t_fit = time.perf_counter()
    trainer.fit(lit, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    t_after = time.perf_counter()
    seconds = {"startup": t_fit - t_start, "fit": t_after - t_fit, "train_steps": lit.train_seconds,
               "validation": lit.excluded.get("validation", 0.0), "checkpoint": lit.excluded.get("checkpoint", 0.0)}

    if has_val and (lit.last_val is None or lit.last_val["step"] != trainer.global_step):
        trainer.validate(lit, datamodule=dm, verbose=False)  # the final weights' val loss
        lit.history["val"].append((trainer.global_step, lit.last_val["loss"]))
        if trainer.is_global_zero:
            curve.write(lit)

    metrics["world_size"] = trainer.world_size  # processes (GPUs); tokens_per_s is per process
    losses = [v for _, v in lit.train_losses()]
    tail = losses[-LAST_K:]
    metrics.update({
        "steps": trainer.global_step,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": sum(tail) / len(tail) if tail else None,
        "val_loss": lit.last_val["loss"] if lit.last_val else None,
        "val_ppl": lit.last_val["ppl"] if lit.last_val else None,
        "train_tokens": lit.train_tokens,
        "train_seconds": lit.train_seconds,
        "tokens_per_s": lit.train_tokens / lit.train_seconds if lit.train_seconds > 0 else None,
        "tokens_per_s_steady": lit.steady_tokens_per_s,  # without the first step (compile, warm-up)
    })
    if lit.peak_tflops > 0 and lit.train_seconds > 0:
        metrics["mfu"] = lit.train_flops / lit.train_seconds / (lit.peak_tflops * 1e12)
    metrics.update(health.results())  # routing_maxvio, ... of the last logging window
    seconds["final_validation"] = time.perf_counter() - t_after
    if examples:
        t0 = time.perf_counter()
        after = greedy_accuracy(model, dm, examples, **gen_kw)
        metrics.update({"val_accuracy": after["accuracy"], "accuracy_examples": after["n"],
                        "accuracy_samples": after["samples"]})
        seconds["accuracy"] = time.perf_counter() - t0

    ckpt_cb = trainer.checkpoint_callback
    files = {
        "run_dir": str(out),
        "metrics": str(out / "metrics.json"),
        "loss_curve": str(curve.written) if curve.written else None,
        "csv_log": csv_log(trainer),
        "checkpoints": str(out / "checkpoints") if t.checkpoints else None,
        "best_checkpoint": ckpt_cb.best_model_path or None if ckpt_cb is not None else None,
    }
    if trainer.is_global_zero:
        files |= health.plot(out, f"sft {cfg.model.name}")  # expert_load.png, maxvio_curve.png
    if t.export and (trainer.is_global_zero or s.fsdp is not None):  # a sharded export needs every rank
        t0 = time.perf_counter()
        dest = export_hf(model, dm, s.tokenizer_from, out / "hf_model", dtype=s.fsdp.param_dtype if s.fsdp else None)
        seconds["export"] = time.perf_counter() - t0
        if dest is not None:
            files["hf_model"] = str(dest)
    # where the wall time went; the fit's other time (data, logging, loop) is fit - train_steps - validation - checkpoint
    metrics["seconds"] = seconds
    return finish(out, metrics, files, t_start, trainer.is_global_zero, print_summary, last_step_at=lit.last_step_at)


def print_summary(m: dict[str, Any]) -> None:
    f = m["files"]
    acc = ""
    if "val_accuracy" in m:
        acc = f", accuracy {pct(m.get('val_accuracy_before'))} -> {pct(m['val_accuracy'])} ({m['accuracy_examples']} val examples)"
    val = f", val loss {m['val_loss']:.4f}" if m.get("val_loss") is not None else ""
    first, last = m.get("train_loss_first"), m.get("train_loss_last")
    loss = f"train loss {first:.3f} -> {last:.3f}" if first is not None else "no training steps"
    tps = m.get("tokens_per_s_steady") or m.get("tokens_per_s")
    tps = f", {tps:,.0f} tokens/s" if tps else ""
    vio = f", MaxVio {m['routing_maxvio']:.3f}" if m.get("routing_maxvio") is not None else ""
    print(f"\nmtrain sft: {m['steps']} steps in {m['wall_s']:.0f} s: {loss}{val}{acc}{tps}{vio}")
    rows = [("run dir", f["run_dir"]), ("metrics", "metrics.json"),
            ("loss curve", "loss_curve.png" if f["loss_curve"] else None),
            ("logs", "csv/metrics.csv" if f.get("csv_log") else None),
            *((name, where) for name, where in f.get("loggers", {}).items() if name != "csv"),
            ("routing", "expert_load.png, maxvio_curve.png, expert_load.csv" if f.get("expert_load") else None),
            ("checkpoints", "checkpoints/ (last.ckpt, best by val/loss)" if f["checkpoints"] else None),
            ("HF model", "hf_model/" if f.get("hf_model") else None)]
    for key, value in rows:
        if value:
            print(f"  {key:<12} {value}")
    if f.get("hf_model"):
        rl = " rl=on" if m.get("moe_gate_fp32") else ""
        print(f"  evaluate it: python -m mtrain task=eval model={m['model']}{rl} model.checkpoint={f['hf_model']}")
