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
from typing import Mapping, Optional

from ..core.errors import CheckpointError
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
    """The cached official checkpoint, downloaded first if absent (atomically)."""
    family = family_of(model_type)
    name = family.checkpoints[model_type]
    if name is None:
        raise CheckpointError(
            f"{model_type} has no official checkpoint; pass --random-weights or --checkpoint PATH"
        )
    path = cache_dir() / name
    if path.is_file():
        return path
    url = os.environ.get("SAM_ONNX_CHECKPOINT_URL", family.checkpoint_url) + name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _download(url, path, progress)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(
            f"could not download {url} ({reason}); pass --checkpoint PATH to use a local "
            "file, or --random-weights to try the tool without trained weights"
        ) from None
    return path


def _download(url: str, path: Path, progress: bool) -> None:
    """Stream ``url`` to a temporary name beside ``path``; rename only when complete."""
    from tqdm import tqdm

    tmp = path.with_name(f"{path.name}.part-{os.getpid()}")
    log.info("downloading %s to %s", url, path)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                      desc=path.name) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total is not None and f.tell() != total:
                raise OSError(f"download stopped at {f.tell()} of {total} bytes")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


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
    path = Path(checkpoint) if checkpoint is not None else official_checkpoint(model_type, progress)
    sam = build(model_type, load_state_dict(path), source=str(path))
    return Weights(sam, model_type, str(path), "sha256:" + sha256(path))
