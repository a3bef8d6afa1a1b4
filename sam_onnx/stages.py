"""Stage logging: each stage's start, duration and memory, shared by both halves of an export."""
from __future__ import annotations

import contextlib
import logging
import resource
import time
from typing import Dict

log = logging.getLogger("sam_onnx.export")


class Stages:
    """Logs each stage as it starts and ends, and keeps its duration."""

    def __init__(self) -> None:
        self.timings: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        log.info("%s ...", name)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        log.info("%s: %.1f s (RSS %.2f GiB, peak so far %.2f GiB)", name, self.timings[name],
                 current_rss_gib(), peak)


def current_rss_gib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**30
    except OSError:  # not Linux
        return float("nan")
