"""``task=eval``: mean token loss and perplexity of a model on a dataset, tokens/s, optional per-token logprobs
(``<run dir>/token_logprobs.jsonl``) and, for prompt/response data (by default the synthetic task), exact-match
accuracy of greedy answers. Works on ``model.checkpoint=<HF folder>`` (tokenizer from its tokenizer.json, or
``data.tokenizer_path``) and on a random-init model.

The loss is token-weighted over the whole split: sum of -log p(target) over every target token / their number
(prompt tokens of prompt/response data are not targets), computed like the training loss (model-dtype logits,
fp32 softmax).
"""

from __future__ import annotations

import math
import time
from typing import Any

from omegaconf import DictConfig

from mtrain.config import ConfigError
from mtrain.lit import LogprobWriter, MoELitModule, build_trainer, greedy_accuracy, peak_tflops
from mtrain.lit.setup import start_job, write_json
from mtrain.tasks.sft import accuracy_examples

SPLITS = ("auto", "val", "train")


def run(cfg: DictConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    if cfg.task.split not in SPLITS:
        raise ConfigError(f"task.split={cfg.task.split!r} is not one of {', '.join(SPLITS)}")
    cfg, plan, out, s = start_job(cfg)
    t = cfg.task
    dm, model = s.datamodule, s.model
    split = t.split if t.split != "auto" else ("val" if dm.val_set is not None else "train")
    loader = dm.eval_dataloader(split)

    writer = LogprobWriter(out / "token_logprobs.jsonl", dm.tokenizer) if t.save_logprobs else None
    if t.compile and s.cuda and s.fsdp is None:  # trainer=fsdp: eager (torch.compile + FSDP2 not validated yet)
        model.compile_layers()
    lit = MoELitModule(model, peak_tflops=peak_tflops(t.peak_tflops, s.cuda), logprob_sink=writer, sharding=s.fsdp)
    extra = {"limit_val_batches": t.max_batches} if t.max_batches else {}
    trainer = build_trainer(cfg, out, checkpoint=False, **extra)
    try:
        trainer.validate(lit, dataloaders=loader, verbose=False)
    finally:
        if writer is not None:
            writer.close()
    v = lit.last_val or {}

    metrics: dict[str, Any] = {
        "task": "eval",
        "model": cfg.model.name,
        "checkpoint": cfg.model.checkpoint,
        "dtype": cfg.model.dtype,
        "moe_gate_fp32": plan.moe_gate_fp32,
        "data": dm.cfg.name,
        "split": split,
        "loss": v.get("loss"),
        "ppl": v.get("ppl"),
        "target_tokens": v.get("target_tokens"),
        "tokens": v.get("tokens"),
        "seconds": v.get("seconds"),
        "tokens_per_s": v.get("tokens_per_s"),
        "tokens_per_s_steady": v.get("tokens_per_s_steady"),  # without the first batch (compile, warm-up)
    }
    if "mfu" in v:
        metrics["mfu"] = v["mfu"]
    examples = accuracy_examples(cfg, dm) if split == "val" else []
    if examples:
        acc = greedy_accuracy(model, dm, examples, device=s.device, batch_size=t.gen_batch_size,
                              max_new_tokens=t.max_new_tokens)
        metrics.update({"accuracy": acc["accuracy"], "accuracy_examples": acc["n"], "accuracy_samples": acc["samples"]})
    files = {"run_dir": str(out), "metrics": str(out / "metrics.json")}
    if writer is not None:
        files["token_logprobs"] = str(writer.path)
    metrics["wall_s"] = time.perf_counter() - t_start
    metrics["files"] = files
    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
        loss = metrics["loss"]
        line = f"loss {loss:.4f}, perplexity {metrics['ppl']:.3f}" if loss is not None and math.isfinite(loss) else "no tokens"
        if "accuracy" in metrics:
            line += f", accuracy {100 * metrics['accuracy']:.1f}% ({metrics['accuracy_examples']} examples)"
        tps = metrics.get("tokens_per_s_steady") or metrics.get("tokens_per_s")
        if tps:
            line += f", {tps:,.0f} tokens/s"
        print(f"\nmtrain eval ({split} split, {metrics['target_tokens']} target tokens): {line}")
        print(f"  {'run dir':<12} {out}\n  {'metrics':<12} metrics.json")
        if writer is not None:
            print(f"  {'logprobs':<12} token_logprobs.jsonl ({writer.rows} rows)")
    return metrics
