"""Reward functions for RL fine-tuning (GRPO): ``fn(prompt: str, response: str, example: dict) -> float``.

``example`` is the prompt example (``mtrain.data.prompts``), ``{"prompt", "answer", ...}``. Rewards are registered
by name (``REWARDS``, :func:`register_reward`; ``task.reward=<name>``); a reward's keyword parameters after
``example`` are its options, set from ``task.reward_args`` (``task.reward_args.scale=2``; :mod:`mtrain.registry`).
The built-in ones:

  * ``exact``: ``exact_match`` -- 1.0 when the response, cut at the first ``<eos>`` and stripped, equals the
    stripped answer (the same rule as ``synthetic.check_answer``), else 0.0.
  * ``numeric``: ``numeric_match`` -- 1.0 when the last number in the response (cut at the first ``<eos>``)
    equals ``float(answer)`` within a relative tolerance of 1e-6, else 0.0 (also when there is no number).

``resolve_reward`` turns a name, a dotted path ``package.module.function`` or a callable (with its options) into a
reward function;
``score`` calls one over a batch and turns every failure (an exception, a value that is not a finite float) into
a one-line ``RewardError`` naming the example.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

from mtrain.data.errors import DataError
from mtrain.registry import Registry

RewardFn = Callable[[str, str, Mapping[str, Any]], float]
EOS = "<eos>"
REL_TOL = 1e-6

# A number: optional minus (not when glued to a preceding digit, as in "1-5"), digits, optional fraction and
# exponent. No thousands separators: "1,000" reads as 1 and 000.
_NUMBER_RE = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class RewardError(DataError):
    """A reward function or its spec is broken. The message names the example (or spec) and says the fix."""


REWARDS: Registry = Registry("reward", inputs=3, error=RewardError)
register_reward = REWARDS.register


def _cut(response: str) -> str:
    return response.split(EOS, 1)[0]


def _answer(example: Mapping[str, Any]) -> str:
    if "answer" not in example:
        raise ValueError("example has no \"answer\", which the built-in rewards compare with; give every prompt an "
                       "answer or use a reward function that needs none")
    return str(example["answer"])


@register_reward("exact")
def exact_match(prompt: str, response: str, example: Mapping[str, Any]) -> float:
    """1.0 if the response (cut at the first ``<eos>``, stripped) equals the stripped answer, else 0.0."""
    return 1.0 if _cut(response).strip() == _answer(example).strip() else 0.0


@register_reward("numeric")
def numeric_match(prompt: str, response: str, example: Mapping[str, Any]) -> float:
    """1.0 if the last number in the response equals ``float(answer)`` (relative tolerance 1e-6), else 0.0."""
    answer = _answer(example)
    try:
        want = float(answer)
    except ValueError:
        raise ValueError(f"answer {answer!r} is not a number, which the numeric reward needs") from None
    numbers = _NUMBER_RE.findall(_cut(response))
    if not numbers:
        return 0.0
    return 1.0 if math.isclose(float(numbers[-1]), want, rel_tol=REL_TOL) else 0.0


def _name(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _short(text: Any, limit: int = 60) -> str:
    """repr of the text cut to ``limit`` characters (repr escapes newlines: the result is one line)."""
    return repr(_clip(text if isinstance(text, str) else str(text), limit))


def score(
    fn: RewardFn, prompts: Sequence[str], responses: Sequence[str], examples: Sequence[Mapping[str, Any]]
) -> List[float]:
    """``[float(fn(p, r, e)) ...]`` over the batch. A raise, or a value that is not a finite float (strings are
    refused even when they parse), -> ``RewardError`` naming the example index and prompt."""
    if not len(prompts) == len(responses) == len(examples):
        raise RewardError(f"score() got {len(prompts)} prompts, {len(responses)} responses and {len(examples)} "
                          f"examples. Fix: pass one prompt and one example per response.")
    out: List[float] = []
    for i, (p, r, e) in enumerate(zip(prompts, responses, examples)):
        where = f"reward function {_name(fn)} on example {i} (prompt {_short(p)})"
        fix = "Fix: the reward function must return a finite float."
        try:
            v = fn(p, r, e)
        except Exception as exc:
            msg = _clip(" ".join(str(exc).split()), 200)
            raise RewardError(f"{where} raised {type(exc).__name__}{': ' + msg if msg else ''}. {fix}") from exc
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"{where} returned {_clip(repr(v), 60)} of type {type(v).__name__}, not a float. "
                              f"{fix}") from None
        if not math.isfinite(x):
            raise RewardError(f"{where} returned {x}, not a finite float. {fix}")
        out.append(x)
    return out


def resolve_reward(spec: Union[str, RewardFn], options: Optional[Mapping[str, Any]] = None) -> RewardFn:
    """A reward function from a registered name, a dotted path ``package.module.function``, or a callable (returned
    as is), with ``options`` (``task.reward_args``) bound to its keyword parameters. Unknown name, missing
    module/attribute, not callable, or an option it does not take -> ``RewardError``."""
    fn = REWARDS.get(spec)
    return REWARDS.bind(spec, {}, options, where="task.reward_args") if options else fn
