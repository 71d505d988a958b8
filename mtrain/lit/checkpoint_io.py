"""Checkpoint files written by streaming ``torch.save`` into a temporary file that is renamed over the target, in a
background thread. A write that runs out of disk space stops the job with one line (``mtrain.disk.DiskFull``).

Lightning's own save (``_atomic_save``) first serializes the whole checkpoint into an in-memory buffer and then
copies the buffer to disk: for a 3.1B-parameter model with its AdamW moments that is a 19 GB buffer, twice the host
memory and about half the disk's pace of a streaming ``torch.save`` (``benchmarks/RESULTS.md``, ``disk_write``).
Writing straight to ``.<name>.<pid>.partial`` and renaming keeps the save atomic: a killed write leaves the
previous file, never a partial one under the checkpoint's name.

:class:`BackgroundCheckpointIO` takes the training loop off the disk's clock: a save snapshots every tensor of the
checkpoint (the loop waits for that copy only: the optimizer goes on changing the tensors in place) and a thread
writes the snapshot. On a GPU with room for a second copy of the checkpoint beside the run's peak memory, the snapshot
is a device copy (milliseconds; the thread then copies it to host memory on a side stream); otherwise, and on the
CPU, a host copy (fresh host pages fill at about 1 GB/s: 20 s for the 18.7 GB of a 3.1B-parameter model with its
AdamW moments, measured on an H200 host). One write is in flight at a time: the next save, a checkpoint removal and
:func:`wait_for_checkpoints` (at the end of a job, before a requeue) wait for it, and raise its error if it failed.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from mtrain.disk import reporting_full_disk

_LIVE: "weakref.WeakSet[BackgroundCheckpointIO]" = weakref.WeakSet()


class StreamingCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options is not supported by mtrain's checkpoint writer")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with reporting_full_disk(path, lambda: tensor_bytes(checkpoint), "checkpoint"):  # a full disk: one line
            try:
                torch.save(checkpoint, tmp)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise


_GIB = 2**30


def tensor_bytes(checkpoint: Any) -> int:
    """The bytes of the tensors in ``checkpoint``: what its file takes, less a little for the rest."""
    sizes: list[int] = []
    apply_to_collection(checkpoint, torch.Tensor, lambda t: sizes.append(t.numel() * t.element_size()))
    return sum(sizes)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()


def _device_snapshot_fits(checkpoint: dict[str, Any]) -> Optional[torch.device]:
    """The CUDA device of the checkpoint's tensors if a copy of them fits beside the run's peak memory there (with a
    10% + 1 GiB margin), else None."""
    sizes: dict[torch.device, int] = {}

    def count(t: torch.Tensor) -> None:
        sizes[t.device] = sizes.get(t.device, 0) + t.numel() * t.element_size()

    apply_to_collection(checkpoint, torch.Tensor, count)
    cuda = [d for d in sizes if d.type == "cuda"]
    if len(cuda) != 1:
        return None
    device = cuda[0]
    free, _ = torch.cuda.mem_get_info(device)
    room = free + torch.cuda.memory_reserved(device) - torch.cuda.max_memory_allocated(device)
    return device if sizes[device] <= 0.9 * room - _GIB else None


def _to_host_on_side_stream(snapshot: dict[str, Any], ready: "torch.cuda.Event", device: torch.device) -> dict:
    """Copy a device snapshot to host memory on a stream of its own (the training stream goes on)."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            host = apply_to_collection(snapshot, torch.Tensor, lambda t: t.to("cpu") if t.is_cuda else t)
        stream.synchronize()
    return host


class BackgroundCheckpointIO(StreamingCheckpointIO):
    """:class:`StreamingCheckpointIO` in a background thread, after a snapshot of the checkpoint's tensors (a device
    copy where the GPU has room, else a host copy). ``write_seconds`` sums the background writes (with the device
    snapshots' copies to host memory), ``write_bytes`` the bytes they wrote."""

    def __init__(self) -> None:
        super().__init__()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.write_seconds = 0.0
        self.write_bytes = 0
        self.device_snapshots = 0  # saves whose snapshot was a device copy
        _LIVE.add(self)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        self.wait()
        device, ready = _device_snapshot_fits(checkpoint), None
        if device is not None:
            snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().clone())
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        else:
            snapshot = apply_to_collection(checkpoint, torch.Tensor, _host_copy)
        self.device_snapshots += device is not None
        self._thread = threading.Thread(target=self._write, args=(snapshot, path, storage_options, ready, device),
                                        name="mtrain-checkpoint-writer")  # not a daemon: exit waits for the write
        self._thread.start()

    def _write(self, snapshot: dict[str, Any], path, storage_options, ready, device) -> None:
        t0 = time.perf_counter()
        try:
            if ready is not None:
                snapshot = _to_host_on_side_stream(snapshot, ready, device)
            super().save_checkpoint(snapshot, path, storage_options)
            self.write_bytes += Path(path).stat().st_size
        except BaseException as e:  # noqa: BLE001  (raised in the caller's thread by wait())
            self._error = e
        self.write_seconds += time.perf_counter() - t0

    @property
    def pending(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def remove_checkpoint(self, path) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        """Lightning calls this at the end of every fit/validate: the write goes on (a job's final validation and
        export overlap it); :func:`wait_for_checkpoints` ends it."""
        if self._error is not None:
            self.wait()


class CheckpointWrites(NamedTuple):
    waited_s: float  # how long the caller waited for the write in flight
    written_s: float  # what all of this process's background writes took
    written_bytes: int  # what they wrote


def wait_for_checkpoints() -> CheckpointWrites:
    """Wait for every background checkpoint write of this process (raise a failed write's error); say how long that
    took and what all of them wrote."""
    t0 = time.perf_counter()
    ios = list(_LIVE)
    for io in ios:
        io.wait()
        _LIVE.discard(io)  # counted once: the next job of this process (a multirun) starts from zero
    return CheckpointWrites(time.perf_counter() - t0, sum(io.write_seconds for io in ios),
                            sum(io.write_bytes for io in ios))
