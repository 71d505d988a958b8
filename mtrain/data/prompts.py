"""Prompt sets for RL fine-tuning (GRPO): a list of examples ``{"prompt": str, "answer": str, ...}``.

A GRPO step samples responses to each ``prompt`` and scores them with a reward function (``mtrain.data.rewards``),
which gets the whole example, so any extra keys of a JSONL line are kept and passed on.

Sources
  * ``synthetic_prompts``: the built-in synthetic tasks (``mtrain.data.synthetic``); the answer is the task's
    response, so ``rewards.exact_match`` agrees with ``synthetic.check_answer``.
  * ``read_prompt_jsonl``: one JSON object per line, ``{"prompt": ..., "answer": ...}``; a folder means all
    ``*.jsonl`` files in it, sorted by name; blank lines are skipped. A numeric answer is kept as its string
    (``42`` -> ``"42"``). ``"answer"`` may be left out only with ``require_answer=False`` (a user reward function
    that does not need one). Each bad line -> ``DataError`` naming ``file:line``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

from mtrain.data import synthetic
from mtrain.data.datasets import _files, _read, json_object, jsonl_lines
from mtrain.data.errors import DataError

PromptExample = Dict[str, Any]  # {"prompt": str, "answer": str (absent only without require_answer), ...}


def synthetic_prompts(
    task: str = "add", num_digits: int = 2, n_train: int = 5000, n_val: int = 200, seed: int = 0
) -> Tuple[List[PromptExample], List[PromptExample]]:
    """``(train, val)`` prompt sets of a synthetic task: the same problems as ``synthetic.generate_splits``
    with the same arguments (disjoint, deterministic), each as ``{"prompt", "answer"}``."""
    train, val = synthetic.generate_splits(task, num_digits, n_train, n_val, seed)
    return ([{"prompt": e["prompt"], "answer": e["response"]} for e in train],
            [{"prompt": e["prompt"], "answer": e["response"]} for e in val])


def read_prompt_jsonl(path: str, require_answer: bool = True) -> List[PromptExample]:
    """Prompt examples of a JSONL file or folder (see module doc). Bad line or no examples -> ``DataError``."""
    out: List[PromptExample] = []
    for file in _files(path, "jsonl"):
        for n, line in enumerate(jsonl_lines(_read(file)), start=1):
            if line.strip():
                out.append(_parse(line, f"{file}:{n}", n, require_answer))
    if not out:
        raise DataError(f"{path}: no prompts in it (empty, or only blank lines). Fix: write one "
                        f"{{\"prompt\": ..., \"answer\": ...}} object per line.")
    return out


def _parse(line: str, where: str, n: int, require_answer: bool) -> PromptExample:
    obj = json_object(line, where, n, '{"prompt": ..., "answer": ...}')
    if "prompt" not in obj:
        keys = ", ".join(map(repr, obj)) or "none"
        raise DataError(f"{where}: no \"prompt\" (keys: {keys}). Fix: give line {n} a \"prompt\" string.")
    if not isinstance(obj["prompt"], str):
        raise DataError(f"{where}: \"prompt\" must be a string, got {type(obj['prompt']).__name__}. Fix: quote it.")
    if not obj["prompt"].strip():
        raise DataError(f"{where}: \"prompt\" is empty. Fix: remove line {n} or give it a prompt.")
    if "answer" not in obj:
        if require_answer:
            raise DataError(f"{where}: no \"answer\"; the built-in rewards compare the response with it. Fix: give "
                            f"line {n} an \"answer\", or use your own reward function that needs none.")
        return obj
    a = obj["answer"]
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        if not math.isfinite(a):
            raise DataError(f"{where}: \"answer\" is {a}, not a finite number. Fix: give line {n} a real answer.")
        obj["answer"] = str(a)
    elif not isinstance(a, str):
        raise DataError(f"{where}: \"answer\" must be a string or a number, got {type(a).__name__}. Fix: write it "
                        f"as a string (\"...\") or a JSON number.")
    elif not a.strip():
        raise DataError(f"{where}: \"answer\" is empty, so an empty response would be rewarded. Fix: fill it, or "
                        f"leave the key out if your reward function needs no answer.")
    return obj
