"""Feeds as the validator sees them: names, dtypes and shapes, with arrays when there are any.

A feed comes from a declared contract (exactly what a wrapper following it builds), a
``.json`` file describing names/dtypes/shapes, an ``.npz`` file of arrays, or a dict.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from ..core.contracts import GraphContract
from ..core.errors import SamOnnxError
from ..families import ALIASES, CONTRACTS

#: Values for symbolic dims when a feed is synthesized: two points, as SamPredictor's
#: one click plus the padding point; two prompts for a batched decoder.
SYMBOL_VALUES = {"num_points": 2, "num_prompts": 2}
#: The original image size an example feed gives (orig_im_size).
EXAMPLE_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class FeedEntry:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    array: Optional[np.ndarray] = None


Feed = Dict[str, FeedEntry]
FeedSource = Union[str, Path, Mapping[str, Any]]


def from_arrays(arrays: Mapping[str, Any]) -> Feed:
    """As ONNX Runtime would receive them: a Python float becomes a float64 scalar."""
    out = {}
    for name, value in arrays.items():
        arr = np.asarray(value)
        out[name] = FeedEntry(name, arr.dtype.name, tuple(arr.shape), arr)
    return out


def example_arrays(contract: GraphContract) -> Dict[str, np.ndarray]:
    """What a wrapper following ``contract`` feeds, e.g. segment-anything's notebook for
    ``official``: float32 throughout, one point plus the padding point, no mask prompt."""
    arrays = {}
    for spec in contract.inputs:
        shape = tuple(SYMBOL_VALUES.get(d, 1) if isinstance(d, str) else d for d in spec.shape)
        arrays[spec.name] = np.zeros(shape, dtype=spec.dtype)
    if "point_labels" in arrays:
        arrays["point_labels"][...] = 1.0
        arrays["point_labels"][..., -1] = -1.0
    for name in arrays:  # orig_im_size, or another tool's name for it (ALIASES)
        if ALIASES.get(name, name) == "orig_im_size":
            arrays[name][:] = EXAMPLE_IMAGE_SIZE
    return arrays


def from_json(path: Path) -> Feed:
    """``{"name": {"dtype": "float32", "shape": [1, 2, 2]}, ...}``"""
    try:
        data = json.loads(Path(path).read_text())
        return {name: FeedEntry(name, np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape"]))
                for name, d in data.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SamOnnxError(f"cannot read feed description {path} ({exc}); write it as "
                           '{"name": {"dtype": "float32", "shape": [1, 2, 2]}, ...}') from None


def from_npz(path: Path) -> Feed:
    try:
        with np.load(path, allow_pickle=False) as data:
            return from_arrays({k: data[k] for k in data.files})
    except (OSError, ValueError) as exc:
        raise SamOnnxError(f"cannot read feed arrays {path} ({exc}); save them with "
                           "numpy.savez(path, name=array, ...)") from None


def load(source: FeedSource) -> Feed:
    """A contract name, a .json or .npz path, a dict of arrays, or an already loaded feed."""
    if isinstance(source, Mapping):
        if all(isinstance(v, FeedEntry) for v in source.values()):
            return dict(source)
        return from_arrays(source)
    text = str(source)
    if text in CONTRACTS:
        return from_arrays(example_arrays(CONTRACTS[text]))
    path = Path(text)
    if path.suffix == ".json":
        return from_json(path)
    if path.suffix == ".npz":
        return from_npz(path)
    raise SamOnnxError(f"unknown feed {text!r}: name a contract ({', '.join(CONTRACTS)}), "
                       "a .json description or an .npz of arrays")
