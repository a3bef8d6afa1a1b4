"""Work in a fresh process: a new interpreter (spawn) that inherits nothing and hands back all
it held when it exits; used where memory must not carry over (the export's two halves, each
benchmark pipeline).

The child dies with its parent, logs like it, and on Linux maps big buffers instead of keeping
them in glibc's heaps (``MMAP_THRESHOLD``).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from typing import Callable

from . import logs
from .errors import SamOnnxError

#: Allocations from this size up are mapped and unmapped by glibc, never kept. glibc serves
#: allocations under its adaptive mmap threshold (up to 32 MB) from heaps it keeps; ONNX
#: Runtime's 20-30 MB activations then held ~1 GB there for the whole vit_h export check
#: (measured: 3.1 -> 2.1 GiB with the fixed threshold).
MMAP_THRESHOLD = 16 * 2**20


def run_fresh(fn: Callable, *args, died: str):
    """``fn(*args)`` in a fresh child process; ``died`` is the one-line error when the child
    is killed (e.g. by the OOM killer). Whatever stops the wait here (Ctrl-C, SIGTERM, an
    error) kills the child too: it never outlives the command's clean-up."""
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_child, args=(send, os.getpid(), logs.level(), fn, args))
    child.start()
    send.close()
    try:
        ok, value, remote_traceback = receive.recv()
    except EOFError:  # the child died without an answer
        raise SamOnnxError(died) from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()
    if ok:
        return value
    if isinstance(value, SamOnnxError):
        raise value
    raise value from ChildTraceback(remote_traceback)


class ChildTraceback(Exception):
    """Where an unexpected error happened in the child: its traceback, as text."""


def _child(send, parent_pid: int, log_level: int, fn: Callable, args: tuple) -> None:
    _child_init(parent_pid, log_level)
    try:
        answer = (True, fn(*args), "")
    except BaseException as exc:  # handed to the parent, which raises it
        answer = (False, exc, traceback.format_exc())
    try:
        send.send(answer)
    except Exception as exc:  # an answer that does not pickle
        send.send((False, RuntimeError(f"{answer[1]!r} (not picklable: {exc})"), answer[2]))
    send.close()


def _child_init(parent_pid: int, log_level: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed parent leaves no worker
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    if os.getppid() != parent_pid:
        os._exit(1)
    logs.setup(log_level)
