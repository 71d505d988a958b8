"""Reading JSONL and plain-text files, encoding examples, and laying them out as padded or packed rows.

Sources
  * JSONL: one JSON object per line, either ``{"text": ...}`` or ``{"prompt": ..., "response": ...}`` (both
    kinds may be mixed; other keys are ignored). Blank lines are allowed and are not examples.
  * Plain text (``data.text_unit``): ``paragraph`` (default) — one document per blank-line separated block,
    stripped of surrounding whitespace, inner newlines kept; ``line`` — one document per non-blank line;
    ``file`` — one document per file.
  * A folder path means all ``*.jsonl`` (resp. ``*.txt``/``*.md``) files in it, sorted by name.

Encoding of one example (``tokenizer.encode(..., add_special_tokens=False)``, special tokens added here)::

    ids = [bos] + prompt_ids + response_ids + [eos]        # bos only if the tokenizer has one and data.add_bos
    ids = [bos] + text_ids + [eos]

Prompt and response are encoded separately, so the boundary between them is exact. Each token carries a flag
"is a target": the response tokens and eos of prompt/response data, every token of text data, but never the first
token of an example (bos or not: nothing before it predicts it) nor a prompt token. Targets are shifted here::

    input_ids = ids[:-1]
    targets   = [ids[j+1] if flag[j+1] else -100 for j in range(len(ids) - 1)]

so an example of n tokens takes n - 1 positions and fits a row when n <= max_length + 1. Longer examples:
``truncation="error"`` -> ``DataError`` naming file:line; ``"truncate"`` keeps the first max_length + 1 tokens (the
tail and eos are lost; a prompt that leaves no response token is still an error, never a silent skip).

Layout
  * padding: one example per row; the collator right-pads ``input_ids`` with pad_id and ``targets`` with -100,
    to the longest row of the batch (or to max_length with ``pad_to_max_length``).
  * packing: whole examples are packed greedily, in order, into rows of exactly max_length positions (an example
    is never split; each row's tail is padded as above). Inside a row the position holding example A's eos has
    as target the first token of example B, which is never a target, so it is -100: packing keeps exactly the
    same (context-within-example, target) pairs as padding; only attention across examples differs (no
    cross-document mask).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from tokenizers import Tokenizer

from mtrain.data.errors import DataError
from mtrain.models.loss import IGNORE_INDEX

IGNORE = IGNORE_INDEX  # the one ignore index (mtrain.models.loss)
Example = Tuple[List[int], List[bool]]  # token ids, is-target flags


@dataclass
class Record:
    """One raw example and where it came from (``file:line``) for error messages."""

    where: str
    text: Optional[str] = None
    prompt: Optional[str] = None
    response: Optional[str] = None

    @property
    def is_pair(self) -> bool:
        return self.response is not None


# ---------------------------------------------------------------------------------------------------------------
# reading


def json_object(line: str, where: str, n: int, example: str) -> dict:
    """Line ``n`` of a JSONL file as a dict; ``DataError`` naming ``where`` and showing ``example`` otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}). Fix: make line {n} one complete "
                        f"JSON object, e.g. {example}.") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}. Fix: write {example} on line {n}.")
    return obj


