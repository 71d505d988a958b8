"""``task=info``: no model; show the composed precision plan, where each value came from, and the run dir."""

from __future__ import annotations

import os
from typing import Any

from mtrain.config import ENV_VAR
from mtrain.job import Job, write_json


def run(job: Job) -> dict[str, Any]:
    cfg, plan, out = job.cfg, job.plan, job.dir
    p = cfg.precision
    info: dict[str, Any] = {
        "task": "info",
        "model": cfg.model.name,
        "checkpoint": cfg.model.checkpoint,
        "rl": cfg.rl.mode,
        "experiment": job.choices.get("experiment"),
        "trainer": job.choices.get("trainer"),
        "trainer_precision": cfg.trainer.precision,
        "moe_gate_fp32": plan.moe_gate_fp32,
        "moe_gate_fp32_source": plan.source,
        "rope_fp32": plan.rope_fp32,
        "rope_fp32_source": plan.rope_source,
        "rl_alignment": plan.rl,
        "rl_alignment_source": plan.rl_source,
        "exact_rollout": plan.exact_rollout,
        "exact_rollout_source": plan.exact_source,
        "dtype": p.dtype.value,
        "dtype_source": p.dtype.source,
        ENV_VAR: os.environ.get(ENV_VAR),
        "warnings": list(plan.warnings),
        "run_dir": str(out),
    }
    env = os.environ.get(ENV_VAR)
    rows = [
        ("model", f"{info['model']} (checkpoint: {info['checkpoint'] or 'none, random init'})", ""),
        ("rl", info["rl"], f"RL alignment {'on' if plan.rl else 'off'} [{plan.rl_source}]"),
        ("moe_gate_fp32", info["moe_gate_fp32"], plan.source),
        ("rope_fp32", info["rope_fp32"], plan.rope_source),
        ("exact_rollout", info["exact_rollout"], plan.exact_source),
        ("dtype", info["dtype"], info["dtype_source"]),
        (ENV_VAR, "unset" if env is None else repr(env), "in this job's environment"),
        ("run dir", str(out), ""),
    ]
    print("mtrain info")
    for key, value, source in rows:
        value = "true" if value is True else "false" if value is False else value
        print(f"  {key:<14} {str(value):<12} {source}".rstrip())
    for w in plan.warnings:
        print(f"  warning: {w}")
    write_json(out / "info.json", info)
    return info
