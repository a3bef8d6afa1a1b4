"""Keep memory-mapped weight files out of resident memory while they are read through.

PyTorch (``torch.load(mmap=True)``) and ONNX Runtime (external data) map weight files
instead of copying them. Every page they touch then counts in the process's RSS for as
long as the file stays mapped, although the kernel could drop such a clean page at any
time and read it back when it is next used. An export walks through the weights layer by
layer (reference run, graph writing, the check run), so asking the kernel to page the
mapped weights out as it goes (``madvise(MADV_PAGEOUT)``, Linux 5.4 and later) keeps the
resident set at the activations plus the layers in use (vit_h, measured: the PyTorch half
3.56 -> 1.14 GiB, the ONNX Runtime check 5.04 -> 3.44 GiB).

No data can be lost: MADV_PAGEOUT reclaims only what the kernel can bring back (file
pages are re-read, anonymous ones swapped or left in place). Elsewhere it does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Iterator, List, Tuple

log = logging.getLogger("sam_onnx.paging")

MADV_PAGEOUT = 21  # <linux/mman.h>; Python's mmap module names it only from 3.12 on
#: How often the mapped weights are paged out: often enough that few layers' weights are
#: resident at once (vit_h's encoder reads ~80 MB of weights a second here).
INTERVAL_S = 0.25


def mapped_ranges(path: Path) -> List[Tuple[int, int]]:
    """The address ranges at which this process maps ``path`` (from /proc/self/maps)."""
    target = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def page_out(path: Path) -> int:
    """Ask the kernel to reclaim this process's resident pages of ``path``; bytes advised."""
    madvise = _libc().madvise
    advised = 0
    for start, end in mapped_ranges(path):
        if madvise(start, end - start, MADV_PAGEOUT) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        advised += end - start
    return advised


@contextlib.contextmanager
def paged_out(*paths: Path, interval_s: float = INTERVAL_S) -> Iterator[None]:
    """While the block runs, keep paging out this process's mappings of ``paths``."""
    if not sys.platform.startswith("linux") or not paths:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                for path in paths:
                    page_out(path)
            except OSError as exc:  # e.g. EINVAL before Linux 5.4: RSS just stays higher
                log.debug("paging out %s stopped: %s", ", ".join(map(str, paths)), exc)
                return

    thread = threading.Thread(target=loop, name="sam-onnx-page-out", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc
