"""Starting a model job: data module, the model (checkpoint or random init, on the meta device under FSDP), the
precision policy applied (router and RoPE at build, TF32 for the backends), seeds."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mtrain.config import ConfigError
from mtrain.data import MTrainDataModule, build_datamodule
from mtrain.models import CheckpointError, MoECausalLM, PrecisionPolicy, build_model, from_pretrained, read_config
from mtrain.models.factory import dtype_of
from mtrain.models.config import MoEConfig
from mtrain.models.flops import active_params_per_token
from mtrain.parallel.launch import slurm_cpus_per_task, uses_fsdp
from mtrain.parallel.lightning import FSDPPlan, plan_for

from .preflight import check_model_job
from .run import Job

log = logging.getLogger("mtrain")


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


def arch_of(model_cfg: DictConfig, vocab_size: int | None = None) -> MoEConfig:
    """The architecture dataclass of a random-init model; ``vocab_size`` grows it to fit a tokenizer."""
    arch: MoEConfig = OmegaConf.to_object(model_cfg.arch)  # type: ignore[assignment]
    if vocab_size is not None and vocab_size > arch.vocab_size:
        arch = dataclasses.replace(arch, vocab_size=vocab_size)
    return arch


def _check_vocab(vocab_size: int | None, arch: MoEConfig) -> None:
    if vocab_size is not None and vocab_size > arch.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but model.checkpoint's vocab_size is {arch.vocab_size}; "
            "use the checkpoint's own tokenizer.json"
        )


def model_from_config(
    model_cfg: DictConfig,
    policy: PrecisionPolicy,
    *,
    device: torch.device | str = "cpu",
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
) -> MoECausalLM:
    """Load ``model.checkpoint`` or build a random-init model of ``model.arch`` under ``policy`` in ``dtype``
    (default ``model.dtype``). ``device="meta"``: the config only, no memory (FSDP fills each rank's shards)."""
    dtype = dtype_of(dtype or model_cfg.dtype)
    if model_cfg.checkpoint:
        try:
            if str(device) == "meta":
                arch = read_config(model_cfg.checkpoint, model_cfg.name)
                _check_vocab(vocab_size, arch)
                return build_model(arch, dtype=dtype, device="meta", policy=policy, init=False)
            model = from_pretrained(model_cfg.checkpoint, dtype=dtype, device=device, policy=policy,
                                    expected_model_type=model_cfg.name)
        except CheckpointError as e:
            raise ConfigError(f"model.checkpoint: {e}") from None
        _check_vocab(vocab_size, model.config)
        return model
    return build_model(arch_of(model_cfg, vocab_size), dtype=dtype, device=device, policy=policy, seed=seed,
                       init=str(device) != "meta")


def meta_model(job: Job, vocab_size: Optional[int] = None) -> MoECausalLM:
    """The run's model on the meta device (FSDP shards and fills it inside fit)."""
    return model_from_config(job.cfg.model, job.plan.policy, device="meta", vocab_size=vocab_size)


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


def build_setup(job: Job) -> Setup:
    """Data module (set up), then the model (checkpoint or random init, grown to the tokenizer's vocabulary)."""
    cfg = job.cfg
    check_model_job(cfg, job.multirun)  # the CLI ran it already; code calling a task directly has not
    src = tokenizer_source(cfg)
    dm = build_datamodule(cfg.data, src)
    dm.setup()
    cuda = uses_cuda(cfg.trainer)
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA device is available; use trainer=cpu")
    devices = cfg.trainer.devices
    single = str(devices) == "1" or (OmegaConf.is_list(devices) and len(devices) == 1)
    fsdp = None
    if uses_fsdp(cfg.trainer):
        fsdp = plan_for(cfg.trainer.precision, cfg.model.checkpoint, cfg.seed,
                        cfg.trainer.get("fsdp_reshard_after_forward", True))
    device = "meta" if fsdp is not None else ("cuda" if (cuda and single) else "cpu")  # big checkpoints straight to GPU
    model = model_from_config(cfg.model, job.plan.policy, device=device, vocab_size=dm.vocab_size, seed=cfg.seed)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s (%s): %s parameters, %s active per token; dtype %s, router gate %s; data %s: %d train / %d val rows",
        cfg.model.name, cfg.model.checkpoint or "random init", _human(total), _human(active_params_per_token(model.config)),
        str(next(model.parameters()).dtype).removeprefix("torch."), str(model.gate_dtype()).removeprefix("torch."),
        dm.cfg.name, len(dm.train_set), len(dm.val_set) if dm.val_set is not None else 0,
    )
    return Setup(dm, model, cuda, src, fsdp)


def start_job(job: Job) -> Setup:
    """What every Lightning task does first: make the run dir, seed everything, build data + model, apply the
    precision policy to the matmul backends."""
    job.dir.mkdir(parents=True, exist_ok=True)
    threads = slurm_cpus_per_task()
    if threads and "OMP_NUM_THREADS" not in os.environ:  # the CPUs SLURM gave this task, not the whole node's
        torch.set_num_threads(threads)
        log.info("SLURM: %d CPU thread(s) per task (--cpus-per-task)", threads)
    L.seed_everything(job.cfg.seed, verbose=False)
    s = build_setup(job)
    job.plan.policy.apply_backends(s.cuda)
    return s


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))