def _files(path: str, kind: str) -> List[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        patterns = ("*.jsonl",) if kind == "jsonl" else ("*.txt", "*.md")
        files = sorted(f for pat in patterns for f in p.glob(pat) if f.is_file())
        if not files:
            raise DataError(f"{p}: folder has no {' or '.join(patterns)} files. Fix: point data.train_path / "
                            f"data.val_path at a {kind} file or a folder holding some.")
        return files
    if not p.is_file():
        raise DataError(f"{p}: no such file. Fix: set data.train_path / data.val_path to an existing {kind} file "
                        f"(relative paths are relative to the directory you start from; Hydra does not chdir).")
    return [p]


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text ({e}). Fix: re-encode the file as UTF-8.") from e


def jsonl_lines(text: str) -> List[str]:
    """The lines of a JSONL file: split at newlines only (``str.splitlines`` would also split inside a JSON string
    holding U+2028, U+2029 or U+0085, which ``json.dumps(ensure_ascii=False)`` writes as they are)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_jsonl(path: str) -> List[Record]:
    """Records of a JSONL file or folder. Each bad line -> ``DataError`` with ``file:line``."""
    out: List[Record] = []
    for file in _files(path, "jsonl"):
        for n, line in enumerate(jsonl_lines(_read(file)), start=1):
            if not line.strip():
                continue
            where = f"{file}:{n}"
            obj = json_object(line, where, n, '{"text": ...} or {"prompt": ..., "response": ...}')
            if "prompt" in obj or "response" in obj:
                if "prompt" not in obj or "response" not in obj:
                    missing = "response" if "prompt" in obj else "prompt"
                    raise DataError(f"{where}: has {'prompt' if missing == 'response' else 'response'} but no "
                                    f"\"{missing}\". Fix: give both \"prompt\" and \"response\", or use \"text\".")
                rec = Record(where, prompt=obj["prompt"], response=obj["response"])
                fields = {"prompt": rec.prompt, "response": rec.response}
            elif "text" in obj:
                rec = Record(where, text=obj["text"])
                fields = {"text": rec.text}
            else:
                keys = ", ".join(map(repr, obj)) or "none"
                raise DataError(f"{where}: no \"text\" and no \"prompt\"+\"response\" (keys: {keys}). Fix: rename "
                                f"the field on line {n} to \"text\", or give \"prompt\" and \"response\".")
            for k, v in fields.items():
                if not isinstance(v, str):
                    raise DataError(f"{where}: \"{k}\" must be a string, got {type(v).__name__}. Fix: quote it.")
            if rec.text is not None and not rec.text.strip():
                raise DataError(f"{where}: \"text\" is empty. Fix: remove line {n} or give it text.")
            if rec.response is not None and not rec.response:
                raise DataError(f"{where}: \"response\" is empty, nothing to learn. Fix: remove line {n} or fill it.")
            out.append(rec)
    return out


def read_text(path: str, unit: str = "paragraph") -> List[Record]:
    """Documents of a plain-text file or folder (see module doc for ``unit``)."""
    out: List[Record] = []
    for file in _files(path, "text"):
        content = _read(file)
        if unit == "file":
            if content.strip():
                out.append(Record(f"{file}:1", text=content.strip()))
            continue
        lines = content.splitlines()
        if unit == "line":
            out += [Record(f"{file}:{n}", text=l) for n, l in enumerate(lines, start=1) if l.strip()]
            continue
        block: List[str] = []
        start = 0
        for n, line in enumerate(lines + [""], start=1):  # sentinel blank line flushes the last block
            if line.strip():
                if not block:
                    start = n
                block.append(line)
            elif block:
                out.append(Record(f"{file}:{start}", text="\n".join(block).strip()))
                block = []
    return out


def read_records(kind: str, path: str, text_unit: str = "paragraph") -> List[Record]:
    """Records from ``path``; an empty result is a ``DataError``."""
    recs = read_jsonl(path) if kind == "jsonl" else read_text(path, text_unit)
    if not recs:
        raise DataError(f"{path}: no examples in it (empty, or only blank lines). Fix: point data.train_path / "
                        f"data.val_path at a {kind} file with data.")
    return recs


# ---------------------------------------------------------------------------------------------------------------
# encoding


def encode_records(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    max_length: int,
    truncation: str = "error",
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
) -> List[Example]:
    """Token ids and is-target flags of each record (see module doc). Too long -> ``DataError`` or truncation."""
    limit = max_length + 1  # tokens; n tokens -> n - 1 positions
    bos = [bos_id] if bos_id is not None else []
    eos = [eos_id] if eos_id is not None else []

    def enc(texts: List[str]) -> List[List[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []

    pairs = [r for r in records if r.is_pair]
    texts = [r for r in records if not r.is_pair]
    p_ids = iter(enc([r.prompt for r in pairs]))
    r_ids = iter(enc([r.response for r in pairs]))
    t_ids = iter(enc([r.text for r in texts]))

    out: List[Example] = []
    for r in records:
        if r.is_pair:
            head, tail = bos + next(p_ids), next(r_ids) + eos
            ids = head + tail
            flags = [False] * len(head) + [True] * len(tail)
        else:
            ids = bos + next(t_ids) + eos
            flags = [True] * len(ids)
        flags[0] = False  # nothing predicts an example's first token
        if len(ids) > limit:
            what = "prompt + response" if r.is_pair else "text"
            if truncation != "truncate":
                raise DataError(
                    f"{r.where}: {what} is {len(ids)} tokens (bos/eos included), more than data.max_length="
                    f"{max_length} allows ({limit}). Fix: raise data.max_length, shorten or split the example, or "
                    f"set data.truncation=truncate to keep its first {limit} tokens."
                )
            ids, flags = ids[:limit], flags[:limit]
            if not any(flags):
                raise DataError(
                    f"{r.where}: the prompt alone fills data.max_length={max_length}; truncation would leave no "
                    f"response token to learn. Fix: raise data.max_length or shorten the prompt."
                )
        out.append((ids, flags))
    return out


def shift(ids: Sequence[int], flags: Sequence[bool]) -> Tuple[List[int], List[int]]:
    """``(input_ids, targets)`` of one token sequence: inputs ``ids[:-1]``, targets ``ids[1:]`` or -100."""
    return list(ids[:-1]), [t if f else IGNORE for t, f in zip(ids[1:], flags[1:])]


def pack(examples: Sequence[Example], max_length: int) -> List[Example]:
    """Concatenate whole examples, in order, into token runs of at most ``max_length + 1`` tokens."""
    rows: List[Example] = []
    ids: List[int] = []
    flags: List[bool] = []
    for e_ids, e_flags in examples:
        if ids and len(ids) + len(e_ids) > max_length + 1:
            rows.append((ids, flags))
            ids, flags = [], []
        ids.extend(e_ids)
        flags.extend(e_flags)
    if ids:
        rows.append((ids, flags))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# datasets and collation


class TokenDataset(Dataset):
    """Rows of ``{"input_ids", "targets"}`` 1-D LongTensors (variable length unless packed/padded upstream)."""

    def __init__(self, rows: Sequence[Tuple[List[int], List[int]]]):
        self.rows = [(torch.tensor(i, dtype=torch.long), torch.tensor(t, dtype=torch.long)) for i, t in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        x, y = self.rows[i]
        return {"input_ids": x, "targets": y}

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))

    @property
    def num_target_tokens(self) -> int:
        return sum(int((y != IGNORE).sum()) for _, y in self.rows)


def make_dataset(examples: Sequence[Example], max_length: int, packing: bool) -> TokenDataset:
    """Shifted rows, one per example, or packed (several whole examples per row)."""
    if packing:
        examples = pack(examples, max_length)
    return TokenDataset([shift(ids, flags) for ids, flags in examples])


class Collator:
    """Stacks rows into ``{"input_ids": [B,S], "targets": [B,S]}``; right-pads inputs with ``pad_id`` and
    targets with -100 to the longest row, or to ``pad_to`` when given (packing and ``pad_to_max_length``)."""

    def __init__(self, pad_id: int, pad_to: Optional[int] = None):
        self.pad_id = pad_id
        self.pad_to = pad_to

    def __call__(self, batch: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        s = self.pad_to or max(len(b["input_ids"]) for b in batch)
        x = torch.full((len(batch), s), self.pad_id, dtype=torch.long)
        y = torch.full((len(batch), s), IGNORE, dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            x[i, :n] = b["input_ids"]
            y[i, :n] = b["targets"]
        return {"input_ids": x, "targets": y}
