"""Rollout files from real engines: the layout of ``routed_experts`` is declared, never guessed, and R3 replays
exactly what the engine routed.

The encoders below write the bytes the way each engine does (sources, as read for docs/rollout-files.md):

* SGLang (sgl-project/sglang, ``srt/managers/detokenizer_manager.py`` / ``tokenizer_manager.py``,
  ``layers/moe/routed_experts_capturer``): ``meta_info["routed_experts"]`` = base64 of the little-endian int32 array
  ``[seq_len - 1, num_hidden_layers, top_k]``, no shape; dense layers read 0.
* vLLM (vllm-project/vllm #28284, ``enable_return_routed_experts``): ``routed_experts`` per sequence, int32
  ``[seq_len - 1, num_hidden_layers, top_k]`` (``request.num_tokens - 1`` rows), written as lists.
* vLLM's current format (#39568): uint8 (uint16 above 256 experts); its HTTP endpoint sends base64 of ``.npy`` bytes.
* FastDeploy (PR #5405 ``enable_routing_replay``): layer-first ``[moe_layers, positions, top_k]``, padded with -1.
* mtrain: ``task.dump_rollouts`` (``rollout_lines``): lists ``[seq_len - 1, moe_layers, top_k]`` after a header.

What users rely on: for each format, the trainer's own routing written in that format replays with 100% agreement,
and changing a few rows of one line moves exactly those tokens; every layout mistake is one line naming file:line,
the declared layout and what the bytes would fit; the trainer's logprobs are taken at the file's temperature.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

from mtrain.data.errors import DataError
from mtrain.data.rollout_formats import FORMATS
from mtrain.data.rollouts import FileSettings, ModelShape, generation_of, header_line, read_rollout_file, rollout_lines
from mtrain.models import Glm4MoeConfig, RoutingTrace, build_model
from mtrain.models.generate import generate, recompute
from mtrain.rl.mismatch import trainer_recompute

PROMPTS = [[1, 5, 9, 3], [1, 7], [1, 4, 4, 8, 2, 6], [1, 9, 9]]
E, K = 8, 2


def glm(layers=3, dense=1, seed=0):
    """A GLM4-MoE whose first ``dense`` layers are dense and whose routers are decisive (a misplaced id shows)."""
    cfg = Glm4MoeConfig(num_hidden_layers=layers, n_routed_experts=E, num_experts_per_tok=K, n_group=2, topk_group=1,
                        first_k_dense_replace=dense)
    model = build_model(cfg, seed=seed).eval()
    with torch.no_grad():
        for _, router in model.routers():
            router.weight.normal_(0, 0.5)
    return model


def shape_of(model) -> ModelShape:
    c = model.config
    return ModelShape(c.vocab_size, c.num_hidden_layers, tuple(model.moe_layers), K, E)


def own_routing(model, gen) -> list[torch.Tensor]:
    """The trainer's own expert choice at each line's ``seq_len - 1`` routed positions, ``[P, moe_layers, k]``."""
    trace = RoutingTrace()
    with torch.no_grad():
        recompute(model, gen, trace=trace)
    full = trace.stacked()
    out = []
    for b, p in enumerate(gen.prompts):
        start = gen.first - len(p)
        out.append(full[b, start : start + len(p) + int(gen.lengths[b]) - 1])
    return out


def all_layers(model, moe_first: torch.Tensor, dtype=torch.int32) -> torch.Tensor:
    """[P, moe, k] -> [P, num_hidden_layers, k] with the dense layers at 0 (SGLang and vLLM fill them so)."""
    P = moe_first.shape[0]
    full = torch.zeros(P, model.config.num_hidden_layers, K, dtype=dtype)
    full[:, model.moe_layers] = moe_first.to(dtype)
    return full


# -- the engines' encoders ----------------------------------------------------------------------------------------
def sglang(model, r):
    return base64.b64encode(all_layers(model, r).numpy().astype("<i4").tobytes()).decode()


def vllm(model, r):
    return all_layers(model, r).tolist()


def vllm_npy(model, r):
    buf = io.BytesIO()
    np.save(buf, all_layers(model, r).numpy().astype(np.uint8 if E <= 256 else np.uint16))
    return base64.b64encode(buf.getvalue()).decode()


def fastdeploy(model, r, pad=3):
    layer_first = r.transpose(0, 1)  # [moe, P, k]
    return torch.cat([layer_first, torch.full((layer_first.shape[0], pad, K), -1, dtype=r.dtype)], 1).tolist()


def mtrain_own(model, r):
    return r.tolist()


ENCODERS = {"sglang": sglang, "vllm": vllm, "vllm_npy": vllm_npy, "fastdeploy": fastdeploy, "mtrain": mtrain_own}
assert set(ENCODERS) == set(FORMATS)


def write(path, lines, header=None):
    path.write_text("".join(json.dumps(x) + "\n" for x in ([header] if header else []) + lines))
    return path


def file_of(tmp_path, model, fmt, change=None, header=None):
    """A rollout file of the model's own generation with its own routing encoded as ``fmt`` writes it; ``change``
    (line, positions) gives those positions of that line other experts."""
    gen = generate(model, PROMPTS, max_new_tokens=5, temperature=1.0, seed=4)
    lines = rollout_lines(gen, [0.5] * 4, [{}] * 4)
    for b, r in enumerate(own_routing(model, gen)):
        if change is not None and change[0] == b:
            r = r.clone()
            for p in change[1]:
                r[p] = (r[p] + 1) % E  # every MoE layer: another expert set at this position
        lines[b]["routed_experts"] = ENCODERS[fmt](model, r)
    header = {"rollout_format": fmt, "logprob_temperature": 1.0} if header is None else header
    return write(tmp_path / f"{fmt}.jsonl", lines, header), gen


def replayed(model, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts R3 replays from the file over the trainer's buffer ``[B, width, moe_layers, k]`` (-1: not
    routed), and [B, width] bool: positions where they differ from the trainer's own choice."""
    gen = generation_of(rows, 5, 0, "cpu")
    trace = RoutingTrace.replay(gen.replay_ids(model.moe_layers))
    with torch.no_grad():
        recompute(model, gen, trace=trace)
    differ = torch.stack([(trace.own[i].sort(-1).values != trace.ids[i].sort(-1).values).any(-1)
                          & (trace.ids[i] >= 0).all(-1) for i in model.moe_layers]).any(0)
    return torch.stack([trace.ids[i] for i in model.moe_layers], dim=2), differ


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_engines_format_replays_exactly_and_moves_exactly_the_changed_rows(tmp_path, fmt):
    model = glm()
    f, gen = file_of(tmp_path, model, fmt)
    rows, declared = read_rollout_file(f, shape_of(model))
    assert declared.name == fmt and declared.layout == FORMATS[fmt]
    ids, differ = replayed(model, rows)
    assert not differ.any() and (ids >= 0).sum() > 0  # 100% agreement with the trainer's own routing
    changed = [0, 3, 6]  # positions of line 2 (prompt and response positions)
    f, _ = file_of(tmp_path, model, fmt, change=(2, changed))
    ids2, _ = replayed(model, read_rollout_file(f, shape_of(model))[0])
    moved = (ids2 != ids).any(-1).any(-1)
    start = gen.first - len(PROMPTS[2])
    expected = torch.zeros_like(moved)
    expected[2, [start + p for p in changed]] = True
    assert torch.equal(moved, expected)


