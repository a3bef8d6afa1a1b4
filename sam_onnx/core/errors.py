"""Errors a user can act on: the message names the problem and the fix."""


class SamOnnxError(Exception):
    """An expected failure (bad input, missing file, offline...): shown as one line, no
    traceback."""


class CheckpointError(SamOnnxError):
    """A checkpoint is missing, unreadable, not SAM, or not the requested model type."""


class ParityError(SamOnnxError):
    """An exported graph disagrees with PyTorch beyond its declared tolerance."""
