"""Exceptions raised where user input enters: bad checkpoints, bad requests."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not fit the model; names the file."""


class ContextLengthError(ValueError):
    """A prompt (plus what must follow it) does not fit the model's context window."""
