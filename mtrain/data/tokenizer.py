"""Tokenizers: the synthetic task's character-level tokenizer, loading a checkpoint's ``tokenizer.json``, and
finding the special tokens (pad/bos/eos) of either.

Everything goes through the ``tokenizers`` library and the ``tokenizer.json`` format, so the synthetic tokenizer
can be exported next to a model checkpoint and read back like any Hugging Face one.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from mtrain.data.errors import DataError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
# every character the synthetic tasks use (and a few spare ones); one token each
CHARS = string.digits + "+-*=,:;() " + string.ascii_lowercase

# tried in order; the first present in the vocabulary wins
BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")

PathLike = Union[str, Path]


def synthetic_tokenizer() -> Tokenizer:
    """Character-level tokenizer for the synthetic tasks: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3,
    then one token per character of ``CHARS`` (digits, ``+-*=,:;()``, space, a-z); 50 tokens in all."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character its own piece
    tok.decoder = decoders.Fuse()  # decode joins characters without separators
    tok.add_special_tokens(list(SPECIALS))
    return tok


def load_tokenizer(folder_or_file: PathLike) -> Tokenizer:
    """Read ``tokenizer.json`` from a checkpoint folder (or the given ``.json`` file)."""
    path = Path(folder_or_file).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        where = f"no tokenizer.json in folder {path}" if path.is_dir() else f"tokenizer file {file} does not exist"
        raise DataError(
            f"{where}. Fix: point model.checkpoint (or data.tokenizer_path) at a folder holding the model's "
            f"tokenizer.json (the Hugging Face 'fast' tokenizer file), or copy that file there."
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exceptions
        raise DataError(f"{file}: cannot be read as a tokenizers tokenizer.json ({e}). Fix: use the model's "
                        f"tokenizer.json as written by Hugging Face tokenizers/transformers.") from e


def save_tokenizer(tok: Tokenizer, folder: PathLike) -> Path:
    """Write ``tokenizer.json`` into ``folder``; also a minimal ``tokenizer_config.json`` (special tokens,
    ``PreTrainedTokenizerFast``) when the folder has none, so ``AutoTokenizer`` can read an exported checkpoint.
    An existing ``tokenizer_config.json`` (e.g. with a chat template) is left alone. Returns the tokenizer.json path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "tokenizer.json"
    tok.save(str(file))
    cfg_file = folder / "tokenizer_config.json"
    if not cfg_file.exists():
        pad, bos, eos = special_ids(tok)
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.id_to_token(bos) if bos is not None else None,
            "eos_token": tok.id_to_token(eos),
            "pad_token": tok.id_to_token(pad),
            "unk_token": UNK if tok.token_to_id(UNK) is not None else None,
            "clean_up_tokenization_spaces": False,
        }
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return file


def _first(tok: Tokenizer, candidates: Sequence[str]) -> Optional[int]:
    """First candidate that is an added (special) token; failing that, first one in the plain vocabulary
    (a byte-level BPE vocabulary may hold e.g. ``</s>`` as ordinary text, which must not beat a real special)."""
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    for c in candidates:
        if c in added:
            return added[c]
    for c in candidates:
        i = tok.token_to_id(c)
        if i is not None:
            return i
    return None


def _override(tok: Tokenizer, token: Optional[str], what: str) -> Optional[int]:
    if token is None:
        return None
    i = tok.token_to_id(token)
    if i is None:
        raise DataError(f"data.{what}_token={token!r} is not in the tokenizer's vocabulary. Fix: use a token that "
                        f"the tokenizer.json defines (see its 'added_tokens'), or unset data.{what}_token.")
    return i


def special_ids(
    tok: Tokenizer,
    bos_token: Optional[str] = None,
    eos_token: Optional[str] = None,
    pad_token: Optional[str] = None,
) -> Tuple[int, Optional[int], int]:
    """``(pad_id, bos_id, eos_id)`` of a tokenizer.

    Explicit token strings win; else the first of ``*_CANDIDATES`` in the vocabulary. This gives
    ``<pad>/<bos>/<eos>`` for the synthetic tokenizer, ``<|endoftext|>`` as eos and pad for Qwen and GLM base
    tokenizers (instruct models that end turns with ``<|im_end|>`` can say ``data.eos_token='<|im_end|>'``).
    ``bos_id`` is None when there is none (Qwen, GLM: nothing is prepended). ``pad_id`` falls back to ``eos_id``
    (padded positions never carry a target, so its value does not matter). No eos at all -> ``DataError``.
    """
    eos = _override(tok, eos_token, "eos")
    if eos is None:
        eos = _first(tok, EOS_CANDIDATES)
    if eos is None:
        raise DataError("the tokenizer has none of the usual end-of-sequence tokens "
                        f"{', '.join(EOS_CANDIDATES)}. Fix: set data.eos_token=<its end-of-text token>.")
    bos = _override(tok, bos_token, "bos")
    if bos is None:
        bos = _first(tok, BOS_CANDIDATES)
    pad = _override(tok, pad_token, "pad")
    if pad is None:
        pad = _first(tok, PAD_CANDIDATES)
    if pad is None:
        pad = eos
    return pad, bos, eos
