"""``task=grpo``: RL fine-tuning of an MoE model with GRPO-family losses on the embedded rollout path.

One module per job of the task: :mod:`.checks` (the config check, run by the CLI before Lightning is imported, and
the settings built from the config), :mod:`.inputs` (prompts, the reward, an external engine's rollout file),
:mod:`.task` (``run``: warm start, engine, Lightning fit, export) and :mod:`.report` (final metrics, plots, the
printed summary). The warm start is :mod:`mtrain.job.warm_start`.
"""

from mtrain._lazy import lazy_exports

_EXPORTS = {
    "check_config": "checks",
    "run": "task",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
