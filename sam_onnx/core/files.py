"""Write outputs atomically: build in a hidden folder beside the final names, then rename.

Nothing appears under a final name until every file is complete and checked; a failure
or an interruption leaves the output folder as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List

from .errors import SamOnnxError


class Staging:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".sam-onnx-staging-", dir=self.out_dir))
        except OSError as exc:
            raise SamOnnxError(
                f"cannot write to output folder {self.out_dir} ({exc.strerror or exc}); "
                "pass --out with a writable folder"
            ) from None

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

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


def atomic_write(path: Path, write: Callable[[Path], None], fix: str) -> None:
    """``write(tmp)`` to a hidden name beside ``path``, then rename it to ``path``: a reader
    never sees a half-written file. An OSError becomes "cannot write PATH (why); FIX"."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SamOnnxError(f"cannot write {path} ({exc.strerror or exc}); {fix}") from None


def external_data_files(path: Path) -> List[Path]:
    """The files beside ``path`` (``<name>.onnx.data``...) that hold its weights."""
    return sorted(p for p in path.parent.glob(path.name + "*") if p != path)


def has_external_data(path: Path) -> bool:
    """Whether ``path`` keeps its weights in external data files beside it."""
    return bool(external_data_files(path))
