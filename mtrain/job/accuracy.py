"""Exact-match accuracy of greedy answers on prompt/response examples (the synthetic task's val split by default)."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional, Sequence

import torch
from omegaconf import DictConfig

from mtrain.data import MTrainDataModule
from mtrain.models import MoECausalLM
from mtrain.models.decoding import Decoder
from mtrain.parallel import is_sharded, root_unsharded
from mtrain.rl.engines import RolloutRequest, SamplingConfig

log = logging.getLogger("mtrain")


def accuracy_examples(cfg: DictConfig, dm: MTrainDataModule) -> list:
    """The val examples to score greedy answers on (``task.accuracy``: null = synthetic data only)."""
    want = cfg.task.accuracy if cfg.task.accuracy is not None else dm.is_synthetic
    if not want:
        return []
    if not dm.val_examples:
        log.warning("task.accuracy: the val split has no prompt/response examples; accuracy skipped")
    return dm.val_examples[: cfg.task.max_accuracy_examples]


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
    engine=None,
) -> Dict[str, Any]:
    """Greedy-decode an answer for every ``{"prompt", "response"}`` example (prompts batched, stopping at eos) and
    score it with ``dm.check_answer`` (synthetic: recomputes the answer; else stripped exact match). Decoding goes
    through ``engine`` (a :class:`mtrain.rl.engines.RolloutEngine` holding the model's weights, e.g. GRPO's) or, by
    default, the fast decoder over ``model`` itself (CUDA graphs on a GPU, eager when sharded).

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
        with root_unsharded(model):  # sharded (trainer=fsdp): every rank decodes the same prompts
            decode = _decode_with(engine, model, dm, max_new_tokens)
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                gen = decode([dm.encode_prompt(e["prompt"]) for e in chunk])
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


def _decode_with(engine, model: MoECausalLM, dm: MTrainDataModule, max_new_tokens: int):
    """prompts -> greedy Generation, through ``engine`` or a decoder over ``model``."""
    if engine is not None:
        sampling = SamplingConfig(max_new_tokens, temperature=0.0)
        return lambda prompts: engine.generate(RolloutRequest(prompts, sampling)).gen
    decoder = Decoder(model, graphs=False if is_sharded(model) else None)
    eos = [dm.eos_id] if dm.eos_id is not None else []
    return lambda prompts: decoder.generate(prompts, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=dm.pad_id)
