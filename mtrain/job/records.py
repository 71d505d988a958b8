"""The JSON records of a job (``metrics.json``, ``status.json``, ``info.json``): :func:`write_json` is the one
writer of them all, atomic (a reader never sees a partial file), non-finite numbers as null. Free of torch and
Lightning, so the CLI can record a job's end without importing them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary file renamed over it; NaN and +-inf become
    null (strict JSON has no such numbers), other objects their ``str``."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: a reader never sees a partial file
    tmp.write_text(json.dumps(clean(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def pct(x: Any) -> str:
    """A share as a percentage with one decimal for a printed summary; ``n/a`` for None or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def interruptions(status_path: Path) -> list[dict]:
    """The interruptions a job dir's ``status.json`` holds so far, oldest first: its earlier record's own list plus
    that record if it says ``interrupted``. A requeued or resumed job keeps them in its next ``status.json``."""
    try:
        old = json.loads(Path(status_path).read_text())
    except (OSError, ValueError):
        return []
    past = list(old.get("interruptions") or [])
    if old.get("status") == "interrupted":
        past.append({k: v for k, v in old.items() if k not in ("job", "overrides", "status", "interruptions")})
    return past
