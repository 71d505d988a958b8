"""Shared pieces of the side-by-side benchmarks: the model shapes users care about, identical weights in mtrain and
transformers, CUDA-event timing, the measured matmul rate and the analytic MoE FLOP count."""

from __future__ import annotations

import datetime
import json
import os
import statistics
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from mtrain.lit.clipping import clip_in_fused_step, is_fused
from mtrain.models import FAMILIES, PrecisionPolicy, build_model
from mtrain.models.flops import eval_flops_per_token, peak_tflops, train_flops_per_token

SHAPES = {
    # Qwen3-30B-A3B
    "qwen3_30b_a3b": (
        "qwen3_moe",
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_attention_heads=32,
             num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
             norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960),
    ),
    # GLM-4.5-Air
    "glm45_air": (
        "glm4_moe",
        dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_attention_heads=96,
             num_key_value_heads=8, head_dim=128, n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8,
             moe_intermediate_size=1408, first_k_dense_replace=1, partial_rotary_factor=0.5, attention_bias=True,
             n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True, use_qk_norm=False,
             rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072),
    ),
    # tiny shapes for a CPU smoke run of the scripts
    "tiny_qwen": ("qwen3_moe", dict(vocab_size=512, hidden_size=64, num_experts=8, moe_intermediate_size=32)),
    "tiny_glm": ("glm4_moe", dict(vocab_size=512, hidden_size=64, n_routed_experts=8, moe_intermediate_size=32)),
}


def mtrain_config(shape: str, layers: int):
    family, kw = SHAPES[shape]
    return FAMILIES[family].config(**kw, num_hidden_layers=layers)


def make_mtrain(cfg, device, *, rl: bool, seed: int = 0):
    return build_model(cfg, dtype=torch.bfloat16, device=device, policy=PrecisionPolicy(rl, rl), seed=seed)


def make_hf(cfg, device, state_dict=None, dtype=torch.bfloat16):
    """The transformers model of the same architecture (grouped_mm experts, SDPA attention), optionally with the
    given weights. transformers is the oracle, imported only here."""
    import transformers

    hf_cfg_dict = cfg.to_hf()
    cls_name = hf_cfg_dict["architectures"][0]
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**{
        k: v for k, v in hf_cfg_dict.items() if k not in ("architectures", "model_type", "dtype")
    })
    config._attn_implementation = "sdpa"
    config._experts_implementation = "grouped_mm"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, cls_name)(config)
    finally:
        torch.set_default_dtype(default)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def ours_step(model, ids, targets, **loss_kw):
    """One fwd+bwd of mtrain's causal-LM loss (targets already shifted; ``loss_kw``: e.g. ``chunk_size``)."""
    model.loss(ids, targets, **loss_kw).backward()


def hf_step(model, ids, targets):
    """One fwd+bwd of transformers' causal-LM loss (it shifts the labels itself)."""
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def run_cli(overrides: list[str], cwd, run_dir, nproc: int | None = None) -> tuple[dict, float]:
    """``python -m mtrain <overrides>`` in a subprocess, as a user runs it (``nproc``: under ``torchrun --standalone
    --nproc_per_node nproc``): its ``metrics.json`` and the command's wall seconds; exits with the job's stderr tail
    if it fails."""
    import subprocess
    import sys
    import time

    launch = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    t0 = time.perf_counter()
    done = subprocess.run([*launch, "-m", "mtrain", *overrides, f"hydra.run.dir={run_dir}"], cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"the CLI run failed ({done.returncode}): {done.stderr[-2000:]}")
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f), wall


def batch(cfg, batch_size: int, seq: int, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq), device=device, generator=g)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return ids, targets


def time_cuda(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call, CUDA events (synchronize-free timing of the device work)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: a @ b, warmup=5, iters=20)
    return 2 * n**3 / t / 1e12


def flops_per_token(cfg, seq: int, train: bool) -> float:
    """Model FLOPs per token: the one count of the project (``mtrain.models.flops``, what ``task=sft`` logs): 6 (train)
    or 2 (forward) x active matmul params, plus attention scores over the full ``seq`` (PaLM's count)."""
    return train_flops_per_token(cfg, seq) if train else eval_flops_per_token(cfg, seq)


def spec_peak_tflops() -> float:
    """MFU's denominator, the same everywhere in mtrain: the card's dense bf16 spec peak (989 TFLOP/s for H100/H200
    SXM; ``mtrain.models.flops.PEAK_BF16_TFLOPS``). The measured matmul rate is printed beside it as context."""
    peak = peak_tflops(None, True)
    if not peak:
        raise SystemExit(f"{card()}: no dense bf16 peak known for this card; add it to PEAK_BF16_TFLOPS")
    return peak


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def append_results(rows: list[dict], path: str = "benchmarks/results.jsonl") -> None:
    out = os.environ.get("OUT")
    stamp = {"date": datetime.date.today().isoformat(), "card": card()}
    lines = [json.dumps(stamp | r) for r in rows]
    for p in filter(None, [path, out and os.path.join(out, os.path.basename(path))]):
        with open(p, "a") as f:
            f.write("\n".join(lines) + "\n")


# -- a bare data-parallel training loop (what the scaling benchmark times; the CLI path is Lightning's) ---------------
Batch = tuple[torch.Tensor, torch.Tensor]


def synthetic_batches(vocab_size: int, batch: int, seq: int, steps: int, seed: int = 0) -> list[Batch]:
    """``steps`` global batches of random token ids with next-token targets (last position ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        out.append((ids, targets))
    return out


def rank_slice(b: Batch, rank: int, world: int) -> Batch:
    """This rank's contiguous rows of a global batch (the batch size must divide by the world size)."""
    ids, targets = b
    if ids.shape[0] % world:
        raise ValueError(f"global batch {ids.shape[0]} does not divide over {world} ranks")
    n = ids.shape[0] // world
    return ids[rank * n : (rank + 1) * n], targets[rank * n : (rank + 1) * n]


def global_mean(x: torch.Tensor) -> float:
    """Mean of a scalar over ranks (SUM / world: gloo has no AVG)."""
    if not dist.is_initialized():
        return x.item()
    y = x.detach().float().clone()
    dist.all_reduce(y)
    return y.item() / dist.get_world_size()


def clip_as_the_cli(optimizer: torch.optim.Optimizer, parameters, max_norm: float) -> None:
    """Clip by total norm the way the CLI does: inside a fused AdamW's step (``mtrain.lit.clipping``), else
    ``clip_grad_norm_``."""
    if is_fused(optimizer):
        clip_in_fused_step(optimizer, parameters, max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def train_steps(
    model,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch] | Iterable[Batch],
    *,
    device: torch.device | str = "cpu",
    grad_clip: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """One optimizer step per (global) batch; this rank uses its rows. Returns the global mean loss of each step."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    losses = []
    model.train()
    for step, b in enumerate(batches):
        ids, targets = (t.to(device) for t in rank_slice(b, rank, world))
        loss = model.loss(ids, targets)
        loss.backward()
        if grad_clip is not None:
            clip_as_the_cli(optimizer, model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(global_mean(loss))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
