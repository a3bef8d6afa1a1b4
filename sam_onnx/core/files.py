"""Write outputs so that nothing is lost: build beside the final names, then rename.

Nothing appears under a final name until it is complete (a staging folder for a set of
graphs, a hidden part file for one file); a failure or an interruption leaves the output
folder as it was. Each staging folder and part file is locked (``flock``) by the process
writing it, and the lock dies with the process: what a killed run left is found by the next
run that writes there (nobody holds its lock) and removed, with a log line.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional

from .errors import SamOnnxError

try:
    import fcntl
except ImportError:  # Windows: no flock; nothing is then taken for abandoned
    fcntl = None

log = logging.getLogger(__name__)

STAGING_PREFIX = ".sam-onnx-staging-"


def _flock(fd: int, blocking: bool = True) -> bool:
    """Take an exclusive lock on ``fd``; False when another process holds it (non-blocking)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _hold(path: Path) -> Optional[int]:
    """An open descriptor of ``path`` (a folder or a file) with this process's lock on it,
    released when it is closed or the process dies; None where there is no flock."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    _flock(fd)
    return fd


def _release(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a folder or a file) for the block: read-merge-write
    of a manifest, the choice of a backup's name."""
    fd = _hold(path)
    try:
        yield
    finally:
        _release(fd)


#: The writer's pid in a staging folder's or part file's name.
_WRITER = re.compile(rf"^{re.escape(STAGING_PREFIX)}(\d+)-|\.(\d+)\.part$")


def _abandoned(path: Path) -> bool:
    """Whether the process that wrote ``path`` is gone: the pid in its name (when it has one)
    is not running, and nobody holds its lock. Both, so that neither a folder just made and
    not yet locked nor a reused pid is taken for dead."""
    named = _WRITER.search(path.name)
    if named is not None and _running(int(named.group(1) or named.group(2))):
        return False
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _flock(fd, blocking=False)
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned(folder: Path, pattern: str) -> List[Path]:
    """Remove what killed runs left in ``folder`` under ``pattern``; the paths removed."""
    removed = []
    for path in sorted(Path(folder).glob(pattern)):
        if not _abandoned(path):
            continue
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) \
            if path.is_dir() else path.stat().st_size
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.info("removed %s (%.1f MB), left by an earlier run that was killed", path,
                 size / 2**20)
        removed.append(path)
    return removed


class Staging:
    """A hidden folder beside the final names, locked while this process writes it."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_abandoned(self.out_dir, STAGING_PREFIX + "*")
            self.dir = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-",
                                             dir=self.out_dir))
            self._lock = _hold(self.dir)
        except OSError as exc:
            raise SamOnnxError(
                f"cannot write to output folder {self.out_dir} ({exc.strerror or exc}); "
                "pass --out with a writable folder"
            ) from None

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        _release(self._lock)

    def path(self, name: str) -> Path:
        return self.dir / name

    def commit(self, names: Iterable[str]) -> None:
        """Move staged files to their final names: external data, then graphs, then manifests."""
        names = sorted(names, key=lambda n: (n.endswith(".json"), n.endswith(".onnx")))
        for name in names:
            src = self.dir / name
            with open(src, "rb") as f:
                os.fsync(f.fileno())
            os.replace(src, self.out_dir / name)


@contextlib.contextmanager
def part_file(path: Path) -> Iterator[Path]:
    """A hidden, locked name beside ``path`` to write; renamed to ``path`` when the block ends
    (after fsync), removed when it fails. Parts of ``path`` that killed runs left go first."""
    path = Path(path)
    remove_abandoned(path.parent, f".{glob.escape(path.name)}.*.part")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            _flock(fd)
        yield tmp
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def check_output(path: Path, option: str, inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an output path that would overwrite one of ``inputs`` (an
    input is never overwritten), is a folder, or lies in a folder that does not exist or
    cannot be written; ``option`` names it in the message (e.g. "--out")."""
    path = Path(path)
    for source in inputs:
        if path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise SamOnnxError(f"{option} {path} is the input {source}; pass another path "
                               "(an input is never overwritten)")
    if path.is_dir():
        raise SamOnnxError(f"{option} {path} is a folder; pass a file path")
    folder = path.parent
    if not folder.is_dir():
        raise SamOnnxError(f"{option} {path}: folder {folder} does not exist; create it or pass "
                           "another path")
    if not os.access(folder, os.W_OK):
        raise SamOnnxError(f"{option} {path}: folder {folder} cannot be written; pass another "
                           "path")


def atomic_write(path: Path, write: Callable[[Path], None], fix: str) -> None:
    """``write(tmp)`` to a part file beside ``path``, then rename it to ``path``: a reader
    never sees a half-written file. An OSError becomes "cannot write PATH (why); FIX"."""
    try:
        with part_file(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise SamOnnxError(f"cannot write {path} ({exc.strerror or exc}); {fix}") from None


def external_data_files(path: Path) -> List[Path]:
    """The files beside ``path`` (``<name>.onnx.data``...) that hold its weights."""
    return sorted(p for p in path.parent.glob(path.name + "*") if p != path)


def has_external_data(path: Path) -> bool:
    """Whether ``path`` keeps its weights in external data files beside it."""
    return bool(external_data_files(path))
