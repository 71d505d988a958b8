"""Data layer: synthetic task, tokenizers, JSONL/text reading, masking, padding/packing, errors, DataModule."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers

from mtrain.data import (
    IGNORE,
    Collator,
    DataConfig,
    DataError,
    MTrainDataModule,
    build_datamodule,
    check_answer,
    encode_records,
    generate,
    generate_splits,
    load_tokenizer,
    make_dataset,
    read_jsonl,
    read_records,
    read_text,
    save_tokenizer,
    solve,
    special_ids,
    synthetic_tokenizer,
)
from mtrain.data.datasets import Record

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return synthetic_tokenizer()


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path: Path, rows) -> str:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------------------------
# synthetic task


@pytest.mark.parametrize("task,nd", [("add", 2), ("sort", 4), ("reverse", 4)])
def test_synthetic_deterministic_and_seed_dependent(task, nd):
    a = generate_splits(task, nd, 300, 50, seed=1)
    b = generate_splits(task, nd, 300, 50, seed=1)
    c = generate_splits(task, nd, 300, 50, seed=2)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    assert len(a[0]) == 300 and len(a[1]) == 50
    for e in a[0][:20] + a[1][:20]:
        assert solve(e["prompt"]) == e["response"]


@pytest.mark.parametrize("task,nd", [("add", 2), ("sort", 3), ("reverse", 4)])
def test_synthetic_train_val_disjoint_and_unique(task, nd):
    n_train = 700 if task == "sort" else 5000  # sort with 3 digits: 1000 problems in all
    train, val = generate_splits(task, nd, n_train, 200, seed=0)
    tp, vp = [e["prompt"] for e in train], [e["prompt"] for e in val]
    assert len(set(tp)) == len(tp) and len(set(vp)) == len(vp)
    assert not set(tp) & set(vp)
    extra = generate(task, nd, 50, seed=7, exclude=train + val)
    assert not {e["prompt"] for e in extra} & (set(tp) | set(vp))


def test_synthetic_formats_and_space_limit():
    assert solve("37+48=") == "85"
    assert solve("sort:3142=") == "1234"
    assert solve("reverse:3142=") == "2413"
    with pytest.raises(ValueError):
        solve("hello")
    with pytest.raises(DataError, match="only 100 distinct problems"):
        generate_splits("reverse", 2, 90, 20)


def test_check_answer():
    assert check_answer("37+48=", "85")
    assert check_answer("37+48=", " 85 ")
    assert check_answer("37+48=", "85<eos>7")
    assert not check_answer("37+48=", "84")
    assert not check_answer("37+48=", "850")
    assert not check_answer("37+48=", "")
    assert check_answer("sort:3142=", "1234") and not check_answer("sort:3142=", "2413")


# ---------------------------------------------------------------------------------------------------------------
# tokenizers


def test_synthetic_tokenizer_and_round_trip(tok, tmp_path):
    assert tok.get_vocab_size() < 64
    assert special_ids(tok) == (0, 1, 2)
    assert tok.token_to_id("<pad>") == 0
    text = "37+48=85 sort:3142=1234"
    ids = ids_of(tok, text)
    assert len(ids) == len(text) and 3 not in ids  # one token per character, no <unk>
    assert tok.decode(ids) == text
    f = save_tokenizer(tok, tmp_path / "ckpt")
    assert f.name == "tokenizer.json"
    cfg = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert (cfg["pad_token"], cfg["bos_token"], cfg["eos_token"]) == ("<pad>", "<bos>", "<eos>")
    for src in (tmp_path / "ckpt", f):
        t2 = load_tokenizer(src)
        assert ids_of(t2, text) == ids and t2.decode(ids) == text
        assert special_ids(t2) == (0, 1, 2) and t2.get_vocab_size() == tok.get_vocab_size()


def test_save_tokenizer_keeps_existing_config(tok, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    save_tokenizer(tok, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"chat_template": "x"}


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(DataError, match=f"no tokenizer.json in folder {tmp_path}"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="nope.json does not exist"):
        load_tokenizer(tmp_path / "nope.json")


def _hf_like(specials, plain=()):
    vocab = {c: i for i, c in enumerate(list("abc ") + list(plain))}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(list(specials))
    return t


def test_special_ids_hf_like():
    qwen = _hf_like(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=["</s>"])
    eot, im_end = qwen.token_to_id("<|endoftext|>"), qwen.token_to_id("<|im_end|>")
    assert special_ids(qwen) == (eot, None, eot)  # a plain-vocab "</s>" must not win over a special token
    assert special_ids(qwen, eos_token="<|im_end|>") == (eot, None, im_end)
    glm = _hf_like(["[gMASK]", "<sop>", "<|endoftext|>", "<|user|>"])
    assert special_ids(glm) == (glm.token_to_id("<|endoftext|>"), None, glm.token_to_id("<|endoftext|>"))
    llama = _hf_like(["<|begin_of_text|>", "<|eot_id|>"])
    assert special_ids(llama) == (llama.token_to_id("<|eot_id|>"), llama.token_to_id("<|begin_of_text|>"),
                                  llama.token_to_id("<|eot_id|>"))  # no pad -> eos
    with pytest.raises(DataError, match="data.eos_token"):
        special_ids(_hf_like(["<mask>"]))
    with pytest.raises(DataError, match="'<nope>' is not in the tokenizer"):
        special_ids(qwen, pad_token="<nope>")


# ---------------------------------------------------------------------------------------------------------------
# encoding, masking, padding, packing


def test_response_only_masking_exact_positions(tok):
    (ids, flags), = encode_records([Record("x", prompt="12+3=", response="15")], tok, 32, bos_id=1, eos_id=2)
    p, r = ids_of(tok, "12+3="), ids_of(tok, "15")
    assert ids == [1] + p + r + [2]
    ds = make_dataset([(ids, flags)], 32, packing=False)
    x, y = ds[0]["input_ids"].tolist(), ds[0]["targets"].tolist()
    assert x == [1] + p + r  # ids[:-1]
    # positions 0..4 predict prompt tokens '1','2','+','3','=' -> masked; 5,6,7 predict '1','5',<eos>
    assert y == [IGNORE] * 5 + r + [2]
    assert y[5] == tok.token_to_id("1") and y[6] == tok.token_to_id("5") and y[7] == 2


def test_text_targets_all_tokens_and_no_bos(tok):
    (ids, flags), = encode_records([Record("x", text="ab c")], tok, 32, bos_id=1, eos_id=2)
    y = make_dataset([(ids, flags)], 32, False)[0]["targets"].tolist()
    assert y == ids[1:] == ids_of(tok, "ab c") + [2]
    (ids, flags), = encode_records([Record("x", text="ab c")], tok, 32, bos_id=None, eos_id=2)
    assert ids == ids_of(tok, "ab c") + [2]
    assert make_dataset([(ids, flags)], 32, False)[0]["targets"].tolist() == ids[1:]


def test_padding_collate(tok):
    recs = [Record("a", prompt="1+1=", response="2"), Record("b", prompt="12+34=", response="46")]
    ds = make_dataset(encode_records(recs, tok, 16, bos_id=1, eos_id=2), 16, packing=False)
    b = Collator(pad_id=0)([ds[0], ds[1]])
    assert b["input_ids"].shape == b["targets"].shape == (2, 9) and b["input_ids"].dtype == torch.long
    n0 = len(ds[0]["input_ids"])  # 1 + 4 + 1 = 6
    assert n0 == 6
    assert b["input_ids"][0, n0:].tolist() == [0] * 3 and b["targets"][0, n0:].tolist() == [IGNORE] * 3
    assert b["input_ids"][0, :n0].tolist() == ds[0]["input_ids"].tolist()
    assert b["targets"][1].tolist() == ds[1]["targets"].tolist()
    assert Collator(0, pad_to=16)([ds[0]])["input_ids"].shape == (1, 16)


def test_packing_rows_and_targets(tok):
    recs = [Record(str(i), prompt=f"{i}+{i}=", response=str(2 * i)) for i in range(10, 30)]
    ex = encode_records(recs, tok, 20, bos_id=1, eos_id=2)  # each: 1 + 6 + 2 + 1 = 10 tokens
    assert all(len(i) == 10 for i, _ in ex)
    padded = make_dataset(ex, 20, packing=False)
    packed = make_dataset(ex, 20, packing=True)
    # 21 tokens per row at most -> 2 whole examples (20 tokens, 19 positions) per row; 20 examples -> 10 rows
    assert len(packed) == 10
    b = Collator(0, pad_to=20)([packed[i] for i in range(len(packed))])
    assert b["input_ids"].shape == (10, 20)
    row_ids = ex[0][0] + ex[1][0]
    assert b["input_ids"][0].tolist() == row_ids[:-1] + [0]
    y = b["targets"][0].tolist()
    assert y[9] == IGNORE  # input is example 0's eos, target is example 1's bos: never a target
    assert y[:9] == padded[0]["targets"].tolist() and y[10:19] == padded[1]["targets"].tolist()
    assert y[19] == IGNORE  # padding
    # packing keeps exactly the targets that padding has
    assert packed.num_target_tokens == padded.num_target_tokens == 20 * 3


def test_packing_never_splits_examples(tok):
    recs = [Record(str(i), text="a" * n) for i, n in enumerate([5, 9, 3, 12, 1])]
    ex = encode_records(recs, tok, 16, bos_id=1, eos_id=2)  # lengths 7, 11, 5, 14, 3
    ds = make_dataset(ex, 16, packing=True)
    # greedy in order with <= 17 tokens a row: [7], [11, 5], [14, 3]
    assert [len(r["input_ids"]) for r in ds] == [6, 15, 16]
    assert ds.num_target_tokens == sum(len(i) - 1 for i, _ in ex)


# ---------------------------------------------------------------------------------------------------------------
# reading files


def test_jsonl_text_and_prompt_response(tok, tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, "", {"prompt": "1+1=", "response": "2", "id": 3}, "  "])
    recs = read_jsonl(p)
    assert [(r.text, r.prompt, r.response) for r in recs] == [("ab", None, None), (None, "1+1=", "2")]
    assert recs[1].where == f"{p}:3"
    ds = make_dataset(encode_records(recs, tok, 16, bos_id=1, eos_id=2), 16, False)
    assert ds[0]["targets"].tolist() == ids_of(tok, "ab") + [2]
    assert ds[1]["targets"].tolist() == [IGNORE] * 4 + ids_of(tok, "2") + [2]


def test_plain_text_units(tmp_path):
    p = write(tmp_path / "c.txt", "first para\nstill first\n\n\n  second  \n\nthird\n")
    para = read_text(p, "paragraph")
    assert [r.text for r in para] == ["first para\nstill first", "second", "third"]
    assert [r.where for r in para] == [f"{p}:1", f"{p}:5", f"{p}:7"]
    assert [r.text for r in read_text(p, "line")] == ["first para", "still first", "  second  ", "third"]
    assert [r.text for r in read_text(p, "file")] == ["first para\nstill first\n\n\n  second  \n\nthird"]


def test_folder_of_files(tmp_path):
    write(tmp_path / "b.txt", "two")
    write(tmp_path / "a.txt", "one")
    write(tmp_path / "skip.json", "{}")
    assert [r.text for r in read_records("text", str(tmp_path))] == ["one", "two"]
    with pytest.raises(DataError, match=r"no \*\.jsonl files"):
        read_records("jsonl", str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# bad data: one clear error each


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file.*data\.train_path"):
        read_records("jsonl", str(tmp_path / "nope.jsonl"))


def test_malformed_json_line_reports_line_number(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c"', {"text": "d"}])
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON") as e:
        read_jsonl(p)
    assert "line 3" in str(e.value)
    p2 = jsonl(tmp_path / "e.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=rf"{p2}:1: expected a JSON object"):
        read_jsonl(p2)


@pytest.mark.parametrize(
    "row,msg",
    [
        ({"content": "x"}, r'no "text" and no "prompt"\+"response" \(keys: \'content\'\)'),
        ({"prompt": "x"}, 'has prompt but no "response"'),
        ({"response": "x"}, 'has response but no "prompt"'),
        ({"text": 5}, '"text" must be a string'),
        ({"text": "  "}, '"text" is empty'),
        ({"prompt": "x", "response": ""}, '"response" is empty'),
    ],
)
def test_bad_records(tmp_path, row, msg):
    p = jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, row])
    with pytest.raises(DataError, match=rf"{p}:2: {msg}"):
        read_jsonl(p)


@pytest.mark.parametrize("kind,content", [("jsonl", ""), ("jsonl", "\n \n"), ("text", "\n\n  \n")])
def test_empty_dataset(tmp_path, kind, content):
    p = write(tmp_path / f"d.{kind}", content)
    with pytest.raises(DataError, match="no examples in it"):
        read_records(kind, p)


def test_too_long_error_vs_truncate(tok):
    rec = [Record("f.txt:7", text="abcdefghij")]  # 1 + 10 + 1 = 12 tokens -> needs max_length 11
    assert len(encode_records(rec, tok, 11, "error", 1, 2)[0][0]) == 12
    with pytest.raises(DataError, match=r"f\.txt:7: text is 12 tokens.*max_length=8 allows \(9\).*truncation=truncate"):
        encode_records(rec, tok, 8, "error", 1, 2)
    (ids, flags), = encode_records(rec, tok, 8, "truncate", 1, 2)
    assert ids == [1] + ids_of(tok, "abcdefgh")  # head kept, eos lost
    assert make_dataset([(ids, flags)], 8, False)[0]["input_ids"].shape == (8,)
    pr = [Record("g.jsonl:2", prompt="abcdefghij", response="x")]
    with pytest.raises(DataError, match="g.jsonl:2: the prompt alone fills"):
        encode_records(pr, tok, 8, "truncate", 1, 2)
    (ids, flags), = encode_records([Record("h", prompt="abc", response="xyzxyz")], tok, 6, "truncate", 1, 2)
    assert ids == [1] + ids_of(tok, "abcxyz") and flags == [False] * 4 + [True] * 3


# ---------------------------------------------------------------------------------------------------------------
# DataModule


def test_datamodule_synthetic_batches():
    cfg = DataConfig(num_train=100, num_val=10, batch_size=8, max_length=16)
    dm = build_datamodule(cfg)
    assert dm.vocab_size == synthetic_tokenizer().get_vocab_size() < 64
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 13 and batches[-1]["input_ids"].shape[0] == 4
    for b in batches:
        assert set(b) == {"input_ids", "targets"}
        assert b["input_ids"].dtype == b["targets"].dtype == torch.long
        assert b["input_ids"].shape == b["targets"].shape and b["input_ids"].shape[1] <= 16
        assert (b["targets"] != IGNORE).any(dim=1).all()
    assert len(dm.val_examples) == 10 and all(set(e) == {"prompt", "response"} for e in dm.val_examples)
    ex = dm.val_examples[0]
    assert dm.check_answer(ex, ex["response"]) and not dm.check_answer(ex, ex["response"] + "1")
    prompt_ids = dm.encode_prompt(ex["prompt"])
    assert prompt_ids[0] == dm.bos_id and dm.decode(ids_of(dm.tokenizer, ex["response"]) + [2, 5]) == ex["response"]
    val = list(dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in val) == 10
    # shuffle: seeded and reproducible, but not file order
    order = lambda m: torch.cat([b["input_ids"][:, :4] for b in m.train_dataloader()])  # noqa: E731
    dm2 = build_datamodule(cfg)
    dm2.setup()
    assert torch.equal(order(dm), order(dm2))
    first = next(iter(dm.train_dataloader()))["input_ids"]
    in_order = Collator(dm.pad_id)([dm.train_set[i] for i in range(8)])["input_ids"]
    assert not torch.equal(first, in_order)
    dm3 = build_datamodule(DataConfig(num_train=100, num_val=10, batch_size=8, max_length=16, packing=True))
    dm3.setup()
    b = next(iter(dm3.train_dataloader()))
    assert b["input_ids"].shape == (8, 16)


def test_datamodule_jsonl_needs_tokenizer_and_val(tok, tmp_path):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(20)]
    p = jsonl(tmp_path / "t.jsonl", rows)
    cfg = {"name": "jsonl", "train_path": p, "max_length": 16, "batch_size": 4, "packing": False}
    with pytest.raises(DataError, match="needs the model's tokenizer"):
        build_datamodule(cfg)
    save_tokenizer(tok, tmp_path / "ckpt")
    dm = build_datamodule(cfg, tmp_path / "ckpt")  # a checkpoint folder
    dm.setup()
    assert len(dm.train_set) == 20 and dm.val_set is None and dm.val_dataloader() == []
    dm = build_datamodule({**cfg, "val_fraction": 0.25, "tokenizer_path": str(tmp_path / "ckpt")})
    dm.setup()
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5 and len(dm.val_examples) == 5
    assert not {e["prompt"] for e in dm.val_examples} & {e["prompt"] for e in dm.train_examples}
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape[0] == 4 and b["input_ids"].dtype == torch.long
    pickle.dumps((dm.train_set, dm._collator()))  # works with num_workers > 0
    with pytest.raises(DataError, match="data.train_path"):
        build_datamodule({"name": "text"}, tok)


def test_datamodule_bad_settings(tok):
    for bad, match in [({"name": "csv"}, "data.name='csv'"), ({"truncation": "drop"}, "data.truncation"),
                       ({"task": "mul"}, "data.task='mul'"), ({"max_length": 1}, "max_length=1"),
                       ({"nope": 1}, r"unknown data settings \['nope'\]")]:
        with pytest.raises(DataError, match=match):
            build_datamodule(bad, tok)


@pytest.mark.parametrize("name", ["synthetic", "jsonl", "text"])
def test_shipped_configs_match_schema(name, tmp_path, tok):
    node = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    assert node.name == name
    if name != "synthetic":
        assert OmegaConf.is_missing(OmegaConf.load(CONF / f"{name}.yaml"), "train_path")
        with pytest.raises(DataError, match=f"data={name} needs a file: set data.train_path"):
            build_datamodule(node, tok)  # "???" merged onto the schema's None: still a clear error
        node.train_path = write(tmp_path / "d.txt", '{"text": "ab"}\n' if name == "jsonl" else "ab\n")
    dm = build_datamodule(node, tok)
    assert isinstance(dm, MTrainDataModule) and isinstance(dm.cfg, DataConfig)
    dm.setup()
    assert len(dm.train_set) >= 1


def test_untyped_node_missing_and_bad_types(tok):
    # the Hydra schema may keep `data` untyped: "???" then stays missing and must still give a clear error
    raw = OmegaConf.load(CONF / "jsonl.yaml")
    with pytest.raises(DataError, match=r"data.train_path is required \(it is \?\?\?\)"):
        build_datamodule(raw, tok)
    with pytest.raises(DataError, match="max_length"):
        build_datamodule(OmegaConf.create({"max_length": "abc"}), tok)
    cfg = build_datamodule(OmegaConf.create({"max_length": "48", "packing": True}), tok).cfg
    assert cfg.max_length == 48 and cfg.packing is True


def test_lightning_fit_consumes_batches():
    import lightning as L

    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 4)

        def training_step(self, batch, i):
            seen.append(tuple(batch["input_ids"].shape))
            return self.emb(batch["input_ids"]).mean()

        def validation_step(self, batch, i):
            seen.append(("val", tuple(batch["targets"].shape)))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = build_datamodule(DataConfig(num_train=32, num_val=8, batch_size=8, packing=True, max_length=24))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=2,
                        accelerator="cpu", devices=1)
    trainer.fit(Probe(), datamodule=dm)
    # 32 examples of ~10 tokens, 2 per packed row -> 16 train rows; 8 val examples -> 4 rows
    assert seen == [(8, 24), (8, 24), ("val", (4, 24))]
