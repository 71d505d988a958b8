"""Runtime settings objects from the config, one way for all of them: :func:`settings_from`.

A settings dataclass (``GRPOSettings``, ``LossSettings``, ``OptimSettings``, ``CorrectionConfig``, ...) names its
fields after the config keys it reads, so it is built by name from one or more config nodes: a new setting is one
field in the schema and one field of the same name in the settings class, with no conversion code in between.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any, Mapping, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

T = TypeVar("T")


def settings_from(cls: type[T], *sources: Any, **given: Any) -> T:
    """An instance of dataclass ``cls``: each field from ``given`` if there (a config key of another name), else from
    the first of ``sources`` (config nodes, dicts or objects) that has a key of its name, else the field's default.
    Values are made plain:
    an OmegaConf node becomes a dict/list, an enum its value, a list a tuple where the field is a tuple, and a
    mapping for a dataclass-typed field is built into that dataclass (by this same rule). Keys of a source that
    ``cls`` does not name are left alone (a source is a whole config node)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        if f.name in given:
            kwargs[f.name] = _convert(given[f.name], hints.get(f.name, Any))
            continue
        for source in sources:
            found, value = _lookup(source, f.name)
            if found:
                kwargs[f.name] = _convert(value, hints.get(f.name, Any))
                break
    return cls(**kwargs)


def _lookup(source: Any, key: str) -> tuple[bool, Any]:
    if isinstance(source, DictConfig):
        return (True, source[key]) if key in source else (False, None)
    if isinstance(source, Mapping):
        return (True, source[key]) if key in source else (False, None)
    return (True, getattr(source, key)) if hasattr(source, key) else (False, None)


def _convert(value: Any, hint: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    value = _plain(value)
    target = _dataclass_in(hint)
    if target is not None and isinstance(value, Mapping):
        return settings_from(target, value)
    if isinstance(value, list) and _is_tuple(hint):
        return tuple(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass of a field typed ``X`` or ``Optional[X]``, else None."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    for c in candidates:
        if isinstance(c, type) and dataclasses.is_dataclass(c):
            return c
    return None


def _is_tuple(hint: Any) -> bool:
    candidates = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return any(c is tuple or typing.get_origin(c) is tuple for c in candidates)
