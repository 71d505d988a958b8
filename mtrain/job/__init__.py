"""What every task shares: the run it works in (config, precision plan, run dir), starting a model job (data,
model, backends), accuracy of greedy answers, HF export and the metrics files.

A task is ``run(job: Job) -> dict``; the CLI builds the :class:`Job` once (precision decided once, config resolved
and saved) and hands it over. Code calling a task directly (tests, notebooks) uses :meth:`Job.prepare`.
"""

from .accuracy import accuracy_examples, greedy_accuracy
from .build import Setup, arch_of, build_setup, meta_model, model_from_config, start_job, tokenizer_source, uses_cuda
from .outputs import export_hf, finish, write_json
from .run import Job, UserError, user_error

__all__ = [
    "Job", "Setup", "UserError", "accuracy_examples", "arch_of", "build_setup", "export_hf", "finish", "greedy_accuracy",
    "meta_model", "model_from_config", "start_job", "tokenizer_source", "user_error", "uses_cuda", "write_json",
]
