"""RL prompt sets and reward functions: exact/numeric rewards, score() errors, resolve_reward, prompt JSONL."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from mtrain.data import synthetic
from mtrain.data.errors import DataError
from mtrain.data.prompts import read_prompt_jsonl, synthetic_prompts
from mtrain.data.rewards import REWARDS, RewardError, exact_match, numeric_match, resolve_reward, score


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# synthetic prompts + exact match


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_synthetic_prompts_are_the_synthetic_splits(task):
    train, val = synthetic_prompts(task, 2, 30, 10, seed=3)
    g_train, g_val = synthetic.generate_splits(task, 2, 30, 10, 3)
    assert [(e["prompt"], e["answer"]) for e in train] == [(e["prompt"], e["response"]) for e in g_train]
    assert [(e["prompt"], e["answer"]) for e in val] == [(e["prompt"], e["response"]) for e in g_val]
    assert synthetic_prompts(task, 2, 30, 10, seed=3) == (train, val)


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_exact_match_agrees_with_check_answer(task):
    train, _ = synthetic_prompts(task, 3, 40, 1, seed=0)
    seen = {0.0: 0, 1.0: 0}
    for ex in train:
        p, a = ex["prompt"], ex["answer"]
        right = [a, a + "<eos>", a + "<eos>99 junk", f"  {a}\n", f"\t{a} <eos> {a}1"]
        wrong = [a + "1", "1" + a, "", "<eos>" + a, a[:-1], f"{a} {a}", a.replace(a[0], "x", 1)]
        for resp in right + wrong:
            got = exact_match(p, resp, ex)
            assert got == float(synthetic.check_answer(p, resp)), (p, resp)
            assert got == (1.0 if resp in right else 0.0), (p, resp)
            seen[got] += 1
    assert seen[0.0] and seen[1.0]


def test_exact_match_strips_the_answer_too():
    assert exact_match("q", " 12 <eos>", {"prompt": "q", "answer": "12\n"}) == 1.0
    assert exact_match("q", "1 2", {"prompt": "q", "answer": "12"}) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# numeric match


@pytest.mark.parametrize(
    "response,answer,expected",
    [
        ("the answer is 42", "42", 1.0),
        ("the answer is 42.", "42", 1.0),
        ("42", "42.0", 1.0),
        ("-3.5", "-3.5", 1.0),
        ("so x = -3.5", "-3.5", 1.0),
        ("3.5", "-3.5", 0.0),
        ("-3.5", "3.5", 0.0),
        ("first 7, then 42", "42", 1.0),
        ("42, no wait, 7", "42", 0.0),
        ("42.00000001", "42", 1.0),  # within 1e-6 relative
        ("42.001", "42", 0.0),
        ("1000000.5", "1000000", 1.0),
        ("pages 1-5", "5", 1.0),  # a range dash is not a minus sign
        ("1e3", "1000", 1.0),
        ("42<eos>7", "42", 1.0),  # cut at <eos>
        ("no number here", "42", 0.0),
        ("", "0", 0.0),
        ("0", "0", 1.0),
    ],
)
def test_numeric_match(response, answer, expected):
    assert numeric_match("q", response, {"prompt": "q", "answer": answer}) == expected


def test_builtin_rewards_need_an_answer():
    for fn in REWARDS.values():
        msg = rf'{fn.__name__} on example 0 .*raised ValueError: example has no "answer"'
        with pytest.raises(RewardError, match=msg):
            score(fn, ["q"], ["1"], [{"prompt": "q"}])
    with pytest.raises(RewardError, match=r"numeric_match on example 0 .*answer 'abc' is not a number"):
        score(numeric_match, ["q"], ["1"], [{"prompt": "q", "answer": "abc"}])


# ---------------------------------------------------------------------------------------------------------------
# score()


def _raises(prompt, response, example):
    if response == "boom":
        raise ZeroDivisionError("division by zero")
    return 1.0


def _returns(value):
    def bad_reward(prompt, response, example):
        return value if response == "bad" else 0.5

    return bad_reward


def test_score_values():
    ex = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+1=", "answer": "2"}]
    assert score(exact_match, ["1+1=", "1+1="], ["2<eos>", "3"], ex) == [1.0, 0.0]
    assert score(lambda p, r, e: 1, ["a"], ["b"], [{}]) == [1.0]
    assert score(lambda p, r, e: True, ["a"], ["b"], [{}]) == [1.0]
    assert all(type(v) is float for v in score(lambda p, r, e: 1, ["a"], ["b"], [{}]))


@pytest.mark.parametrize(
    "fn,what",
    [
        (_raises, r"raised ZeroDivisionError: division by zero"),
        (_returns(float("nan")), r"returned nan, not a finite float"),
        (_returns(math.inf), r"returned inf, not a finite float"),
        (_returns(-math.inf), r"returned -inf, not a finite float"),
        (_returns("yes"), r"returned 'yes' of type str, not a float"),
        (_returns("1.0"), r"returned '1.0' of type str, not a float"),  # refused even though float() parses it
        (_returns(None), r"returned None of type NoneType, not a float"),
        (_returns([1.0]), r"returned \[1.0\] of type list, not a float"),
    ],
)
def test_score_errors_name_the_example(fn, what):
    prompts = ["first prompt", "37+48=", "third"]
    responses = ["ok", "boom" if fn is _raises else "bad", "ok"]
    examples = [{"prompt": p, "answer": "1"} for p in prompts]
    with pytest.raises(RewardError) as e:
        score(fn, prompts, responses, examples)
    msg = str(e.value)
    assert isinstance(e.value, DataError)
    assert "\n" not in msg
    assert re.search(r"reward function \S*(_raises|bad_reward) on example 1 \(prompt '37\+48='\)", msg), msg
    assert re.search(what, msg), msg
    assert msg.endswith("Fix: the reward function must return a finite float.")


def test_score_error_truncates_long_prompt_and_keeps_one_line():
    prompt = "Solve this.\n" + "x" * 500

    def bad(p, r, e):
        if len(p) > 1:
            raise ValueError("line one\nline two")
        return 0.0

    with pytest.raises(RewardError) as e:
        score(bad, ["a", prompt], ["r", "r"], [{}, {}])
    msg = str(e.value)
    assert "\n" not in msg
    assert "example 1 (prompt 'Solve this.\\nxxx" in msg
    assert "x" * 100 not in msg
    assert "raised ValueError: line one line two." in msg


def test_score_length_mismatch():
    with pytest.raises(RewardError, match="2 prompts, 1 responses and 2 examples"):
        score(exact_match, ["a", "b"], ["a"], [{}, {}])


# ---------------------------------------------------------------------------------------------------------------
# resolve_reward


def test_resolve_names_and_callables():
    assert resolve_reward("exact") is exact_match
    assert resolve_reward("numeric") is numeric_match
    assert resolve_reward("mtrain.data.rewards.numeric_match") is numeric_match
    f = lambda p, r, e: 0.0  # noqa: E731
    assert resolve_reward(f) is f


def test_resolve_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rl_rewards_mod.py").write_text(
        "def length_reward(prompt, response, example):\n    return float(len(response))\n\nNOT_A_FN = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve_reward("my_rl_rewards_mod.length_reward")
    assert score(fn, ["p"], ["abc"], [{}]) == [3.0]
    with pytest.raises(RewardError, match="module 'my_rl_rewards_mod' has no attribute 'nope'"):
        resolve_reward("my_rl_rewards_mod.nope")
    with pytest.raises(RewardError, match=r"'my_rl_rewards_mod.NOT_A_FN' is a int, not callable"):
        resolve_reward("my_rl_rewards_mod.NOT_A_FN")


def test_resolve_import_failures(tmp_path, monkeypatch):
    (tmp_path / "my_rl_broken_mod.py").write_text("import surely_not_installed_pkg_xyz\n")
    (tmp_path / "my_rl_raising_mod.py").write_text("raise RuntimeError('bad config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match=r"no module named 'no_such_pkg_xyz.sub'"):
        resolve_reward("no_such_pkg_xyz.sub.fn")
    with pytest.raises(RewardError, match=r"importing 'my_rl_broken_mod' failed .*surely_not_installed_pkg_xyz"):
        resolve_reward("my_rl_broken_mod.fn")
    with pytest.raises(RewardError, match=r"importing 'my_rl_raising_mod' raised RuntimeError: bad config"):
        resolve_reward("my_rl_raising_mod.fn")


@pytest.mark.parametrize(
    "spec,msg",
    [("exactt", r"unknown reward 'exactt'. Fix: use one of exact, numeric"), (None, "is a NoneType"), (3, "is a int")],
)
def test_resolve_bad_spec(spec, msg):
    with pytest.raises(RewardError, match=msg):
        resolve_reward(spec)


# ---------------------------------------------------------------------------------------------------------------
# prompt JSONL


def test_read_prompt_jsonl(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "2+2=", "answer": "4", "id": 7}\n\n   \n{"prompt": "half?", "answer": 0.5}\n'
                 '{"prompt": "neg", "answer": -3}\n', encoding="utf-8")
    assert read_prompt_jsonl(str(p)) == [
        {"prompt": "2+2=", "answer": "4", "id": 7},
        {"prompt": "half?", "answer": "0.5"},
        {"prompt": "neg", "answer": "-3"},
    ]


def test_read_prompt_folder(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "answer": "2"}])
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "answer": "1"}])
    (tmp_path / "c.json").write_text('{"prompt": "skip", "answer": "x"}\n')
    assert [e["prompt"] for e in read_prompt_jsonl(str(tmp_path))] == ["a", "b"]


def test_answer_optional_without_require_answer(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "tests": ["t1"]}, {"prompt": "b", "answer": 2}])
    assert read_prompt_jsonl(p, require_answer=False) == [{"prompt": "a", "tests": ["t1"]},
                                                          {"prompt": "b", "answer": "2"}]
    with pytest.raises(DataError, match=rf"{re.escape(p)}:1: no \"answer\""):
        read_prompt_jsonl(p)
    bad = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a"}, {"prompt": "b", "answer": [1]}])
    with pytest.raises(DataError, match=rf"{re.escape(bad)}:2: \"answer\" must be a string or a number"):
        read_prompt_jsonl(bad, require_answer=False)


@pytest.mark.parametrize(
    "row,msg",
    [
        ('{"prompt": "x", "answer": "1"', r"malformed JSON"),
        ("[1, 2]", r"expected a JSON object, got list"),
        ('"just a string"', r"expected a JSON object, got str"),
        ({"question": "x", "answer": "1"}, r"no \"prompt\" \(keys: 'question', 'answer'\)"),
        ({"prompt": 5, "answer": "1"}, r"\"prompt\" must be a string, got int"),
        ({"prompt": None, "answer": "1"}, r"\"prompt\" must be a string, got NoneType"),
        ({"prompt": "", "answer": "1"}, r"\"prompt\" is empty"),
        ({"prompt": "  \n", "answer": "1"}, r"\"prompt\" is empty"),
        ({"prompt": "x"}, r"no \"answer\""),
        ({"prompt": "x", "answer": None}, r"\"answer\" must be a string or a number, got NoneType"),
        ({"prompt": "x", "answer": True}, r"\"answer\" must be a string or a number, got bool"),
        ({"prompt": "x", "answer": {"v": 1}}, r"\"answer\" must be a string or a number, got dict"),
        ({"prompt": "x", "answer": " "}, r"\"answer\" is empty"),
        ('{"prompt": "x", "answer": NaN}', r"\"answer\" is nan, not a finite number"),
    ],
)
def test_bad_prompt_lines_name_file_and_line(tmp_path, row, msg):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "1"}, "", row])
    with pytest.raises(DataError) as e:
        read_prompt_jsonl(p)
    text = str(e.value)
    assert re.match(rf"{re.escape(p)}:3: {msg}", text), text
    assert "\n" not in text and "Fix:" in text


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_prompt_file(tmp_path, content):
    p = tmp_path / "e.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}: no prompts"):
        read_prompt_jsonl(str(p))


def test_missing_prompt_file_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_prompt_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"no \*\.jsonl files"):
        read_prompt_jsonl(str(tmp_path))
