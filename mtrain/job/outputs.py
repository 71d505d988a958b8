"""What a job leaves behind: ``metrics.json`` and the printed summary, and the HF export with its tokenizer."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mtrain.data import MTrainDataModule, save_tokenizer
from mtrain.disk import reporting_full_disk
from mtrain.lit.checkpoint_io import wait_for_checkpoints
from mtrain.lit.loggers import finish_loggers
from mtrain.models import MoECausalLM, save_pretrained
from mtrain.parallel import export_hf as export_sharded
from mtrain.parallel import is_sharded
from mtrain.job.records import write_json


def finish(run_dir: Path, metrics: dict, files: dict, t_start: float, rank_zero: bool,
           summary: Callable[[dict], None], last_step_at: Optional[float] = None) -> dict:
    """The end of every training job: wall time and files into ``metrics``, the final metrics and plots to the
    loggers, ``metrics.json`` and the printed summary (rank 0); returns ``metrics``. ``last_step_at``:
    ``perf_counter()`` at the end of the last training step, for ``seconds.after_last_step`` (what the job's end
    costs: final validation, checkpoint, export)."""
    writes = wait_for_checkpoints()  # the last write overlapped the job's end; it is on disk from here
    if isinstance(metrics.get("seconds"), dict):
        metrics["seconds"]["checkpoint_wait_at_end"] = round(writes.waited_s, 3)  # what the job still waited for it
        metrics["seconds"]["checkpoint_writes"] = round(writes.written_s, 3)  # in the background thread, all writes
        if last_step_at is not None:
            metrics["seconds"]["after_last_step"] = round(time.perf_counter() - last_step_at, 3)
    if writes.written_bytes:  # the writer's pace (its copy to host memory included): it bounds a large job's end
        metrics["checkpoint_written_gb"] = round(writes.written_bytes / 1e9, 6)
        metrics["checkpoint_write_mb_per_s"] = round(writes.written_bytes / 1e6 / max(writes.written_s, 1e-9), 1)
    metrics["wall_s"] = time.perf_counter() - t_start
    metrics["files"] = files
    loggers = finish_loggers(run_dir, metrics, rank_zero)  # final metrics and plots to W&B, MLflow, TensorBoard
    if loggers:
        files["loggers"] = loggers
    if rank_zero:
        write_json(run_dir / "metrics.json", metrics)
        summary(metrics)
    return metrics


_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def copy_tokenizer_side_files(source: Path, folder: Path) -> None:
    """The tokenizer's companions in ``source`` (chat template, eos and generation settings) into ``folder``."""
    for name in _TOKENIZER_SIDE_FILES:
        side = source / name
        if side.is_file():
            shutil.copyfile(side, folder / name)


def export_hf(
    model: MoECausalLM, dm: MTrainDataModule, tokenizer_from: Optional[Path], dest: Path, dtype: Optional[torch.dtype] = None
) -> Optional[Path]:
    """Write ``model`` as an HF checkpoint folder at ``dest`` with its tokenizer: the source tokenizer.json (and its
    tokenizer_config.json etc.) copied as is, or -- for the synthetic task -- the synthetic tokenizer saved.

    A sharded model (``trainer=fsdp``) is streamed (``mtrain.parallel.export_hf``: one parameter gathered at a time,
    rank 0 writes): call it on every rank; it returns ``dest`` on rank 0 and None elsewhere. ``dtype``: write the
    weights in this dtype (the gate keeps its policy dtype). A disk too full for it: :class:`mtrain.disk.DiskFull`, and
    the previous ``dest`` stays whole."""
    tok_file = None
    if tokenizer_from is not None:
        tok_file = tokenizer_from / "tokenizer.json" if tokenizer_from.is_dir() else tokenizer_from

    def tokenizer_files(folder: Path) -> None:  # written before the folder is published (atomic export)
        if tok_file is None:
            save_tokenizer(dm.tokenizer, folder)
            return
        copy_tokenizer_side_files(tok_file.parent, folder)

    with reporting_full_disk(dest, lambda: export_bytes(model, dtype), "export"):  # a full disk: one line
        if is_sharded(model):
            return export_sharded(model, dest, tokenizer_file=tok_file, overwrite=True, dtype=dtype,
                                  extra=tokenizer_files)
        return save_pretrained(model, dest, tokenizer_file=tok_file, overwrite=True, dtype=dtype, extra=tokenizer_files)


def export_bytes(model: MoECausalLM, dtype: Optional[torch.dtype] = None) -> int:
    """About what an HF export of ``model`` takes: its tensors, floating ones in ``dtype`` if given."""
    def nbytes(t: torch.Tensor) -> int:
        itemsize = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        return t.numel() * itemsize

    return sum(nbytes(t) for t in [*model.parameters(), *model.buffers()])
