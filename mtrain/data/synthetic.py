"""Built-in synthetic tasks with a verifiable answer, generated deterministically from a seed.

=========  ==================  ==========  ==============================
task       prompt              response    problem space (n = num_digits)
=========  ==================  ==========  ==============================
add        ``37+48=``          ``85``      10**(2n) pairs, operands < 10**n
sort       ``sort:3142=``      ``1234``    10**n digit strings of length n
reverse    ``reverse:3142=``   ``2413``    10**n digit strings of length n
=========  ==================  ==========  ==============================

Each split is a sample *without replacement* from the problem space, drawn by a ``random.Random`` seeded with a
string naming task, digits, seed and split (so train and val use different streams), and the val split is drawn
only from problems not in train: the two never overlap. ``check_answer`` recomputes the answer from the prompt.
"""

from __future__ import annotations

import random
import re
from typing import Dict, Iterable, List, Optional, Set, Tuple

from mtrain.data.errors import DataError

TASKS = ("add", "sort", "reverse")
Example = Dict[str, str]

_PROMPT_RE = {
    "add": re.compile(r"^(\d+)\+(\d+)=$"),
    "sort": re.compile(r"^sort:(\d+)=$"),
    "reverse": re.compile(r"^reverse:(\d+)=$"),
}


def space_size(task: str, num_digits: int) -> int:
    """Number of distinct problems of a task."""
    _check_task(task)
    return 10 ** (2 * num_digits) if task == "add" else 10**num_digits


def make_example(task: str, num_digits: int, index: int) -> Example:
    """The ``index``-th problem of the task's space (0 <= index < space_size)."""
    if task == "add":
        a, b = divmod(index, 10**num_digits)
        prompt = f"{a}+{b}="
    else:
        prompt = f"{task}:{index:0{num_digits}d}="
    return {"prompt": prompt, "response": solve(prompt)}


def solve(prompt: str) -> str:
    """The correct response to a synthetic prompt (``ValueError`` if the prompt is not one)."""
    for task, rx in _PROMPT_RE.items():
        m = rx.match(prompt)
        if m:
            if task == "add":
                return str(int(m.group(1)) + int(m.group(2)))
            if task == "sort":
                return "".join(sorted(m.group(1)))
            return m.group(1)[::-1]
    raise ValueError(f"not a synthetic-task prompt: {prompt!r}")


def check_answer(prompt: str, generated_text: str) -> bool:
    """Exact match of a generated continuation with the right answer. The continuation is cut at the first
    ``<eos>`` (if the decoder kept special tokens) and stripped of surrounding whitespace; nothing else is forgiven."""
    text = generated_text.split("<eos>", 1)[0].strip()
    return text == solve(prompt)


def _rng(task: str, num_digits: int, seed: int, split: str) -> random.Random:
    return random.Random(f"mtrain-synthetic:{task}:{num_digits}:{seed}:{split}")  # str seeds are stable (sha512)


def _sample(rng: random.Random, space: int, n: int, exclude: Set[int]) -> List[int]:
    if space - len(exclude) < n:
        raise DataError(f"asked for {n} problems but only {space - len(exclude)} are left in a space of {space}")
    if not exclude:
        return rng.sample(range(space), n)
    if space <= 2_000_000:
        return rng.sample([i for i in range(space) if i not in exclude], n)
    out: List[int] = []
    seen = set(exclude)
    while len(out) < n:  # space >> n here: rejection terminates fast
        i = rng.randrange(space)
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"data.task={task!r} is not a synthetic task; use one of {', '.join(TASKS)}")


def generate_splits(
    task: str = "add", num_digits: int = 2, num_train: int = 5000, num_val: int = 200, seed: int = 0
) -> Tuple[List[Example], List[Example]]:
    """``(train, val)`` lists of ``{"prompt", "response"}``; deterministic in all arguments, disjoint, no repeats."""
    _check_task(task)
    space = space_size(task, num_digits)
    if num_train + num_val > space:
        raise DataError(
            f"synthetic task {task!r} with num_digits={num_digits} has only {space} distinct problems, fewer than "
            f"num_train + num_val = {num_train + num_val}. Fix: lower data.num_train/data.num_val or raise "
            f"data.num_digits."
        )
    train_idx = _sample(_rng(task, num_digits, seed, "train"), space, num_train, set())
    val_idx = _sample(_rng(task, num_digits, seed, "val"), space, num_val, set(train_idx))
    return ([make_example(task, num_digits, i) for i in train_idx],
            [make_example(task, num_digits, i) for i in val_idx])


def generate(task: str, num_digits: int, n: int, seed: int, exclude: Optional[Iterable[Example]] = None
             ) -> List[Example]:
    """``n`` distinct problems from seed ``seed``, none of whose prompts is in ``exclude``."""
    _check_task(task)
    space = space_size(task, num_digits)
    ex: Set[int] = set()
    for e in exclude or ():
        ex.add(_index(task, num_digits, e["prompt"]))
    idx = _sample(_rng(task, num_digits, seed, "extra"), space, n, ex)
    return [make_example(task, num_digits, i) for i in idx]


def _index(task: str, num_digits: int, prompt: str) -> int:
    m = _PROMPT_RE[task].match(prompt)
    if not m:
        raise ValueError(f"not a {task!r} prompt: {prompt!r}")
    if task == "add":
        return int(m.group(1)) * 10**num_digits + int(m.group(2))
    return int(m.group(1))
