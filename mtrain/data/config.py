"""The typed ``data`` node of the Hydra schema.

``DataConfig`` is a plain dataclass with OmegaConf-compatible field types only, so ``mtrain/config.py`` can use it
as the structured ``data`` node and ``conf/data/*.yaml`` fill it. Defaults are the tiny CPU default run
(synthetic 2-digit addition).

Lengths: ``max_length`` is the number of positions the model sees in one row (the width of ``input_ids`` and
``targets``). An example of ``n`` tokens (``bos`` and ``eos`` included) gives ``n - 1`` positions, since targets
are shifted by one, so it fits when ``n <= max_length + 1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from mtrain.data.errors import DataError
from mtrain.data.synthetic import TASKS

NAMES = ("synthetic", "jsonl", "text")
TRUNCATION = ("error", "truncate")
TEXT_UNITS = ("paragraph", "line", "file")


@dataclass
class DataConfig:
    # which source: "synthetic" (built-in task, own tokenizer) | "jsonl" | "text"
    name: str = "synthetic"
    # jsonl/text: a file, or a folder (all *.jsonl resp. *.txt/*.md files in it, sorted by name)
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    # with no val_path: hold out this fraction of the train examples (seeded) for validation; 0 = no validation
    val_fraction: float = 0.0
    # tokenizer.json file or a folder holding one; used when build_datamodule gets no tokenizer
    # (normally the tokenizer comes from the model checkpoint folder)
    tokenizer_path: Optional[str] = None
    # text: one document per blank-line separated "paragraph", per "line", or per "file"
    text_unit: str = "paragraph"

    max_length: int = 32  # positions per row (see module doc)
    truncation: str = "error"  # "error": too long -> DataError naming file:line; "truncate": keep the head
    packing: bool = False  # True: whole examples packed greedily into rows of exactly max_length
    pad_to_max_length: bool = False  # without packing: pad every batch to max_length (else to its longest row)
    add_bos: bool = True  # prepend bos when the tokenizer has one
    # special-token overrides (token strings) for tokenizers the heuristics in tokenizer.special_ids get wrong
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None

    batch_size: int = 128
    num_workers: int = 0
    seed: int = 0

    # synthetic task
    task: str = "add"  # "add" | "sort" | "reverse"
    num_digits: int = 2
    num_train: int = 5000
    num_val: int = 200

    def validate(self) -> "DataConfig":
        """Raise ``DataError`` on settings that cannot work; return self."""

        def bad(field: str, value, allowed) -> DataError:
            return DataError(f"data.{field}={value!r} is not valid; use one of {', '.join(map(str, allowed))}")

        if self.name not in NAMES:
            raise bad("name", self.name, NAMES)
        if self.truncation not in TRUNCATION:
            raise bad("truncation", self.truncation, TRUNCATION)
        if self.text_unit not in TEXT_UNITS:
            raise bad("text_unit", self.text_unit, TEXT_UNITS)
        if self.max_length < 2:
            raise DataError(f"data.max_length={self.max_length} is too small; use at least 2")
        if self.batch_size < 1:
            raise DataError(f"data.batch_size={self.batch_size} must be >= 1")
        if self.num_workers < 0:
            raise DataError(f"data.num_workers={self.num_workers} must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.name in ("jsonl", "text") and not self.train_path:
            raise DataError(f"data={self.name} needs a file: set data.train_path=/path/to/your.{self.name_ext}")
        if self.name == "synthetic":
            if self.task not in TASKS:
                raise bad("task", self.task, TASKS)
            if self.num_digits < 1 or self.num_train < 1 or self.num_val < 0:
                raise DataError("data.num_digits and data.num_train must be >= 1, data.num_val >= 0")
        return self

    @property
    def name_ext(self) -> str:
        return "jsonl" if self.name == "jsonl" else "txt"


def to_data_config(cfg: Any) -> DataConfig:
    """A validated-type ``DataConfig`` from a DataConfig, an OmegaConf node (typed or not) or a plain dict.
    A mandatory value left at ``???`` (``data.train_path`` of data=jsonl/text) -> ``DataError`` naming it."""
    if isinstance(cfg, DataConfig):
        return cfg
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        for key in cfg:
            if OmegaConf.is_missing(cfg, key):
                raise DataError(f"data.{key} is required (it is ???). Fix: set data.{key}=... on the command line "
                                f"or in your experiment config.")
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, dict):
        raise TypeError(f"expected a DataConfig, DictConfig or dict, got {type(cfg).__name__}")
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise DataError(f"unknown data settings {unknown}; known: {sorted(known)}")
    try:  # type-checks values the way the Hydra schema would (e.g. max_length must be an int)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg))
    except OmegaConfBaseException as e:
        raise DataError(f"bad data settings: {e}".replace("\n", " ")) from None
