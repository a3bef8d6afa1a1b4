"""Weights for every family: find, download, load and identify checkpoints, build the model.

A checkpoint is identified by its own tensor shapes (each family's ``identify``), so a vit_h
file passed as vit_b (or a file that is not the family's at all) is refused before anything
is built or written.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

from ..core.errors import CheckpointError
from ..core.files import atomic_write, locked, part_file
from ..families import family_of, identify

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$SAM_ONNX_CACHE`` or the user cache folder."""
    env = os.environ.get("SAM_ONNX_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("sam-onnx"))


def official_checkpoint(model_type: str, progress: bool = True) -> Path:
    """The cached official checkpoint, downloaded first if absent or damaged.

    Checked against the published MD5 where there is one, else against the sha256 recorded
    beside it when it was downloaded (``NAME.sha256``): a damaged cached file is replaced,
    never reused. One process downloads at a time (the cache folder is locked); another
    asking for the same file then finds it checked."""
    family = family_of(model_type)
    name = family.checkpoints[model_type]
    if name is None:
        raise CheckpointError(
            f"{model_type} has no official checkpoint; pass --random-weights or --checkpoint PATH"
        )
    path = cache_dir() / name
    md5 = family.checkpoint_md5.get(model_type)
    url = os.environ.get("SAM_ONNX_CHECKPOINT_URL", family.checkpoint_url) + name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.parent):
            if path.is_file():
                damage = _damage(path, md5)
                if damage is None:
                    return path
                log.warning("cached %s is damaged (%s); downloading it again", path, damage)
                _forget(path)
            _download(url, path, md5, progress)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(
            f"could not download {url} ({reason}); pass --checkpoint PATH to use a local "
            "file, or --random-weights to try the tool without trained weights"
        ) from None
    return path


def _recorded_sha256(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _damage(path: Path, md5: Optional[str]) -> Optional[str]:
    """How a cached checkpoint differs from what was published or downloaded; None if not."""
    got_md5, got_sha256 = digests(path)
    if md5 is not None and got_md5 != md5:
        return f"MD5 {got_md5}, published {md5}"
    record = _recorded_sha256(path)
    recorded = record.read_text().strip() if record.is_file() else None
    if recorded is not None and got_sha256 != recorded:
        return f"sha256 {got_sha256[:16]}..., {recorded[:16]}... when downloaded"
    return None


def _forget(path: Path) -> None:
    """Remove a cached checkpoint and its recorded checksum."""
    path.unlink(missing_ok=True)
    _recorded_sha256(path).unlink(missing_ok=True)


def _download(url: str, path: Path, md5: Optional[str], progress: bool) -> None:
    """Stream ``url`` to a part file beside ``path``; rename it only when it is complete and
    has the published MD5, then record its sha256 beside it."""
    from tqdm import tqdm

    log.info("downloading %s to %s", url, path)
    hashes = hashlib.md5(), hashlib.sha256()
    with part_file(path) as tmp:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                      desc=path.name) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    for h in hashes:
                        h.update(chunk)
                    bar.update(len(chunk))
            if total is not None and f.tell() != total:
                raise OSError(f"download stopped at {f.tell()} of {total} bytes")
        got_md5, got_sha256 = (h.hexdigest() for h in hashes)
        if md5 is not None and got_md5 != md5:
            raise CheckpointError(
                f"the download of {url} has MD5 {got_md5}, not the published {md5}; nothing "
                "was kept: download again later, or pass --checkpoint PATH")
    atomic_write(_recorded_sha256(path), lambda tmp: tmp.write_text(got_sha256 + "\n"),
                 "free space in the checkpoint cache ($SAM_ONNX_CACHE)")
    _DIGESTS[_stat_key(path)] = (got_md5, got_sha256)


#: (path, size, mtime) -> (md5, sha256): a checkpoint is read once for both, however often
#: it is asked about (checking the cache, then recording the weights' checksum).
_DIGESTS: Dict[tuple, Tuple[str, str]] = {}


def _stat_key(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def digests(path: Path) -> Tuple[str, str]:
    """(MD5, sha256) of a file, in one read."""
    key = _stat_key(path)
    if key not in _DIGESTS:
        hashes = hashlib.md5(), hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                for h in hashes:
                    h.update(chunk)
        _DIGESTS[key] = tuple(h.hexdigest() for h in hashes)
    return _DIGESTS[key]


def sha256(path: Path) -> str:
    return digests(path)[1]


def load_state_dict(path: Path) -> Mapping:
    """Read a checkpoint's tensors without running pickled code (``weights_only=True``).

    Memory-mapped when the file allows it, so the weights are not copied on load.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}; check the path, or leave out --checkpoint "
            "to download the official one"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty; download it again")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first}. It is corrupt or holds more than "
            "tensors (weights_only loading runs no pickled code); re-save the state_dict "
            "with torch.save or download it again"
        ) from None
    except Exception as exc:  # torch raises many types for damaged zip/pickle data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated or corrupt ({first}); "
            "download it again"
        ) from None
    return _unwrap(state, path)


def _unwrap(state, path: Path) -> Mapping:
    """The tensors of a checkpoint saved whole or under "model" / "state_dict"."""
    if isinstance(state, Mapping):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state_dict; pass a checkpoint")
    return state


def build(model_type: str, state: Optional[Mapping] = None, seed: int = 0,
          source: str = "the checkpoint"):
    """Build a model through its family's own builders; seeded random weights when ``state``
    is None. A state_dict of another model is refused, naming the model its shapes tell."""
    family = family_of(model_type)
    if state is not None:
        found = identify(state, Path(source))
        if found != model_type:
            raise CheckpointError(
                f"{source} is a {found} checkpoint, not {model_type}: pass --model {found}")
    return family.torch().build(model_type, state, seed)


@dataclass(frozen=True)
class Weights:
    """A built model and where its weights came from, as recorded in the graphs."""

    sam: object
    model_type: str
    source: str  # checkpoint path, or "random"
    checksum: str  # "sha256:<hex>", or "random"

    @property
    def random(self) -> bool:
        return self.checksum == "random"


def load_weights(model_type: str, checkpoint: Optional[Path] = None, *,
                 random_weights: bool = False, progress: bool = True) -> Weights:
    """Resolve the weights a command asked for and build the model."""
    family_of(model_type)
    if random_weights:
        if checkpoint is not None:
            raise CheckpointError("pass either --checkpoint or --random-weights, not both")
        return Weights(build(model_type), model_type, "random", "random")
    if checkpoint is not None:
        path = Path(checkpoint)
        state = load_state_dict(path)
    else:
        path = official_checkpoint(model_type, progress)
        try:
            state = load_state_dict(path)
        except CheckpointError as exc:  # damaged in the cache, with no checksum to tell
            _forget(path)
            raise CheckpointError(f"{exc}; the cached copy was removed: run the command "
                                  "again to download it") from None
    sam = build(model_type, state, source=str(path))
    return Weights(sam, model_type, str(path), "sha256:" + sha256(path))
