"""The closed choices of an RL step (the schema types them: ``mtrain.schema.ReplayMode``, ``OldLogprobs``)."""

REPLAY_MODES = ("off", "r3", "r2")  # routing replay: none | the rollout's experts | the old-policy recompute's
OLD_LOGPROBS = ("decoupled", "bypass")  # the old policy: the trainer's recompute | the engine's logprobs
