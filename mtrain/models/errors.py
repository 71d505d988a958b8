"""The error of a checkpoint mtrain cannot load or write (HF folders here, Lightning checkpoints in ``mtrain.lit``)."""


class CheckpointError(ValueError):
    """A checkpoint folder that mtrain cannot load or write; the message names the file and the fix."""
