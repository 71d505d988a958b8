"""Putting a run together from the prepared config: data -> model -> callbacks -> loggers -> trainer."""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mtrain.data import MTrainDataModule, build_datamodule
from mtrain.lit.callbacks import SaveLastOnTrainEnd, StepProgressBar, make_checkpoint, make_loggers
from mtrain.models import MoECausalLM
from mtrain.parallel import export_hf as export_sharded
from mtrain.parallel import is_sharded
from mtrain.parallel.launch import check_launch, multirun
from mtrain.parallel.lightning import FSDPPlan, meta_model, plan_for, trainer_kwargs, uses_fsdp

log = logging.getLogger("mtrain")

# Lightning hints that do not apply to the tiny in-memory datasets of mtrain (the data is tokenized up front).
_QUIET = (
    r".*does not have many workers.*",
    r".*is smaller than the logging interval.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # val/loss and val/ppl are already summed over ranks (MoELitModule.on_validation_epoch_end)
    r".*when logging on epoch level in distributed setting to accumulate the metric across devices.*",
    # trainer=fsdp: last.ckpt is a distributed-checkpoint folder, rewritten in place on purpose
    r".*Detected an existing checkpoint in .*overwriting since self.overwrite=True.*",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if "Tip:" in msg:
            return False
        # with an fp32 gate, TF32 is off on purpose (configure_backends); Lightning's hint to turn it on is noise
        return not ("set_float32_matmul_precision" in msg and not torch.backends.cuda.matmul.allow_tf32)


def quiet_lightning() -> None:
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    rz = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rz.filters):
        rz.addFilter(_DropTips())


def uses_cuda(trainer_cfg: Any) -> bool:
    """Whether ``trainer.accelerator`` puts the run on CUDA (``gpu``/``cuda``, or ``auto`` with a GPU present)."""
    acc = str(trainer_cfg.accelerator).lower()
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def tokenizer_source(cfg: DictConfig) -> Optional[Path]:
    """Where the tokenizer comes from: ``data.tokenizer_path``, else ``model.checkpoint``'s tokenizer.json, else
    None (the synthetic task's own tokenizer; JSONL/text data then fails with a message saying what to set)."""
    if cfg.data.get("tokenizer_path"):
        return Path(str(cfg.data.tokenizer_path)).expanduser()
    ckpt = cfg.model.checkpoint
    if ckpt and (Path(str(ckpt)).expanduser() / "tokenizer.json").is_file():
        return Path(str(ckpt)).expanduser()
    return None


def configure_backends(moe_gate_fp32: bool, cuda: bool) -> None:
    """With an fp32 gate on CUDA, fp32 matmuls must be real fp32: TF32 off (cuBLAS and cuDNN)."""
    if cuda and moe_gate_fp32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        warnings.filterwarnings("ignore", message=r".*TensorFloat32 tensor cores for float32 matrix multiplication.*")
        log.info("moe_gate_fp32: TF32 disabled so the fp32 gate GEMM runs in full fp32")


@dataclass
class Setup:
    datamodule: MTrainDataModule
    model: MoECausalLM  # on the meta device under trainer=fsdp until configure_model shards and fills it
    cuda: bool
    tokenizer_from: Optional[Path]
    fsdp: Optional[FSDPPlan] = None  # trainer=fsdp: what MoELitModule.configure_model does to the model

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.cuda else "cpu")


