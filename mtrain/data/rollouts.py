"""Rollouts from an external engine (vLLM, SGLang, FastDeploy, ...) as a JSONL file: one sampled response per line.

A line::

    {"prompt_ids": [1, 7, 9], "response_ids": [12, 4, 2], "logprobs": [-0.11, -0.02, -0.3],
     "reward": 1.0,                       # optional: else the task's reward function scores the decoded response
     "routed_experts": [[[3, 5], ...]],   # optional: nested lists, or base64 of little-endian int32
     "prompt": "37+48=", "answer": "85"}  # optional text fields, handed to the reward function as the example

* ``logprobs``: the engine's logprob of each response token (temperature 1), one per ``response_ids`` entry, <= 0.
* ``routed_experts``: the top-k experts every MoE layer chose at each position that produced a next token, in the
  layouts engines emit: SGLang ``[seq_len - 1, layers, top_k]`` (``seq_len`` = prompt + response tokens), vLLM
  ``[seq_len, layers, top_k]`` (the last position is dropped). ``layers`` is the model's MoE layers, or all its
  layers (the dense ones are then dropped). Base64 strings are decoded with the model's layer count and top_k.
* Lines are read in order; ``group_size`` consecutive lines are one prompt's group (same ``prompt_ids``).

Any bad line -> ``DataError`` naming ``file:line`` and the fix; nothing is trained. :func:`rollout_lines` writes the
same format from an in-process :class:`~mtrain.models.generate.Generation` (``task.dump_rollouts``).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mtrain.data.datasets import _read, json_object
from mtrain.data.errors import DataError
from mtrain.models.generate import Generation

EXAMPLE = '{"prompt_ids": [...], "response_ids": [...], "logprobs": [...], "reward": 1.0}'
_RESERVED = ("prompt_ids", "response_ids", "logprobs", "reward", "routed_experts")


@dataclass(frozen=True)
class ModelShape:
    """What a rollout file is checked against."""

    vocab_size: int
    num_layers: int
    moe_layers: tuple[int, ...]
    top_k: int
    num_experts: int


@dataclass
class RolloutRow:
    prompt_ids: List[int]
    response_ids: List[int]
    logprobs: List[float]
    reward: Optional[float]
    routed: Optional[torch.Tensor]  # [len(prompt) + len(response) - 1, moe_layers, k] int32
    example: Dict[str, Any]  # the line's other fields (prompt/answer text for a reward function)
    where: str


def read_rollout_file(path: str | Path, shape: ModelShape) -> List[RolloutRow]:
    """Every line of a rollout file, checked against the model (see the module doc)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: no such rollout file. Fix: give task.rollouts_path a JSONL file, one response per "
                        f"line: {EXAMPLE}")
    rows = []
    for n, line in enumerate(_read(p).splitlines(), start=1):
        if line.strip():
            rows.append(_parse(json_object(line, f"{p}:{n}", n, EXAMPLE), f"{p}:{n}", shape))
    if not rows:
        raise DataError(f"{p}: no rollouts in it. Fix: write one response per line: {EXAMPLE}")
    return rows


def _ids(obj: dict, key: str, where: str, vocab: int) -> List[int]:
    v = obj.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise DataError(f"{where}: \"{key}\" must be a non-empty list of token ids. Fix: write the engine's "
                        f"{key.replace('_', ' ')} as a JSON list of integers.")
    bad = [x for x in v if not 0 <= x < vocab]
    if bad:
        raise DataError(f"{where}: \"{key}\" has id {bad[0]} outside the model's vocabulary [0, {vocab}). Fix: the "
                        "rollouts must come from this model's tokenizer.")
    return v


def _parse(obj: dict, where: str, shape: ModelShape) -> RolloutRow:
    prompt = _ids(obj, "prompt_ids", where, shape.vocab_size)
    response = _ids(obj, "response_ids", where, shape.vocab_size)
    lps = obj.get("logprobs")
    if not isinstance(lps, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lps):
        raise DataError(f"{where}: \"logprobs\" must be a list of numbers (the engine's logprob of each response "
                        "token). Fix: ask the engine for sampled-token logprobs.")
    if len(lps) != len(response):
        raise DataError(f"{where}: {len(lps)} logprobs for {len(response)} response tokens. Fix: one logprob per "
                        "response token.")
    for i, x in enumerate(lps):
        if not math.isfinite(x) or x > 0:
            raise DataError(f"{where}: logprobs[{i}] = {x} is not a log-probability (finite, <= 0). Fix: write the "
                            "engine's logprobs, not probabilities or logits.")
    reward = obj.get("reward")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                               or not math.isfinite(reward)):
        raise DataError(f"{where}: \"reward\" = {reward!r} is not a finite number. Fix: write a number, or leave it "
                        "out to score with task.reward.")
    routed = obj.get("routed_experts")
    routed_t = _routed(routed, len(prompt) + len(response), where, shape) if routed is not None else None
    example = {k: v for k, v in obj.items() if k not in _RESERVED}
    return RolloutRow(prompt, response, [float(x) for x in lps], None if reward is None else float(reward), routed_t,
                      example, where)


