"""task=eval: its loss on a saved HF checkpoint equals a hand computation; logprobs file; random init; own text data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from mtrain.job import Job
from mtrain.models import save_pretrained
from mtrain.config import prepare_run
from mtrain.data import build_datamodule, save_tokenizer, synthetic_tokenizer
from mtrain.models import build_model, from_pretrained
from mtrain.models import Glm4MoeConfig
from mtrain.tasks import eval as eval_task


def _run(tmp_path, monkeypatch, *overrides):
    monkeypatch.chdir(tmp_path)
    cfg, _ = prepare_run(compose_cfg(["task=eval", "trainer.enable_progress_bar=false", *overrides]))
    return eval_task.run(Job.prepare(cfg)), cfg


@pytest.mark.parametrize("save_logprobs", [False, True])  # the default path (model.loss) and the logprobs path
def test_eval_on_hf_checkpoint_matches_hand_computed_loss(tmp_path, monkeypatch, save_logprobs):
    ckpt = tmp_path / "ckpt"
    model = build_model(Glm4MoeConfig(), seed=3)
    with torch.no_grad():  # a non-trivial router: a routing difference would change the loss
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    save_pretrained(model, ckpt)
    save_tokenizer(synthetic_tokenizer(), ckpt)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = ["data.num_train=8", "data.num_val=24", "data.batch_size=8"]
    m, cfg = _run(run_dir, monkeypatch, f"model.checkpoint={ckpt}", f"task.save_logprobs={save_logprobs}", *data)

    # by hand: the same val batches, full logits from model(ids), torch's cross-entropy
    ref = from_pretrained(ckpt)
    dm = build_datamodule(cfg.data, ckpt)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.eval_dataloader("val"):
            logits = ref(batch["input_ids"]).float()
            total += F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((batch["targets"] != -100).sum())
    assert m["split"] == "val" and m["target_tokens"] == count
    assert m["loss"] == pytest.approx(total / count, rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert m["tokens_per_s"] > 0 and m["accuracy_examples"] == 24 and 0.0 <= m["accuracy"] <= 1.0
    if not save_logprobs:
        assert not (run_dir / "token_logprobs.jsonl").exists()
        return

    rows = [json.loads(line) for line in (run_dir / "token_logprobs.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    assert -sum(sum(r["logprobs"]) for r in rows) == pytest.approx(total, rel=1e-4)
    assert all(r["target_tokens"][-1] == "<eos>" and len(r["target_ids"]) == len(r["positions"]) for r in rows)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["loss"] == pytest.approx(m["loss"]) and saved["files"]["token_logprobs"].endswith("token_logprobs.jsonl")


def test_eval_random_init_on_own_text_file(tmp_path, monkeypatch):
    """No checkpoint: a random model of model.arch, grown to the tokenizer; plain text (no val split: auto = train);
    loss near ln(vocab) and no accuracy for text data."""
    tok = tmp_path / "tokenizer.json"
    save_tokenizer(synthetic_tokenizer(), tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"{i}+{i}={2 * i}" for i in range(40)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    m, _ = _run(run_dir, monkeypatch, "data=text", f"data.train_path={text}", f"data.tokenizer_path={tok}",
                "data.max_length=32", "data.batch_size=16", "model=qwen3_moe", "task.max_batches=2")
    assert m["split"] == "train" and m["checkpoint"] is None
    assert abs(m["loss"] - math.log(64)) < 0.5  # arch vocab_size 64 >= the tokenizer's 50
    assert "accuracy" not in m and 0 < m["tokens"] <= 2 * 16 * 32  # task.max_batches=2 batches of 16 rows


def test_eval_without_val_data_and_split_val_is_a_clear_error(tmp_path, monkeypatch):
    from mtrain.data import DataError

    save_tokenizer(synthetic_tokenizer(), tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("1+1=2\n\n2+2=4\n")
    with pytest.raises(DataError, match="no validation data"):
        _run(tmp_path, monkeypatch, "data=text", f"data.train_path={text}", f"data.tokenizer_path={tmp_path}",
             "task.split=val")