def test_sglang_bytes_at_the_colliding_length_are_read_as_declared(tmp_path):
    """2 layers, 1 dense: SGLang's int32 over all layers at seq_len 2 has the byte count of the MoE layer at 2 rows
    (the length the old reader misread). Declared sglang, it replays exactly; the MoE-only bytes of the same count
    are refused (the dense layer would read ids, not 0)."""
    model = glm(layers=2, dense=1)
    gen = generate(model, [[3]], max_new_tokens=1, temperature=1.0, seed=0)
    r = own_routing(model, gen)[0]  # [1, 1, k]: seq_len 2
    assert r.shape[0] == 1 and len(sglang(model, r)) == len(base64.b64encode(bytes(4 * 2 * K)))
    line = rollout_lines(gen, [1.0], [{}])[0]
    header = {"rollout_format": "sglang", "logprob_temperature": 1.0}
    f = write(tmp_path / "s.jsonl", [line | {"routed_experts": sglang(model, r)}], header)
    rows, _ = read_rollout_file(f, shape_of(model))
    assert torch.equal(rows[0].routed, r.to(torch.int32))
    moe_bytes = base64.b64encode(torch.cat([r, r]).to(torch.int32).numpy().tobytes()).decode()  # [2, moe, k]
    f = write(tmp_path / "m.jsonl", [line | {"routed_experts": moe_bytes}], header)
    if bool((r != 0).any()):
        with pytest.raises(DataError, match=r"m\.jsonl:2: .*dense layer 0") as e:
            read_rollout_file(f, shape_of(model))
        assert "\n" not in str(e.value)


