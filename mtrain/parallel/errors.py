"""The one error type of ``mtrain.parallel``: a launch or sharding setting that cannot work. A plain exception; the
job boundary reports it as a user error (one line)."""


class ParallelError(ValueError):
    """A bad multi-device setting; the message names it and says how to launch or configure instead."""
