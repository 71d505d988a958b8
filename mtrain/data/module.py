"""The LightningDataModule and its factory.

Batches are ``{"input_ids": LongTensor[B, S], "targets": LongTensor[B, S]}`` with targets already shifted (the
model's logits at position j are scored against ``targets[:, j]``; -100 = no loss). S <= ``max_length``, and
S == ``max_length`` with packing or ``pad_to_max_length``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import lightning as L
from torch.utils.data import DataLoader
from tokenizers import Tokenizer

from mtrain.data import synthetic
from mtrain.data.config import DataConfig, to_data_config
from mtrain.data.errors import DataError
from mtrain.data.sampler import EpochSampler, ResumableLoader
from mtrain.data.datasets import Collator, Record, TokenDataset, encode_records, make_dataset, read_records
from mtrain.data.tokenizer import load_tokenizer, special_ids, synthetic_tokenizer


class MTrainDataModule(L.LightningDataModule):
    """Synthetic task or JSONL/text files, tokenized with ``tokenizer``, as padded or packed batches.

    After ``setup()``: ``train_set``/``val_set`` (``TokenDataset``; ``val_set`` None without validation data),
    ``val_examples`` (raw ``{"prompt", "response"}`` dicts of the val split — the synthetic problems, or the
    prompt/response records of a JSONL val split — for generation and exact-match accuracy).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer):
        super().__init__()
        self.cfg = to_data_config(cfg).validate()
        self.tokenizer = tokenizer
        self.pad_id, self.bos_id, self.eos_id = special_ids(
            tokenizer, self.cfg.bos_token, self.cfg.eos_token, self.cfg.pad_token
        )
        if not self.cfg.add_bos:
            self.bos_id = None
        self.train_set: Optional[TokenDataset] = None
        self.val_set: Optional[TokenDataset] = None
        self.val_examples: List[Dict[str, str]] = []
        self.train_examples: List[Dict[str, str]] = []

    # -- info ----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Tokenizer size including added tokens (a model's embedding must be at least this big)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def is_synthetic(self) -> bool:
        return self.cfg.name == "synthetic"

    def encode_prompt(self, prompt: str) -> List[int]:
        """Token ids a generator should start from: ``[bos] + prompt``, exactly as in training."""
        bos = [self.bos_id] if self.bos_id is not None else []
        return bos + self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids: List[int]) -> str:
        """Text of generated ids, cut at the first eos, special tokens dropped."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_answer(self, example: Dict[str, str], generated_text: str) -> bool:
        """Exact match: the synthetic checker (recomputes the answer), else stripped text == stripped response."""
        if self.is_synthetic:
            return synthetic.check_answer(example["prompt"], generated_text)
        return generated_text.strip() == example["response"].strip()

    # -- building ------------------------------------------------------------------------------------------------
    def _encode(self, records: List[Record]) -> TokenDataset:
        c = self.cfg
        ex = encode_records(records, self.tokenizer, c.max_length, c.truncation, self.bos_id, self.eos_id)
        return make_dataset(ex, c.max_length, c.packing)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        c = self.cfg
        if c.name == "synthetic":
            train, val = synthetic.generate_splits(c.task, c.num_digits, c.num_train, c.num_val, c.seed)
            tr = [Record(f"synthetic train #{i}", prompt=e["prompt"], response=e["response"]) for i, e in enumerate(train)]
            va = [Record(f"synthetic val #{i}", prompt=e["prompt"], response=e["response"]) for i, e in enumerate(val)]
        else:
            tr = read_records(c.name, c.train_path, c.text_unit)
            if c.val_path:
                va = read_records(c.name, c.val_path, c.text_unit)
            elif c.val_fraction > 0:
                if len(tr) < 2:
                    raise DataError(f"{c.train_path}: only {len(tr)} example, cannot hold out data.val_fraction="
                                    f"{c.val_fraction}. Fix: add examples, set data.val_path, or val_fraction=0.")
                order = list(range(len(tr)))
                random.Random(f"mtrain-val-split:{c.seed}").shuffle(order)
                n_val = min(len(tr) - 1, max(1, round(c.val_fraction * len(tr))))
                val_idx = set(order[:n_val])
                va = [tr[i] for i in sorted(val_idx)]
                tr = [r for i, r in enumerate(tr) if i not in val_idx]
            else:
                va = []
        self.train_examples = [{"prompt": r.prompt, "response": r.response} for r in tr if r.is_pair]
        self.val_examples = [{"prompt": r.prompt, "response": r.response} for r in va if r.is_pair]
        self.train_set = self._encode(tr)
        self.val_set = self._encode(va) if va else None

    # -- loaders -------------------------------------------------------------------------------------------------
    def _collator(self) -> Collator:
        c = self.cfg
        return Collator(self.pad_id, c.max_length if (c.packing or c.pad_to_max_length) else None)

    def _loader(self, ds: TokenDataset, shuffle: bool) -> DataLoader:
        c = self.cfg
        return ResumableLoader(
            ds,
            batch_size=c.batch_size,
            # epoch e's order is a function of (seed, e), sharded over ranks, resumable mid-epoch (kill + resume
            # trains on the batches the interrupted run had not reached, in the same order)
            sampler=EpochSampler(len(ds), c.seed, shuffle=shuffle),
            num_workers=c.num_workers,
            persistent_workers=c.num_workers > 0,
            collate_fn=self._collator(),
            # packed training rows all have max_length positions; dropping the last partial batch keeps every batch
            # the same shape, so compiled layers are not recompiled at each epoch end (rows reshuffle every epoch)
            drop_last=shuffle and c.packing and len(ds) >= c.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    def eval_dataloader(self, split: str = "val") -> DataLoader:
        """Unshuffled batches of ``split`` ("val" or "train") for evaluation; DataError if that split is empty."""
        if self.train_set is None:
            self.setup("validate")
        if split not in ("val", "train"):
            raise DataError(f"split={split!r}: use 'val' or 'train'")
        ds = self.val_set if split == "val" else self.train_set
        if ds is None:
            raise DataError("there is no validation data. Fix: set data.val_path (or data.val_fraction > 0), or "
                            "evaluate the train file with task.split=train.")
        return self._loader(ds, shuffle=False)

    def val_dataloader(self) -> Union[DataLoader, List]:
        """Val batches in file order; ``[]`` (Lightning then skips validation) when there is no val data."""
        if self.train_set is None:
            self.setup("validate")
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


def build_datamodule(cfg: Any, tokenizer: Union[Tokenizer, str, Path, None] = None) -> MTrainDataModule:
    """The data module for ``cfg`` (DataConfig / DictConfig / dict).

    Tokenizer: the given one (a ``Tokenizer``, or a checkpoint folder / tokenizer.json path), else
    ``data.tokenizer_path``, else — synthetic only — ``synthetic_tokenizer()``. JSONL/text data without any
    tokenizer is a ``DataError``.
    """
    cfg = to_data_config(cfg).validate()
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is None and cfg.tokenizer_path:
        tokenizer = load_tokenizer(cfg.tokenizer_path)
    if tokenizer is None:
        if cfg.name != "synthetic":
            raise DataError(
                f"data={cfg.name} needs the model's tokenizer. Fix: load a checkpoint (model.checkpoint=/folder "
                f"with tokenizer.json) or set data.tokenizer_path=/path/to/tokenizer.json."
            )
        tokenizer = synthetic_tokenizer()
    return MTrainDataModule(cfg, tokenizer)