def test_int64_bytes_of_the_moe_layers_are_refused_where_they_fit_int32_of_all_layers(tmp_path):
    model = glm(layers=2, dense=1)
    f, gen = file_of(tmp_path, model, "sglang")
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    r = own_routing(model, gen)
    for b in range(4):
        lines[b + 1]["routed_experts"] = base64.b64encode(r[b].to(torch.int64).numpy().tobytes()).decode()
    write(f, lines[1:], lines[0])
    with pytest.raises(DataError, match=r"sglang\.jsonl:2: .*dense layer 0.*another layout"):
        read_rollout_file(f, shape_of(model))


def test_a_byte_count_of_another_layout_is_refused_naming_the_layout_it_fits(tmp_path):
    model = glm()
    f, gen = file_of(tmp_path, model, "sglang")
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    r = own_routing(model, gen)[1]
    lines[2]["routed_experts"] = base64.b64encode(r.to(torch.int32).numpy().tobytes()).decode()  # MoE layers only
    write(f, lines[1:], lines[0])
    with pytest.raises(DataError) as e:
        read_rollout_file(f, shape_of(model))
    msg = str(e.value)
    P = r.shape[0]
    assert msg.startswith(f"{f}:3: ") and "declared layout sglang" in msg and "\n" not in msg
    assert f"would fit int32 [{P} positions, moe 2 layers, {K}]" in msg, msg


def bad_file(tmp_path, model, fmt, mutate):
    f, gen = file_of(tmp_path, model, fmt)
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    lines[2]["routed_experts"] = mutate(own_routing(model, gen)[1])
    return write(f, lines[1:], lines[0])