def _routed(value: Any, seq_len: int, where: str, shape: ModelShape) -> torch.Tensor:
    moe, k = len(shape.moe_layers), shape.top_k
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            raise DataError(f"{where}: \"routed_experts\" is not valid base64. Fix: encode the int32 array with "
                            "base64, or write nested lists.") from None
        flat = torch.frombuffer(bytearray(raw), dtype=torch.int32) if len(raw) % 4 == 0 else None
        layers = next((L for L in (moe, shape.num_layers) if flat is not None and flat.numel() % (L * k) == 0
                       and flat.numel() // (L * k) in (seq_len - 1, seq_len)), None)
        if layers is None:
            raise DataError(f"{where}: base64 \"routed_experts\" holds {len(raw)} bytes, not int32 "
                            f"[{seq_len - 1} or {seq_len} positions, {moe} (or {shape.num_layers}) layers, {k}]. "
                            "Fix: export the engine's routed experts of this model and this rollout.")
        t = flat.view(-1, layers, k)
    else:
        try:
            t = torch.tensor(value, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"{where}: \"routed_experts\" must be nested lists of integers [positions, layers, "
                            "top_k]. Fix: write the engine's routed experts as such, or base64 of int32.") from None
        if t.dim() != 3:
            raise DataError(f"{where}: \"routed_experts\" has {t.dim()} dimensions; expected [positions, layers, "
                            "top_k]. Fix: write one [layers, top_k] list per position.")
    positions, layers, kk = t.shape
    if positions not in (seq_len - 1, seq_len):
        raise DataError(f"{where}: \"routed_experts\" covers {positions} positions; prompt + response have {seq_len} "
                        f"tokens, so {seq_len - 1} (SGLang) or {seq_len} (vLLM) are expected. Fix: the routing must "
                        "belong to this line's tokens.")
    if layers not in (moe, shape.num_layers):
        raise DataError(f"{where}: \"routed_experts\" has {layers} layers; the model has {moe} MoE layers (of "
                        f"{shape.num_layers}). Fix: export the routing of this model.")
    if kk != k:
        raise DataError(f"{where}: \"routed_experts\" has top_k {kk}; the model routes to {k}. Fix: export the "
                        "routing of this model.")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= shape.num_experts):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise DataError(f"{where}: \"routed_experts\" has expert id {bad} outside [0, {shape.num_experts}). Fix: "
                        "export the routing of this model.")
    if layers != moe:
        t = t[:, list(shape.moe_layers)]
    return t[: seq_len - 1].to(torch.int32)


def check_groups(rows: Sequence[RolloutRow], group_size: int) -> None:
    """``group_size`` consecutive lines share one prompt; the file holds whole groups."""
    if len(rows) % group_size:
        raise DataError(f"{rows[-1].where}: the file ends in a partial group ({len(rows)} lines, group_size "
                        f"{group_size}). Fix: write {group_size} responses per prompt, or set task.group_size.")
    for g in range(0, len(rows), group_size):
        for r in rows[g + 1 : g + group_size]:
            if r.prompt_ids != rows[g].prompt_ids:
                raise DataError(f"{r.where}: its prompt_ids differ from the group's first line ({rows[g].where}); "
                                f"lines of a group ({group_size} consecutive lines) must share one prompt. Fix: "
                                "write each prompt's responses together, or set task.group_size.")


def generation_of(rows: Sequence[RolloutRow], max_new_tokens: int, pad_id: int, device) -> Generation:
    """The rows as the in-process engine would have returned them, in the buffer width ``longest prompt +
    max_new_tokens`` (the in-process rollout's width, so the trainer computes in the same shapes)."""
    B, N = len(rows), max(len(r.response_ids) for r in rows)
    if N > max_new_tokens:
        long = next(r for r in rows if len(r.response_ids) == N)
        raise DataError(f"{long.where}: {N} response tokens exceed max_new_tokens={max_new_tokens}. Fix: raise "
                        "task.max_new_tokens.")
    prompts = [list(r.prompt_ids) for r in rows]
    longest = max(len(p) for p in prompts)
    tokens = torch.full((B, N), pad_id, dtype=torch.long)
    logprobs = torch.zeros((B, N), dtype=torch.float32)
    lengths = torch.tensor([len(r.response_ids) for r in rows])
    for b, r in enumerate(rows):
        tokens[b, : len(r.response_ids)] = torch.tensor(r.response_ids)
        logprobs[b, : len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
    routing = prompt_routing = None
    if all(r.routed is not None for r in rows):
        L, k = rows[0].routed.shape[1:]
        # buffer position of real position i of row b: longest - len(prompt_b) + i
        full = torch.full((B, longest - 1 + N, L, k), -1, dtype=torch.long)  # -1: not routed by the engine
        for b, r in enumerate(rows):
            start = longest - len(r.prompt_ids)
            full[b, start : start + r.routed.shape[0]] = r.routed.long()
        prompt_routing, routing = full[:, : longest - 1], full[:, longest - 1 :]
    elif any(r.routed is not None for r in rows):
        missing = next(r for r in rows if r.routed is None)
        raise DataError(f"{missing.where}: no \"routed_experts\" while other lines have them. Fix: export routing "
                        "for every line or for none.")
    else:
        routing = torch.zeros((B, N, 0, 0), dtype=torch.long)
    gen = Generation(tokens, logprobs, routing, lengths, prompts, longest + max_new_tokens, prompt_routing)
    return gen.to(device)


def rollout_lines(gen: Generation, rewards: Sequence[float], examples: Sequence[dict]) -> List[dict]:
    """The lines of a rollout file for an in-process generation (the inverse of :func:`generation_of`)."""
    full = gen.buffer_routing().cpu() if gen.prompt_routing is not None else None
    first = gen.first
    out = []
    for b in range(gen.tokens.shape[0]):
        n, p = int(gen.lengths[b]), gen.prompts[b]
        line = {"prompt_ids": list(p), "response_ids": gen.tokens[b, :n].tolist(),
                "logprobs": gen.logprobs[b, :n].tolist(), "reward": float(rewards[b])}
        if full is not None:
            start = first - len(p)
            line["routed_experts"] = full[b, start : start + len(p) + n - 1].tolist()  # SGLang's [seq_len - 1]
        out.append(line | {k: v for k, v in examples[b].items() if k not in _RESERVED})
    return out
