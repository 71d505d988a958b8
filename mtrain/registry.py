"""Registries by name: what users extend (advantages, policy losses, loss aggregations, KL estimators, rollout
corrections, rewards, rollout engines) is a :class:`Registry` that a decorator adds to.

A piece is a function (or a class) registered under a name::

    from mtrain.rl.advantages import register_advantage

    @register_advantage("my_adv")
    def my_adv(rewards, *, scale: float = 1.0):  # rewards [N, G] -> advantages [N, G]
        return scale * (rewards - rewards.mean(dim=1, keepdim=True))

and chosen by that name in the config (``task.advantage=my_adv``). A name with a dot that is not registered is a
dotted path ``package.module.function``: the module is imported (its decorators register what it holds) and the
function is used, registered or not.

**Options.** The keyword parameters of a piece are its options. Two kinds of value reach them (:meth:`Registry.bind`):
what the framework hands every piece of the kind (the *context*, e.g. ``norm_std`` for advantages or ``clip_low`` for
policy losses: a piece receives those it names), and the piece's own options from one free-form config node per
kind (``task.advantage_args``, ``task.loss_args``, ...): ``task.advantage_args.scale=3`` on the command line, with
no ``+`` (the schema leaves these nodes open while every other node refuses unknown keys), or in a yaml::

    task:
      advantage: my_adv
      advantage_args: {scale: 3.0}

The task's config check, before anything is built, refuses in one line a name that is not registered (listing those
that are) and an option key the chosen piece does not take (listing its options).

Free of torch, Lightning and Hydra: every layer can register.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Generic, Iterator, Mapping, Optional, TypeVar

T = TypeVar("T")


def _clip(s: str, limit: int = 200) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def import_object(spec: str, noun: str, error: type[Exception] = ValueError) -> Any:
    """The attribute ``function`` of module ``package.module`` named by ``spec`` (``package.module.function``);
    ``error`` with one line saying what failed and the fix (``noun`` names what it is, e.g. "reward")."""
    module_name, attr = spec.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise error(f"{noun} {spec!r}: no module named {module_name!r}. Fix: check the spelling, and "
                        f"that the module is importable (installed, or its folder on PYTHONPATH).") from e
        raise error(f"{noun} {spec!r}: importing {module_name!r} failed ({type(e).__name__}: {e}). Fix: "
                    f"install what it imports.") from e
    except Exception as e:
        raise error(f"{noun} {spec!r}: importing {module_name!r} raised {type(e).__name__}: {_clip(str(e))}. Fix: "
                    f"fix the error in that module.") from e
    if not hasattr(module, attr):
        raise error(f"{noun} {spec!r}: module {module_name!r} has no attribute {attr!r}. Fix: check the "
                    f"function name.")
    return getattr(module, attr)


class Registry(Generic[T]):
    """Pieces of one kind by name. ``noun`` names a choice in messages ("advantage mode", "reward", ...);
    ``error`` is the exception a bad choice or option raises (ValueError unless the kind has its own); ``inputs``:
    how many leading positional parameters of a piece are its inputs (the tensors it works on), not options;
    ``context``: the names of what the framework hands every piece of the kind (see the module doc)."""

    def __init__(self, noun: str, inputs: int, context: tuple[str, ...] = (), error: type[Exception] = ValueError):
        self.noun, self.inputs, self.context, self.error = noun, inputs, context, error
        self._items: dict[str, T] = {}

    # -- registering ---------------------------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the function or class under ``name`` (again under the same name: only the same object)."""

        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.noun} {name!r} is already registered ({_qualname(self._items[name])})")
            self._items[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    # -- looking up ----------------------------------------------------------------------------------------------
    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()

    def get(self, name: Any) -> T:
        """The piece registered as ``name``; a dotted ``package.module.function`` is imported (see the module doc);
        a callable is itself. ``error`` naming the registered choices otherwise."""
        if isinstance(name, str) and name in self._items:
            return self._items[name]
        if callable(name) and not isinstance(name, str):  # a piece given as it is (a function)
            return name
        names = ", ".join(self._items)
        if not isinstance(name, str):
            raise self.error(f"{self.noun} {name!r} is a {type(name).__name__}. Fix: give a {self.noun} name "
                             f"({names}) or a dotted path package.module.function.")
        if "." not in name:
            raise self.error(f"unknown {self.noun} {name!r}. Fix: use one of {names}, or a dotted path "
                             f"package.module.function to your own.")
        obj = import_object(name, self.noun, self.error)
        if name in self._items:  # the import registered it under its dotted name
            return self._items[name]
        if not callable(obj):
            raise self.error(f"{self.noun} {name!r} is a {type(obj).__name__}, not callable. Fix: point it at a "
                             f"function.")
        return obj

    # -- options -------------------------------------------------------------------------------------------------
    def options(self, name: Any) -> dict[str, Any]:
        """The options of piece ``name`` a config may set: its keyword parameters that the framework does not hand
        it, with their defaults (``inspect.Parameter.empty`` for a required one)."""
        params, _ = _keywords(self.get(name), self.inputs)
        return {k: v for k, v in params.items() if k not in self.context}

    def check(self, name: Any, args: Optional[Mapping[str, Any]] = None, where: str = "") -> None:
        """What :meth:`bind` would refuse (an unknown piece, an option it does not take), without calling it."""
        self.bind(name, dict.fromkeys(self.context), args, where)

    def bind(self, name: Any, context: Mapping[str, Any] = {}, args: Optional[Mapping[str, Any]] = None,
             where: str = "") -> Callable[..., Any]:
        """Piece ``name`` with its keywords filled: from ``context`` those it names (all, if it takes
        ``**kwargs``), and every key of ``args`` (its options from config). ``error`` on a key of ``args`` the
        piece does not take, or one the framework already hands it; ``where`` names the config node in that
        message (``task.advantage_args``)."""
        fn = self.get(name)
        params, var_kw = _keywords(fn, self.inputs)
        args = dict(args or {})
        node = where or f"{self.noun} options"
        name = name if isinstance(name, str) else getattr(fn, "__qualname__", type(fn).__name__)
        for key in args:
            if key in context:
                raise self.error(f"{node}.{key}: {key} is set by the framework for every {self.noun}, not as an "
                                 f"option of {name!r}")
            if key not in params and not var_kw:
                known = ", ".join(k for k in params if k not in context) or "none"
                raise self.error(f"{node}.{key}: {self.noun} {name!r} takes no option {key!r}; its options: {known}")
        given = {k: v for k, v in context.items() if var_kw or k in params}
        return functools.partial(fn, **given, **args)


def _keywords(fn: Callable, inputs: int) -> tuple[dict[str, Any], bool]:
    """(the options: keyword-passable parameters after the first ``inputs`` -> default, whether it takes
    ``**kwargs``) of a function, or of a class's ``__init__``."""
    try:
        return _signature_keywords(fn, inputs)
    except TypeError:  # an unhashable callable: not cached
        return _signature_keywords.__wrapped__(fn, inputs)


@functools.lru_cache(maxsize=None)
def _signature_keywords(fn: Callable, inputs: int) -> tuple[dict[str, Any], bool]:
    params = list(inspect.signature(fn).parameters.values())
    options = {p.name: p.default for p in params[inputs:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return options, any(p.kind is p.VAR_KEYWORD for p in params)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
