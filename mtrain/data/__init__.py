"""Data layer: tokenizers, the built-in synthetic task, JSONL/text datasets and the LightningDataModule.

Batches: ``{"input_ids": LongTensor[B, S], "targets": LongTensor[B, S]}``, targets already shifted, -100 = no loss.
"""

from mtrain._lazy import lazy_exports

_EXPORTS = {
    "DataConfig": "config",
    "DataError": "errors",
    "IGNORE": "datasets",
    "Collator": "datasets",
    "Record": "datasets",
    "TokenDataset": "datasets",
    "encode_records": "datasets",
    "make_dataset": "datasets",
    "pack": "datasets",
    "read_jsonl": "datasets",
    "read_records": "datasets",
    "read_text": "datasets",
    "shift": "datasets",
    "MTrainDataModule": "module",
    "build_datamodule": "module",
    "to_data_config": "config",
    "TASKS": "synthetic",
    "check_answer": "synthetic",
    "generate": "synthetic",
    "generate_splits": "synthetic",
    "solve": "synthetic",
    "load_tokenizer": "tokenizer",
    "save_tokenizer": "tokenizer",
    "special_ids": "tokenizer",
    "synthetic_tokenizer": "tokenizer",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
