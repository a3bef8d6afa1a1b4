"""The one logging set-up: sam-onnx's messages, plain, on stderr, for the command and for the
child processes it starts (which log like their parent)."""
from __future__ import annotations

import logging
import sys

LOGGER = "sam_onnx"


def setup(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def level() -> int:
    return logging.getLogger(LOGGER).getEffectiveLevel()
