"""Rollouts from an external engine (vLLM, SGLang, FastDeploy, ...) as a JSONL file: one sampled response per line.

A line::

    {"prompt_ids": [1, 7, 9], "response_ids": [12, 4, 2], "logprobs": [-0.11, -0.02, -0.3],
     "reward": 1.0,                       # optional: else the task's reward function scores the decoded response
     "routed_experts": ...,               # optional: in the declared layout (mtrain.data.rollout_formats)
     "prompt": "37+48=", "answer": "85"}  # optional text fields, handed to the reward function as the example

* ``logprobs``: the engine's logprob of each response token, one per ``response_ids`` entry, <= 0, taken at the
  declared temperature (the trainer's logprobs are then taken at the same temperature).
* ``routed_experts``: the top-k experts every layer chose at each position that produced a next token
  (``seq_len - 1`` positions, ``seq_len`` = prompt + response tokens), in the layout the file or the config declares
  (:mod:`mtrain.data.rollout_formats`): never guessed from a byte count.
* An optional first line declares the file: ``{"rollout_format": "sglang", "logprob_temperature": 0.7}`` (and
  ``"layout": {...}`` to override fields of the format). The config can say the same (``task.rollout_format``,
  ``task.rollout_logprob_temperature``, ``task.rollout_layout``); where both say something they must agree.
* Lines are read in order; ``group_size`` consecutive lines are one prompt's group (same ``prompt_ids``).

Any bad line -> ``DataError`` naming ``file:line`` and the fix; nothing is trained. :func:`rollout_lines` writes the
same format from an in-process :class:`~mtrain.models.generate.Generation` (``task.dump_rollouts``, format
``mtrain``, after :func:`header_line`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mtrain.data.datasets import _read, json_object, jsonl_lines
from mtrain.data.errors import DataError
from mtrain.data.rollout_formats import FORMATS, SCALED_BY_DEFAULT, DeclaredLayout, decode_routing, resolve_layout
from mtrain.models.generate import Generation

EXAMPLE = '{"prompt_ids": [...], "response_ids": [...], "logprobs": [...], "reward": 1.0}'
_RESERVED = ("prompt_ids", "response_ids", "logprobs", "reward", "routed_experts")
HEADER = "rollout_format"  # the key that makes a file's first line its declaration


@dataclass(frozen=True)
class ModelShape:
    """What a rollout file is checked against."""

    vocab_size: int
    num_layers: int
    moe_layers: tuple[int, ...]
    top_k: int
    num_experts: int


@dataclass(frozen=True)
class FileSettings:
    """What the config declares about a rollout file (None: the file's header says, or nothing is declared)."""

    format: Optional[str] = None
    temperature: Optional[float] = None
    layout: Optional[Dict[str, Any]] = None  # field overrides of the format (mtrain.data.rollout_formats)


@dataclass
class RolloutRow:
    prompt_ids: List[int]
    response_ids: List[int]
    logprobs: List[float]
    reward: Optional[float]
    routed: Optional[torch.Tensor]  # [len(prompt) + len(response) - 1, moe_layers, k] int32
    example: Dict[str, Any]  # the line's other fields (prompt/answer text for a reward function)
    where: str


def read_rollout_file(path: str | Path, shape: ModelShape, settings: FileSettings = FileSettings()
                      ) -> tuple[List[RolloutRow], DeclaredLayout]:
    """Every line of a rollout file, checked against the model and the declared layout (see the module doc), and
    that declaration (whose ``temperature`` the trainer's logprobs must use)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: no such rollout file. Fix: give task.rollouts_path a JSONL file, one response per "
                        f"line: {EXAMPLE}")
    lines = [(n, line) for n, line in enumerate(jsonl_lines(_read(p)), start=1) if line.strip()]
    header = None
    if lines:
        first = json_object(lines[0][1], f"{p}:{lines[0][0]}", lines[0][0], EXAMPLE)
        if (HEADER in first or "logprob_temperature" in first) and "prompt_ids" not in first:
            header, lines = (f"{p}:{lines[0][0]}", first), lines[1:]
    declared = declare(header, settings, str(p))
    rows = [_parse(json_object(line, f"{p}:{n}", n, EXAMPLE), f"{p}:{n}", shape, declared) for n, line in lines]
    if not rows:
        raise DataError(f"{p}: no rollouts in it. Fix: write one response per line: {EXAMPLE}")
    if any(r.reward is None for r in rows) and any(r.reward is not None for r in rows):
        missing = next(r for r in rows if r.reward is None)
        raise DataError(f"{missing.where}: no \"reward\" while other lines have one. Fix: give every line its "
                        "reward, or none (then task.reward scores them all).")
    return rows, declared


def header_line(temperature: float = 1.0, scoring: str = "standard") -> dict:
    """The first line of a rollout file mtrain writes: its format, its logprobs' temperature, and the path that
    computed them (``invariant``: the exact engine's)."""
    return {HEADER: "mtrain", "logprob_temperature": temperature, "scoring": scoring}


def declare(header: Optional[tuple[str, dict]], settings: FileSettings, path: str) -> Optional[DeclaredLayout]:
    """The file's declared layout from its header line and the config (they must agree where both speak), or None
    when neither declares a format (then a line with ``routed_experts`` is refused)."""
    where, h = header if header is not None else (f"{path}:1", {})
    fmt = _agree(where, "rollout_format", h.get(HEADER), "task.rollout_format", settings.format)
    temp = _agree(where, "logprob_temperature", h.get("logprob_temperature"), "task.rollout_logprob_temperature",
                  settings.temperature)
    cfg_layout = {k: v for k, v in (settings.layout or {}).items() if v is not None}  # the schema's unset fields
    if fmt is None:
        if h.get("layout") or cfg_layout:
            raise DataError(f"{where}: a routing layout is given without a rollout format. Fix: set "
                            "task.rollout_format (or \"rollout_format\" in the header line); custom takes the "
                            "layout alone.")
        return None if temp is None else DeclaredLayout("undeclared", FORMATS["mtrain"], _temperature(where, temp))
    if temp is None:
        if fmt in SCALED_BY_DEFAULT:
            raise DataError(f"{where}: rollout format {fmt}: at which temperature were its logprobs taken? "
                            f"{SCALED_BY_DEFAULT[fmt]}. Fix: set task.rollout_logprob_temperature (the sampling "
                            "temperature, or 1.0 for unscaled logprobs), or \"logprob_temperature\" in the header.")
        temp = 1.0
    layout = h.get("layout") or {}
    if not isinstance(layout, dict):
        raise DataError(f"{where}: \"layout\" must be an object of routing layout fields. Fix: e.g. "
                        '{"layers": "moe"}.')
    layout = {k: _agree(where, f"layout.{k}", layout.get(k), f"task.rollout_layout.{k}", cfg_layout.get(k))
              for k in {**layout, **cfg_layout}}
    scoring = h.get("scoring", "standard")
    if scoring not in ("standard", "invariant"):
        raise DataError(f"{where}: \"scoring\" = {scoring!r} is not standard or invariant. Fix: leave it out (mtrain "
                        "writes it).")
    try:
        return DeclaredLayout(fmt, resolve_layout(fmt, layout),
                              _temperature(where, temp), scoring)
    except ValueError as e:
        raise DataError(f"{where}: {e}. Fix: declare one of the engines' formats or a complete custom layout.") from None


def _agree(where: str, key: str, in_file: Any, cfg_key: str, in_cfg: Any) -> Any:
    if in_file is not None and in_cfg is not None and in_file != in_cfg:
        raise DataError(f"{where}: the file declares {key}={in_file!r}, the config {cfg_key}={in_cfg!r}. Fix: drop "
                        "one of them, or make them agree.")
    return in_file if in_file is not None else in_cfg


def _temperature(where: str, t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not _finite(t) or t <= 0:
        raise DataError(f"{where}: logprob temperature {t!r} is not a number > 0. Fix: give the temperature the "
                        "engine took its logprobs at (1.0: unscaled).")
    return float(t)


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


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond float's range
        return False


def _parse(obj: dict, where: str, shape: ModelShape, declared: Optional[DeclaredLayout]) -> RolloutRow:
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
        if not _finite(x) or x > 0:
            raise DataError(f"{where}: logprobs[{i}] = {x} is not a log-probability (finite, <= 0). Fix: write the "
                            "engine's logprobs, not probabilities or logits.")
    reward = obj.get("reward")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                               or not _finite(reward)):
        raise DataError(f"{where}: \"reward\" = {reward!r} is not a finite number. Fix: write a number, or leave it "
                        "out to score with task.reward.")
    routed = obj.get("routed_experts")
    routed_t = None
    if routed is not None:
        if declared is None or declared.name == "undeclared":
            raise DataError(f"{where}: \"routed_experts\" without a declared layout; mtrain does not guess one. Fix: "
                            f"set task.rollout_format={'|'.join(FORMATS)} (the engine that wrote the file), or "
                            f"start the file with a header line {{\"{HEADER}\": \"sglang\", "
                            "\"logprob_temperature\": 1.0}.")
        routed_t = decode_routing(routed, len(prompt) + len(response), where, declared, shape.num_layers,
                                  shape.moe_layers, shape.top_k, shape.num_experts)
    example = {k: v for k, v in obj.items() if k not in _RESERVED}
    return RolloutRow(prompt, response, [float(x) for x in lps], None if reward is None else float(reward), routed_t,
                      example, where)


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


def generation_of(rows: Sequence[RolloutRow], max_new_tokens: int, pad_id: int, device,
                  temperature: float = 1.0) -> Generation:
    """The rows as the in-process engine would have returned them, in the buffer width ``longest prompt +
    max_new_tokens`` (the in-process rollout's width, so the trainer computes in the same shapes); their logprobs
    were taken at ``temperature``."""
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
    gen = Generation(tokens, logprobs, routing, lengths, prompts, longest + max_new_tokens, prompt_routing,
                     temperature)
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
