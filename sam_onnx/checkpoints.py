"""SAM model types and their weights: find, download, identify and load checkpoints.

A checkpoint is identified by its own tensor shapes, so a vit_h file passed as vit_b
(or a file that is not SAM at all) is refused before anything is built or written.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

from .errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class ModelSpec:
    """The image-encoder hyper-parameters that tell SAM's model types apart."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]
    checkpoint: Optional[str]  # official file name; None for test-only types


MODEL_SPECS: Dict[str, ModelSpec] = {
    "vit_h": ModelSpec(1280, 32, 16, (7, 15, 23, 31), "sam_vit_h_4b8939.pth"),
    "vit_l": ModelSpec(1024, 24, 16, (5, 11, 17, 23), "sam_vit_l_0b3195.pth"),
    "vit_b": ModelSpec(768, 12, 12, (2, 5, 8, 11), "sam_vit_b_01ec64.pth"),
    # SAM's architecture with a two-block encoder: for tests and trying the tool quickly.
    "tiny": ModelSpec(64, 2, 2, (1,), None),
}
MODEL_TYPES = tuple(MODEL_SPECS)

_PATCH_EMBED = "image_encoder.patch_embed.proj.weight"
_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")
_REQUIRED = (_PATCH_EMBED, "mask_decoder.iou_token.weight", "prompt_encoder.no_mask_embed.weight")


def cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$SAM_ONNX_CACHE`` or the user cache folder."""
    env = os.environ.get("SAM_ONNX_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("sam-onnx"))


def official_checkpoint(model_type: str, progress: bool = True) -> Path:
    """The cached official checkpoint, downloaded first if absent (atomically)."""
    name = MODEL_SPECS[model_type].checkpoint
    if name is None:
        raise CheckpointError(
            f"{model_type} has no official checkpoint; pass --random-weights or --checkpoint PATH"
        )
    path = cache_dir() / name
    if path.is_file():
        return path
    url = os.environ.get("SAM_ONNX_CHECKPOINT_URL", CHECKPOINT_URL) + name
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
    if isinstance(state, Mapping):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], Mapping) and _PATCH_EMBED not in state:
                state = state[key]
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a SAM state_dict; pass a SAM checkpoint"
        )
    return state


def identify(state: Mapping, path: Path = Path("checkpoint")) -> str:
    """The model type whose shapes the state_dict has, or a CheckpointError saying what it is."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        sample = ", ".join(list(state)[:3]) or "nothing"
        raise CheckpointError(
            f"{path} is not a SAM checkpoint (no {missing[0]}; it holds {sample}...); "
            "pass a segment-anything checkpoint such as sam_vit_b_01ec64.pth"
        )
    embed_dim = int(state[_PATCH_EMBED].shape[0])
    depth = len({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    for name, spec in MODEL_SPECS.items():
        if (spec.embed_dim, spec.depth) == (embed_dim, depth):
            return name
    raise CheckpointError(
        f"{path} is a SAM-like checkpoint with a {depth}-block, {embed_dim}-wide encoder, "
        f"which matches none of {', '.join(MODEL_TYPES)}"
    )


def _check_model_type(model_type: str) -> None:
    if model_type not in MODEL_SPECS:
        raise CheckpointError(
            f"unknown model type {model_type!r}; use one of: {', '.join(MODEL_TYPES)}")


def build_sam(model_type: str, state: Optional[Mapping] = None, seed: int = 0,
              source: str = "the checkpoint"):
    """Build SAM through segment_anything's builders; random weights when ``state`` is None.

    A state_dict of another model type is refused, naming the type its shapes tell."""
    import torch

    _check_model_type(model_type)
    if state is None:
        torch.manual_seed(seed)
        sam = _build(model_type)
    else:
        found = identify(state, Path(source))
        if found != model_type:
            raise CheckpointError(
                f"{source} is a {found} checkpoint, not {model_type}: pass --model {found}")
        with torch.device("meta"):  # no random init: the checkpoint's tensors are assigned
            sam = _build(model_type)
        try:
            sam.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"the checkpoint does not fit {model_type}: {first}") from None
    return sam.eval()


def _build(model_type: str):
    from segment_anything import sam_model_registry
    from segment_anything.build_sam import _build_sam

    if model_type in sam_model_registry:
        return sam_model_registry[model_type](checkpoint=None)
    spec = MODEL_SPECS[model_type]
    return _build_sam(
        encoder_embed_dim=spec.embed_dim,
        encoder_depth=spec.depth,
        encoder_num_heads=spec.num_heads,
        encoder_global_attn_indexes=list(spec.global_attn_indexes),
    )


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
    _check_model_type(model_type)
    if random_weights:
        if checkpoint is not None:
            raise CheckpointError("pass either --checkpoint or --random-weights, not both")
        return Weights(build_sam(model_type), model_type, "random", "random")
    path = Path(checkpoint) if checkpoint is not None else official_checkpoint(model_type, progress)
    sam = build_sam(model_type, load_state_dict(path), source=str(path))
    return Weights(sam, model_type, str(path), "sha256:" + sha256(path))
