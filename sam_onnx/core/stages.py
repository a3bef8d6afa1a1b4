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
        log.info("%s: %.1f s (RSS %.2f GiB, peak so far %.2f GiB)", name, self.timings[name],
                 current_rss_gib(), peak_rss_gib())


def peak_rss_gib() -> float:
    """This process's own peak RSS. ``ru_maxrss`` is not: it starts from the parent's peak at
    fork and survives exec, so a child of a big process reports the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**30
    except OSError:  # not Linux
        return float("nan")
