"""Exact-match accuracy of greedy answers, and the per-token logprob file of ``task=eval``."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mtrain.data import IGNORE, MTrainDataModule
from mtrain.models import MoECausalLM
from mtrain.models.generate import generate
from mtrain.parallel import root_unsharded


def _eager():
    """Generation has changing shapes and a Python KV cache: run compiled layers eagerly for it."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@torch.no_grad()
def greedy_accuracy(
    model: MoECausalLM,
    dm: MTrainDataModule,
    examples: Sequence[Dict[str, str]],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    max_new_tokens: Optional[int] = None,
    keep: int = 3,
) -> Dict[str, Any]:
    """Greedy-decode an answer for every ``{"prompt", "response"}`` example (prompts batched, left-padded, stopping
    at eos) and score it with ``dm.check_answer`` (synthetic: recomputes the answer; else stripped exact match).

    ``max_new_tokens`` defaults to the longest reference answer + 2 (a longer output cannot be an exact match).
    Returns ``{"accuracy", "n", "seconds", "samples": the first ``keep`` right and ``keep`` wrong answers}``.
    """
    examples = list(examples)
    if not examples:
        return {"accuracy": None, "n": 0, "seconds": 0.0, "samples": []}
    if device is not None:
        model.to(device)
    if max_new_tokens is None:
        longest = max(len(dm.tokenizer.encode(e["response"], add_special_tokens=False).ids) for e in examples)
        max_new_tokens = longest + 2
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    correct, samples = 0, []
    try:
        with _eager(), root_unsharded(model):  # sharded (trainer=fsdp): every rank decodes the same prompts
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                prompts = [dm.encode_prompt(e["prompt"]) for e in chunk]
                gen = generate(model, prompts, max_new_tokens=max_new_tokens, eos_ids=[dm.eos_id], pad_id=dm.pad_id,
                               temperature=0.0)
                for j, e in enumerate(chunk):
                    text = dm.decode(gen.tokens[j, : int(gen.lengths[j])].tolist())
                    ok = dm.check_answer(e, text)
                    correct += ok
                    if sum(s["ok"] == bool(ok) for s in samples) < keep:  # up to ``keep`` right and ``keep`` wrong
                        samples.append({"prompt": e["prompt"], "expected": e["response"], "got": text, "ok": bool(ok)})
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(examples), "n": len(examples), "seconds": time.perf_counter() - t0,
            "samples": samples}


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
