"""The rollout-engine interface: what GRPO, ``task=mismatch`` and the accuracy eval ask of an engine.

An engine turns a :class:`RolloutRequest` (token-id prompts, sampling settings, a seed, the RL step) into a
:class:`Rollout` (a :class:`~mtrain.models.generate.Generation`: tokens, logprobs, routing), takes new weights as
``(name, tensor)`` pairs (:meth:`RolloutEngine.update_weights`), and is closed when the job ends. Engines register by
name (:func:`register_engine`) and are built by name (:func:`build_engine`): ``fast`` (static KV cache + CUDA graphs,
optionally exact), ``recompute`` (the reference: the trainer's full forward per token), ``file`` (an external
engine's rollouts). An engine of one's own (an HTTP client of an inference server, say) is a class named by a dotted
path (``task.engine=my_pkg.engines.HttpEngine``), with its options in ``task.engine_args``.

``scoring`` says how the trainer recomputes this engine's logprobs to compare like with like: ``standard`` (the
trainer's forward, :func:`mtrain.models.generate.recompute`) or ``invariant`` (:func:`mtrain.models.decoding.score`
under the batch-invariant ops: the exact engine's path). ``exact``: that recompute gives the engine's numbers bit for
bit by construction.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional

import torch

from mtrain.models.generate import Generation
from mtrain.registry import Registry

SCORINGS = ("standard", "invariant")


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class RolloutRequest:
    prompts: list[list[int]]
    sampling: SamplingConfig
    seed: int = 0
    step: int = 0  # the RL step (an engine replaying a file returns that step's responses)


@dataclass
class Rollout:
    gen: Generation
    seconds: float  # wall time of the generation (synchronised on a GPU)
    examples: Optional[list[dict]] = None  # what the engine brought along (a file's text fields), else None
    rewards: Optional[list[float]] = None  # rewards the engine brought (a file's), else None: the task scores


class RolloutEngine:
    """Base class of every engine (see the module doc)."""

    name: ClassVar[str] = ""
    scoring: str = "standard"
    exact: bool = False
    syncs: int = 0  # weight hand-overs received

    def generate(self, request: RolloutRequest) -> Rollout:
        raise NotImplementedError

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take new weights (an engine without weights of its own ignores them)."""

    def warmup(self) -> None:
        """Pay one-time costs (kernel compilation) before the first timed rollout."""

    def close(self) -> None:
        """Free what the engine holds."""

    def describe(self) -> str:
        own = type(self).__dict__.get("name")  # registered under it; else (a subclass, a dotted path) its class path
        return own or f"{type(self).__module__}.{type(self).__qualname__}"


# what the framework hands an engine's constructor (a class takes those it names): the trainer to copy (``copy_of``,
# GRPO) or the model to share (``model``, task=mismatch), the run's precision policy and engine dtype, eos/pad ids,
# the mismatch stand-in (``inject``) and the exact-mode decision. Its own options come from ``task.engine_args``.
CONTEXT = ("copy_of", "model", "policy", "dtype", "eos_ids", "pad_id", "inject", "exact")
ENGINES: Registry = Registry("rollout engine", inputs=0, context=CONTEXT)


def register_engine(name: str) -> Callable[[type], type]:
    """Class decorator: make an engine buildable by name (``task.engine=<name>``)."""
    add = ENGINES.register(name)

    def register(cls: type) -> type:
        cls = add(cls)
        cls.name = name
        return cls

    return register


def build_engine(name: str, args: Optional[Mapping[str, Any]] = None, **context: Any) -> RolloutEngine:
    """The engine ``name`` (registered, or a dotted path ``package.module.Class``) built with the ``context`` keywords
    it names and its own options ``args`` (``task.engine_args``)."""
    return ENGINES.bind(name, context, args, where="task.engine_args")()


def choose_engine(engine: str, exact: bool, from_file: bool, exact_explicit: bool = False) -> tuple[str, bool]:
    """The engine a job runs and whether it is exact: ``auto`` is ``file`` with a rollout file, else ``fast``;
    ``exact`` is the precision plan's decision (``exact_rollout``: the RL decision, or ``task.exact`` when
    ``exact_explicit``). ValueError names a choice that cannot work; an engine of one's own runs with ``exact`` as
    given (its ``scoring`` says how the trainer recomputes its logprobs)."""
    if engine != "auto" and engine not in ENGINES:
        if "." not in engine:
            raise ValueError(f"engine={engine!r} is not one of auto, {', '.join(ENGINES.names())}, or a dotted path "
                             "package.module.Class to your own")
        ENGINES.get(engine)  # imports it: one line on a missing module or class
    if from_file:
        if engine not in ("auto", "file"):
            raise ValueError(f"engine={engine} samples in-process, but task.rollouts_path gives the rollouts; drop one")
        name, exact = "file", False
    elif engine == "file":
        raise ValueError("engine=file needs task.rollouts_path (an external engine's rollouts)")
    elif engine == "recompute":
        if exact_explicit and not exact:
            raise ValueError("the recompute engine is exact by construction (the trainer's own forward); use "
                             "engine=fast exact=false for an engine that is not")
        name, exact = "recompute", True
    else:
        name = "fast" if engine == "auto" else engine
    return name, exact


def task_engine(task: Any, exact_rollout: bool, from_file: bool = False) -> tuple[str, bool]:
    """(engine name, exact) of a task's ``engine``, ``exact`` and ``engine_args`` under the RL decision
    ``exact_rollout``: :func:`choose_engine`, then the options checked. ValueError in one line naming the keys."""
    try:
        name, exact = choose_engine(task.engine, exact_rollout, from_file, task.exact is not None)
    except ValueError as e:
        raise ValueError(f"task.engine / task.exact: {e}") from None
    check_engine_args(name, task.engine_args)
    return name, exact


def check_engine_args(name: str, args: Optional[Mapping[str, Any]]) -> None:
    """ValueError in one line when ``args`` (``task.engine_args``) holds an option engine ``name`` does not take."""
    if name == "file":
        if args:
            raise ValueError(f"task.engine_args ({', '.join(args)}): the file engine takes no options")
        return
    ENGINES.check(name, args, where="task.engine_args")
    missing = [k for k, default in ENGINES.options(name).items() if default is inspect.Parameter.empty
               and k not in (args or {})]
    if missing:
        raise ValueError(f"task.engine_args.{missing[0]}: rollout engine {name!r} needs it (its required options: "
                         f"{', '.join(missing)})")
