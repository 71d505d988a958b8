"""The error a training run stops with when it diverges (a user error: one line, exit 2; kept free of Lightning so
the CLI can name it without importing Lightning)."""


class TrainingDiverged(ValueError):
    """The loss (or the weights) became non-finite: the job stops, nothing non-finite is checkpointed or exported."""