def npy_of(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


def npz_of(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.savez(buf, routed=arr)
    return base64.b64encode(buf.getvalue()).decode()


REFUSED = {
    "seq_len rows": ("vllm", lambda m, r: all_layers(m, torch.cat([r[:1], r])).tolist(), "one row per token"),
    "dtype": ("vllm_npy", lambda m, r: npy_of(all_layers(m, r).numpy()), "array of int32; the declared layout"),
    "axis order": ("fastdeploy", lambda m, r: r.tolist(), "fit order=positions_first"),
    "expert id": ("mtrain", lambda m, r: torch.where(r == r[0, 0, 0], E, r).tolist(), f"expert id {E} outside"),
    "-1 at a real token": ("mtrain", lambda m, r: torch.cat([r[:-1], torch.full_like(r[-1:], -1)]).tolist(),
                           "holds -1 at position"),
    "ids in fastdeploy padding": ("fastdeploy", lambda m, r: fastdeploy(m, torch.cat([r, r[:1]]), pad=0),
                                  "not -1 padding"),
    "float ids": ("mtrain", lambda m, r: (r + 0.5).tolist(), "not nested lists of integers"),  # not truncated
    "bool ids": ("mtrain", lambda m, r: (r > 0).tolist(), "not nested lists of integers"),
    "npz": ("vllm_npy", lambda m, r: npz_of(all_layers(m, r).numpy().astype(np.uint8)), "not of a .npy file"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_layout_mistakes_are_refused_in_one_line_naming_the_line_and_the_declared_layout(tmp_path, case):
    model = glm()
    fmt, mutate, message = REFUSED[case]
    f = bad_file(tmp_path, model, fmt, lambda r: mutate(model, r))
    with pytest.raises(DataError) as e:
        read_rollout_file(f, shape_of(model))
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: ") and f"declared layout {fmt}" in msg and "\n" not in msg, msg
    assert message in msg, msg


def test_routing_without_a_declared_layout_is_refused_and_file_and_config_must_agree(tmp_path):
    model = glm()
    f, _ = file_of(tmp_path, model, "mtrain")
    lines = [json.loads(x) for x in f.read_text().splitlines()]
    write(f, lines[1:])  # no header
    with pytest.raises(DataError, match=r"mtrain\.jsonl:1: .*without a declared layout.*task\.rollout_format"):
        read_rollout_file(f, shape_of(model))
    rows, declared = read_rollout_file(f, shape_of(model), FileSettings("mtrain"))  # the config declares it
    assert declared.name == "mtrain" and rows[0].routed is not None
    write(f, lines[1:], lines[0])
    with pytest.raises(DataError, match=r"declares rollout_format='mtrain', the config task\.rollout_format='sglang'"):
        read_rollout_file(f, shape_of(model), FileSettings("sglang"))


def test_a_header_layout_holds_under_the_tasks_unset_config_and_must_agree_with_a_set_one(tmp_path):
    """The task hands the reader every ``task.rollout_layout`` field, null where unset: those must not overwrite the
    header's layout; a field set on both sides must agree."""
    from dataclasses import asdict

    model = glm()
    layout = asdict(FORMATS["sglang"])
    f, _ = file_of(tmp_path, model, "sglang",
                   header={"rollout_format": "custom", "logprob_temperature": 1.0, "layout": layout})
    unset = FileSettings(layout=dict.fromkeys(layout))  # what task=grpo passes by default
    rows, declared = read_rollout_file(f, shape_of(model), unset)
    assert declared.layout == FORMATS["sglang"] and replayed(model, rows)[1].sum() == 0
    with pytest.raises(DataError, match=r"declares layout\.order='positions_first', the config "
                                        r"task\.rollout_layout\.order='layers_first'"):
        read_rollout_file(f, shape_of(model), FileSettings(layout={**unset.layout, "order": "layers_first"}))


def test_sglang_logprobs_need_a_declared_temperature(tmp_path):
    model = glm()
    f, _ = file_of(tmp_path, model, "sglang", header={"rollout_format": "sglang"})
    with pytest.raises(DataError, match="SGLANG_RETURN_ORIGINAL_LOGPROB") as e:
        read_rollout_file(f, shape_of(model))
    assert "\n" not in str(e.value)
    assert read_rollout_file(f, shape_of(model), FileSettings(temperature=0.7))[1].temperature == 0.7


def test_the_trainer_takes_its_logprobs_at_the_files_temperature(tmp_path):
    """A file whose logprobs an engine took at T = 0.5 (logits / T): the trainer's recompute at the declared 0.5
    matches them; the same file read as unscaled (T = 1) shows a large false mismatch."""
    model = glm()
    gen = generate(model, PROMPTS, max_new_tokens=5, temperature=0.5, seed=4)
    gen.temperature = 0.5
    engine_lp, _ = trainer_recompute(model, gen)  # what the engine reports: logprobs at T = 0.5
    lines = rollout_lines(gen, [0.5] * 4, [{}] * 4)
    for b, line in enumerate(lines):
        line["logprobs"] = engine_lp[b, : int(gen.lengths[b])].tolist()
    for temperature, close in ((0.5, True), (1.0, False)):
        f = write(tmp_path / f"t{temperature}.jsonl", lines, {"rollout_format": "mtrain",
                                                              "logprob_temperature": temperature})
        rows, declared = read_rollout_file(f, shape_of(model))
        back = generation_of(rows, 5, 0, "cpu", declared.temperature)
        trainer_lp, _ = trainer_recompute(model, back)
        diff = (trainer_lp - back.logprobs)[back.mask].abs().max().item()
        assert (diff < 1e-5) == close, (temperature, diff)


def test_mtrains_own_dump_declares_itself():
    assert header_line(0.7, "invariant") == {"rollout_format": "mtrain", "logprob_temperature": 0.7,
                                             "scoring": "invariant"}


def test_plain_lines_edge_cases_read_as_written(tmp_path):
    """A text field holding U+2028 (json.dumps(ensure_ascii=False) writes it as it is) stays one line; a header
    with only the temperature is a header; a reward beyond float's range and a file where some lines lack a reward
    are refused in one line."""
    model = glm()
    line = {"prompt_ids": [1, 5], "response_ids": [3], "logprobs": [-0.2], "reward": 1.0, "prompt": "a\u2028b"}
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"logprob_temperature": 0.5}) + "\n" + json.dumps(line, ensure_ascii=False) + "\r\n"
                 + json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    rows, declared = read_rollout_file(f, shape_of(model))
    assert len(rows) == 2 and rows[0].example["prompt"] == "a\u2028b" and declared.temperature == 0.5
    assert rows[1].where.endswith(":3")
    for bad, message in (({**line, "reward": 10 ** 400}, '"reward" = '), ({k: v for k, v in line.items()
                                                                         if k != "reward"}, 'no "reward" while')):
        write(f, [line, bad])
        with pytest.raises(DataError) as e:
            read_rollout_file(f, shape_of(model))
        assert str(e.value).startswith(f"{f}:2: ") and message in str(e.value), str(e.value)
