"""Rollout engines behind one interface (:mod:`.base`), registered by name: ``fast``, ``recompute``, ``file``."""

from .base import ENGINES, SCORINGS, Rollout, RolloutEngine, RolloutRequest, SamplingConfig, build_engine, register_engine
from .embedded import FastEngine, MismatchInjection, ModelEngine, RecomputeEngine
from .file import FileEngine

__all__ = [
    "ENGINES", "SCORINGS", "FastEngine", "FileEngine", "MismatchInjection", "ModelEngine", "RecomputeEngine",
    "Rollout", "RolloutEngine", "RolloutRequest", "SamplingConfig", "build_engine", "register_engine",
]
