"""What every model-running task shares: the model from ``cfg.model`` under the run's precision decision."""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig, OmegaConf

from mtrain.config import ConfigError
from mtrain.models import CheckpointError, MoECausalLM, build_model, from_pretrained
from mtrain.models.config import MoEConfig


def arch_of(model_cfg: DictConfig, vocab_size: int | None = None) -> MoEConfig:
    """The architecture dataclass of a random-init model; ``vocab_size`` grows it to fit a tokenizer."""
    arch: MoEConfig = OmegaConf.to_object(model_cfg.arch)  # type: ignore[assignment]
    if vocab_size is not None and vocab_size > arch.vocab_size:
        arch = dataclasses.replace(arch, vocab_size=vocab_size)
    return arch


def model_from_config(
    model_cfg: DictConfig,
    *,
    device: torch.device | str = "cpu",
    vocab_size: int | None = None,
    seed: int = 0,
    moe_gate_fp32: bool | None = None,
    rope_fp32: bool | None = None,
    dtype: str | None = None,
) -> MoECausalLM:
    """Load ``model.checkpoint`` or build a random-init model of ``model.arch``, with the decided gate/RoPE
    precision and dtype (each overridable, e.g. for the trainer vs rollout profiles of ``task=mismatch``)."""
    gate = model_cfg.moe_gate_fp32 if moe_gate_fp32 is None else moe_gate_fp32
    rope = model_cfg.rope_fp32 if rope_fp32 is None else rope_fp32
    dtype = dtype or model_cfg.dtype
    if model_cfg.checkpoint:
        try:
            model = from_pretrained(
                model_cfg.checkpoint, dtype=dtype, device=device, moe_gate_fp32=bool(gate), rope_fp32=bool(rope),
                expected_model_type=model_cfg.name,
            )
        except CheckpointError as e:
            raise ConfigError(f"model.checkpoint: {e}") from None
        if vocab_size is not None and vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {vocab_size} tokens but model.checkpoint's vocab_size is "
                f"{model.config.vocab_size}; use the checkpoint's own tokenizer.json"
            )
        return model
    return build_model(
        arch_of(model_cfg, vocab_size), dtype=dtype, device=device, moe_gate_fp32=bool(gate), rope_fp32=bool(rope),
        seed=seed,
    )
