"""``task=eval``: mean token loss and perplexity of a model on a dataset, tokens/s, optional per-token logprobs
(``<run dir>/token_logprobs.jsonl``) and, for prompt/response data (by default the synthetic task), exact-match
accuracy of greedy answers. Works on ``model.checkpoint=<HF folder>`` (tokenizer from its tokenizer.json, or
``data.tokenizer_path``) and on a random-init model.

The loss is token-weighted over the whole split: sum of -log p(target) over every target token / their number
(prompt tokens of prompt/response data are not targets), computed like the training loss (model-dtype logits,
fp32 softmax).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, List

import torch

from mtrain.data import IGNORE
from mtrain.job import Job, accuracy_examples, greedy_accuracy, start_job, write_json
from mtrain.job.preflight import routing_settings
from mtrain.lit import MoELitModule, build_trainer
from mtrain.lit.routing import RoutingHealth
from mtrain.models.flops import peak_tflops

def run(job: Job) -> dict[str, Any]:
    t_start = time.perf_counter()
    cfg, plan, out = job.cfg, job.plan, job.dir
    s = start_job(job)
    t = cfg.task
    dm, model = s.datamodule, s.model
    split = str(t.split) if t.split != "auto" else ("val" if dm.val_set is not None else "train")  # a typed choice
    loader = dm.eval_dataloader(split)

    writer = LogprobWriter(out / "token_logprobs.jsonl", dm.tokenizer) if t.save_logprobs else None
    if t.compile and s.cuda and s.fsdp is None:  # trainer=fsdp: eager (torch.compile + FSDP2 not validated yet)
        model.compile_layers()
    lit = MoELitModule(model, peak_tflops=peak_tflops(t.peak_tflops, s.cuda), logprob_sink=writer, sharding=s.fsdp)
    extra = {"limit_val_batches": t.max_batches} if t.max_batches else {}
    health = RoutingHealth.of(routing_settings(cfg.model), out, every=cfg.trainer.log_every_n_steps, mode="eval")
    trainer = build_trainer(cfg, out, checkpoint=False, multirun=job.multirun, callbacks=[health], **extra)
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
    metrics.update(health.results())  # routing_maxvio, ... over the whole evaluation
    files = {"run_dir": str(out), "metrics": str(out / "metrics.json")}
    if trainer.is_global_zero:
        files |= health.plot(out, f"eval {cfg.model.name}")  # expert_load.png, maxvio_curve.png
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
        if metrics.get("routing_maxvio") is not None:
            line += f", MaxVio {metrics['routing_maxvio']:.3f}"
        tps = metrics.get("tokens_per_s_steady") or metrics.get("tokens_per_s")
        if tps:
            line += f", {tps:,.0f} tokens/s"
        print(f"\nmtrain eval ({split} split, {metrics['target_tokens']} target tokens): {line}")
        print(f"  {'run dir':<12} {out}\n  {'metrics':<12} metrics.json")
        if writer is not None:
            print(f"  {'logprobs':<12} token_logprobs.jsonl ({writer.rows} rows)")
    return metrics


class LogprobWriter:
    """Writes one JSON line per evaluated row: its input ids and, for every scored position, the target token,
    its string and its logprob. Trailing positions without a target (padding) are dropped."""

    def __init__(self, path: str | Path, tokenizer=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("w")
        self.tokenizer = tokenizer
        self.rows = 0

    def __call__(self, batch: dict, logprobs: torch.Tensor) -> None:
        ids, targets, lp = batch["input_ids"].cpu(), batch["targets"].cpu(), logprobs.float().cpu()
        for i in range(ids.shape[0]):
            t = targets[i]
            scored = (t != IGNORE).nonzero().flatten()
            end = int(scored[-1]) + 1 if scored.numel() else 0
            pos: List[int] = scored.tolist()
            row = {
                "row": self.rows,
                "input_ids": ids[i, :end].tolist(),
                "positions": pos,
                "target_ids": t[scored].tolist(),
                "logprobs": [round(float(x), 6) for x in lp[i, scored]],
            }
            if self.tokenizer is not None:
                row["target_tokens"] = [self.tokenizer.id_to_token(int(x)) for x in row["target_ids"]]
            self._f.write(json.dumps(row) + "\n")
            self.rows += 1

    def close(self) -> None:
        self._f.close()
