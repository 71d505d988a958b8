"""Reward functions for GRPO experiments (``task.reward=benchmarks.grpo_rewards.<name>``, run from the repo root)."""

from mtrain.data.synthetic import check_answer, solve


def format_and_exact(prompt: str, response: str, example: dict) -> float:
    """0.5 for an answer written as digits, plus 0.5 when it is the exact answer: a reward with an offset that almost
    every response earns, where a policy gradient without a baseline also pushes up the wrong answers."""
    text = response.strip()
    return 0.5 * (text.isdigit()) + 0.5 * check_answer(prompt, text)


def digits(prompt: str, response: str, example: dict) -> float:
    """Partial credit: the share of the answer's digits that are right, aligned from the units digit (a response of
    another length loses the digits it lacks or adds); 1.0 exactly when the answer is exact, 0 for a non-number."""
    want, got = solve(prompt), response.split("<eos>", 1)[0].strip()
    if not got.isdigit():
        return 0.0
    n = max(len(want), len(got))
    return sum(a == b for a, b in zip(want.rjust(n), got.rjust(n))) / n
