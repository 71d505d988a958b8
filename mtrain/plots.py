"""Headless matplotlib figures for run outputs (loss, reward and mismatch curves, histograms). A leaf module: any
layer may use it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence


@contextlib.contextmanager
def figure(path: str | Path, size: tuple[float, float] = (6, 3.5), ncols: int = 1) -> Iterator:
    """One figure (Agg backend) whose axes are yielded (a list when ``ncols > 1``), saved to ``path`` at the end."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=size, dpi=110)
    try:
        yield ax
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)


def smooth(values: Sequence[float], k: int) -> list[float]:
    """Trailing mean over ``k`` values."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out
