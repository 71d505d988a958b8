"""What every task shares: the run it works in (config, precision plan, run dir), starting a model job (data,
model, backends), accuracy of greedy answers, HF export and the metrics files.

A task is ``run(job: Job) -> dict``; the CLI builds the :class:`Job` once (precision decided once, config resolved
and saved) and hands it over. Code calling a task directly (tests, notebooks) uses :meth:`Job.prepare`.
"""

from mtrain._lazy import lazy_exports

_EXPORTS = {
    "accuracy_examples": "accuracy",
    "greedy_accuracy": "accuracy",
    "Setup": "build",
    "arch_of": "build",
    "build_setup": "build",
    "meta_model": "build",
    "model_from_config": "build",
    "start_job": "build",
    "tokenizer_source": "build",
    "uses_cuda": "build",
    "export_bytes": "outputs",
    "export_hf": "outputs",
    "finish": "outputs",
    "write_json": "records",
    "settings_from": "settings",
    "Job": "run",
    "UserError": "run",
    "user_error": "run",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
