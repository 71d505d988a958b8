"""The CLI's training loop against a bare loop doing the same work, in one run on one GPU.

    python benchmarks/sft_cli.py                  # Qwen3-30B-A3B shape, 4 layers, packed 4 x 2048 tokens, rl=on
    python benchmarks/sft_cli.py --smoke          # tiny model on the CPU: checks the script, times nothing real

Both sides get the same job: the config ``python -m mtrain experiment=qwen3_30b_a3b_shape rl=on <OVERRIDES>``
composes, the same data (its packed train loader), model (bf16, fp32 gate, compiled decoder layers), fused AdamW with
mtrain's parameter groups and warm-up + cosine schedule, and gradient clipping at ``trainer.gradient_clip_val``
(folded into the fused AdamW step, as the CLI does: ``mtrain.lit.clipping``).

* bare: ``loss.backward(); clip; opt.step(); sched.step(); opt.zero_grad()`` in a Python loop, timed with a device
  sync only at the ends of the timed window (after warm-up steps);
* CLI: ``python -m mtrain ...`` in a subprocess; its ``tokens_per_s_steady`` from ``metrics.json`` (training steps
  after the first; validation and checkpoint writes are timed apart).

Prints both and their ratio; appends a row to benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import append_results, card, clip_as_the_cli, run_cli  # noqa: E402

GPU = ["experiment=qwen3_30b_a3b_shape", "rl=on", "data.packing=true", "data.max_length=2048", "data.batch_size=4",
       "data.num_digits=3", "data.num_train=60000", "data.num_val=64", "task.accuracy=false",
       "task.accuracy_before=false", "task.export=false", "trainer.enable_progress_bar=false"]
SMOKE = ["model=qwen3_moe", "data.num_train=512", "data.num_val=16", "data.batch_size=16", "task.accuracy=false",
         "task.accuracy_before=false", "task.export=false", "trainer.enable_progress_bar=false"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from mtrain.cli import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="cli_loop"):
        return hydra_compose("config", overrides=overrides)


def bare_loop(overrides: list[str], warmup: int, steps: int) -> dict:
    """Tokens/s of fwd + bwd + clip + fused AdamW + schedule over ``steps`` steps after ``warmup``, on the job's data."""
    from mtrain.job import Job, start_job
    from mtrain.lit.optim import WarmupCosine, param_groups

    job = Job.prepare(compose(overrides), tempfile.mkdtemp())
    cfg, s = job.cfg, start_job(job)
    model, device = s.model, s.device
    if cfg.task.compile and s.cuda:
        model.compile_layers()
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.task.weight_decay), lr=cfg.task.lr, betas=tuple(cfg.task.betas),
                            eps=cfg.task.eps, **({"fused": True} if s.cuda else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.task.warmup_steps, warmup + steps,
                                                                cfg.task.min_lr_ratio))
    clip = cfg.trainer.gradient_clip_val
    batches = []  # data loading is not what this times; as many epochs as the steps need
    while len(batches) < warmup + steps:
        batches += list(itertools.islice(s.datamodule.train_dataloader(), warmup + steps - len(batches)))
    batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]

    def step(b):
        model.loss(b["input_ids"], b["targets"]).backward()
        if clip:
            clip_as_the_cli(opt, model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if s.cuda else (lambda: None)
    for b in batches[:warmup]:
        step(b)
    sync()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(b["input_ids"].numel() for b in batches[warmup:])
    return {"tokens_per_s": tokens / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if s.cuda else 0.0}


def cli_run(overrides: list[str], steps: int) -> dict:
    m, wall = run_cli([*overrides, f"trainer.max_steps={steps}"], REPO, Path(tempfile.mkdtemp()) / "run")
    return {"tokens_per_s_steady": m["tokens_per_s_steady"], "tokens_per_s": m["tokens_per_s"],
            "seconds": m["seconds"], "job_wall_s": wall, "checkpoint_written_gb": m.get("checkpoint_written_gb"),
            "checkpoint_write_mb_per_s": m.get("checkpoint_write_mb_per_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps of the bare loop; the CLI runs steps + warmup")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args()
    overrides = SMOKE if a.smoke else GPU
    if not a.smoke:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --smoke)"
    bare = bare_loop(overrides, a.warmup, a.steps)
    print(f"bare loop: {bare['tokens_per_s']:,.0f} tokens/s (peak {bare['peak_gib']:.1f} GiB)", flush=True)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    cli = cli_run(overrides, a.warmup + a.steps)
    ratio = cli["tokens_per_s_steady"] / bare["tokens_per_s"]
    print(f"CLI loop:  {cli['tokens_per_s_steady']:,.0f} tokens/s after the first step; "
          f"{ratio:.1%} of the bare loop; job {cli['job_wall_s']:.0f} s, seconds {cli['seconds']}; checkpoints "
          f"{cli['checkpoint_written_gb']} GB written at {cli['checkpoint_write_mb_per_s']} MB/s")
    if not a.no_save and not a.smoke:
        append_results([{"bench": "cli_loop", "overrides": " ".join(overrides), "steps": a.warmup + a.steps,
                         "bare_tok_s": round(bare["tokens_per_s"]), "cli_tok_s_steady": round(cli["tokens_per_s_steady"]),
                         "ratio": round(ratio, 3), "cli_seconds": cli["seconds"], "card": card(),
                         **{k: cli[k] for k in ("checkpoint_written_gb", "checkpoint_write_mb_per_s")}}])


if __name__ == "__main__":
    main()
