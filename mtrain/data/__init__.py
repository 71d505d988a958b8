"""Data layer: tokenizers, the built-in synthetic task, JSONL/text datasets and the LightningDataModule.

Batches: ``{"input_ids": LongTensor[B, S], "targets": LongTensor[B, S]}``, targets already shifted, -100 = no loss.
"""

from mtrain.data.config import DataConfig
from mtrain.data.errors import DataError
from mtrain.data.datasets import (
    IGNORE,
    Collator,
    Record,
    TokenDataset,
    encode_records,
    make_dataset,
    pack,
    read_jsonl,
    read_records,
    read_text,
    shift,
)
from mtrain.data.module import MTrainDataModule, build_datamodule, to_data_config
from mtrain.data.synthetic import TASKS, check_answer, generate, generate_splits, solve
from mtrain.data.tokenizer import load_tokenizer, save_tokenizer, special_ids, synthetic_tokenizer

__all__ = [
    "DataConfig", "DataError", "IGNORE", "Collator", "Record", "TokenDataset", "encode_records", "make_dataset",
    "pack", "read_jsonl", "read_records", "read_text", "shift", "MTrainDataModule", "build_datamodule",
    "to_data_config", "TASKS", "check_answer", "generate", "generate_splits", "solve", "load_tokenizer",
    "save_tokenizer", "special_ids", "synthetic_tokenizer",
]