def build_setup(cfg: DictConfig) -> Setup:
    """Data module (set up), then the model (checkpoint or random init, grown to the tokenizer's vocabulary)."""
    from mtrain.tasks.common import model_from_config

    missing = sorted(f"{node}.{key}" for node in ("model", "data") for key in cfg[node] if OmegaConf.is_missing(cfg[node], key))
    if missing:
        from mtrain.config import ConfigError

        raise ConfigError(f"{', '.join(missing)} must be set (it is ???): e.g. python -m mtrain {missing[0]}=/path/to/it")
    # before any work: a multi-process job under -m must come from torchrun/SLURM, not from Lightning re-running argv
    check_launch(cfg.trainer.devices, cfg.trainer.num_nodes, multirun=multirun(), accelerator=str(cfg.trainer.accelerator))
    src = tokenizer_source(cfg)
    dm = build_datamodule(cfg.data, src)
    dm.setup()
    cuda = uses_cuda(cfg.trainer)
    if cuda and not torch.cuda.is_available():
        from mtrain.config import ConfigError

        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA device is available; use trainer=cpu")
    devices = cfg.trainer.devices
    single = str(devices) == "1" or (OmegaConf.is_list(devices) and len(devices) == 1)
    device = "cuda" if (cuda and single) else "cpu"  # big checkpoints go straight to the GPU
    fsdp = plan_for(cfg) if uses_fsdp(cfg.trainer) else None
    if fsdp is not None:  # no memory yet: each rank fills its own shards in configure_model
        model = meta_model(cfg.model, vocab_size=dm.vocab_size)
    else:
        model = model_from_config(cfg.model, device=device, vocab_size=dm.vocab_size, seed=cfg.seed)
    from mtrain.lit.flops import active_params_per_token

    total = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s (%s): %s parameters, %s active per token; dtype %s, router gate %s; data %s: %d train / %d val rows",
        cfg.model.name, cfg.model.checkpoint or "random init", _human(total), _human(active_params_per_token(model.config)),
        str(next(model.parameters()).dtype).removeprefix("torch."), str(model.gate_dtype()).removeprefix("torch."),
        dm.cfg.name, len(dm.train_set), len(dm.val_set) if dm.val_set is not None else 0,
    )
    return Setup(dm, model, cuda, src, fsdp)


def start_job(cfg: DictConfig):
    """What every Lightning task does first: prepare the config (a no-op when the CLI already did), make the run
    dir, seed everything, build data + model, set the matmul backends for the gate policy.
    Returns (prepared cfg, precision plan, run dir, Setup)."""
    import lightning as L

    from mtrain.config import job_dir, prepare_run

    cfg, plan = prepare_run(cfg)
    out = job_dir()
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, verbose=False)
    s = build_setup(cfg)
    configure_backends(plan.moe_gate_fp32, s.cuda)
    return cfg, plan, out, s


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    *,
    has_val: bool = True,
    callbacks: Iterable[L.Callback] = (),
    checkpoint: bool = True,
    save_top_k: int = 1,
    **overrides: Any,
) -> L.Trainer:
    """A ``lightning.Trainer`` from ``cfg.trainer`` (its keys are Trainer kwargs) with the run's loggers/callbacks."""
    quiet_lightning()
    kw: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    kw.update(overrides)
    kw = trainer_kwargs(kw, multirun=multirun())  # strategy=fsdp2 -> ModelParallelStrategy; the -m launch check
    if not has_val:
        kw["limit_val_batches"] = 0
        kw["num_sanity_val_steps"] = 0
    cbs = list(callbacks)
    if kw.get("enable_progress_bar", True):
        cbs.append(StepProgressBar())
    if checkpoint:
        cbs += [make_checkpoint(run_dir, has_val, save_top_k), SaveLastOnTrainEnd()]
    return L.Trainer(
        default_root_dir=str(run_dir),
        logger=make_loggers(run_dir),
        callbacks=cbs,
        enable_checkpointing=checkpoint,
        enable_model_summary=False,  # the tasks log their own one-line summary (total and active parameters)
        **kw,
    )


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(data), indent=2) + "\n")
    return path


_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def export_hf(
    model: MoECausalLM, dm: MTrainDataModule, tokenizer_from: Optional[Path], dest: Path, dtype: Optional[torch.dtype] = None
) -> Optional[Path]:
    """Write ``model`` as an HF checkpoint folder at ``dest`` with its tokenizer: the source tokenizer.json (and its
    tokenizer_config.json etc.) copied as is, or -- for the synthetic task -- the synthetic tokenizer saved.

    A sharded model (``trainer=fsdp``) is streamed (``mtrain.parallel.export_hf``: one parameter gathered at a time,
    rank 0 writes): call it on every rank; it returns ``dest`` on rank 0 and None elsewhere. ``dtype``: write the
    weights in this dtype (the gate keeps its policy dtype)."""
    import shutil

    from mtrain.data import save_tokenizer

    tok_file = None
    if tokenizer_from is not None:
        tok_file = tokenizer_from / "tokenizer.json" if tokenizer_from.is_dir() else tokenizer_from
    if is_sharded(model):
        if export_sharded(model, dest, tokenizer_file=tok_file, overwrite=True, dtype=dtype) is None:
            return None  # not rank 0
    else:
        model.save_pretrained(dest, tokenizer_file=tok_file, overwrite=True, dtype=dtype)
    if tok_file is None:
        save_tokenizer(dm.tokenizer, dest)
    else:
        for name in _TOKENIZER_SIDE_FILES:
            side = tok_file.parent / name
            if side.is_file():
                shutil.copyfile(side, dest / name)
    return dest
