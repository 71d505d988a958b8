"""A checkpoint or export write that runs out of disk space, reported as one line: :class:`DiskFull` (a user error,
exit 2) names the path, the bytes the write needed and the bytes free there, in place of the writer's own error
(torch's zip writer says ``[enforce fail at inline_container.cc:672] . unexpected pos ...``, safetensors ``I/O error:
No space left on device (os error 28)``). The writers write a temporary name that is renamed over the target only
when complete, so the target is as it was before the write: the previous checkpoint or export stays whole."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
# what a write failure looks like when the writer does not say why: torch's zip writer, safetensors
_WRITE_FAILED_TEXT = ("unexpected pos", "failed writing", "I/O error")


class DiskFull(OSError):
    """A write ran out of disk space; the message (one line) names the path, the bytes needed and free."""


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to this user on the file system of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def out_of_space(error: BaseException, needed: int, free: int) -> bool:
    """Whether ``error``, raised by a write of ``needed`` bytes that started with ``free`` bytes free, is a full
    disk."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
        return True
    text = str(error)
    if any(s in text for s in _NO_SPACE_TEXT):
        return True
    return free < needed and any(s in text for s in _WRITE_FAILED_TEXT)


@contextlib.contextmanager
def reporting_full_disk(path: str | os.PathLike, needed: Callable[[], int], what: str) -> Iterator[None]:
    """Raise :class:`DiskFull` for a write of ``path`` (``what``: "checkpoint", "export") that failed for want of
    space; other errors pass. ``needed()``: the bytes the write takes (asked only when it failed). The free space is
    the one the write started with: a failed writer's temporary file may hold its blocks until it is closed."""
    free = free_bytes(path)
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        n = needed()
        if not out_of_space(e, n, free):
            raise
        raise DiskFull(f"no space left on the device for the {what} {path}: it needs {size(n)} and {size(free)} "
                       f"were free there; {Path(path).name} is as it was before this write. Fix: free space there, or "
                       "write the run elsewhere (hydra.run.dir=...)") from e
