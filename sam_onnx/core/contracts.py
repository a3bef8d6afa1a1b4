"""The types contracts are declared with: what a graph takes and returns, and how an image
becomes its input and its output becomes masks.

Each model family declares its contracts as data with these types (``families/<name>/``);
the exporter records them in each graph's metadata, and the validator, repairer and runtime
read the same declarations. A dimension is either a fixed int or a symbolic name (a dynamic
axis, e.g. ``num_points``). No onnx, onnxruntime or torch here.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, Mapping, Optional, Tuple, Union

Dim = Union[int, str]

#: The batched decoder's pred_iou_thresh that keeps every prompt's masks.
EVERY_PROMPT = float("-inf")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the encoder's input, as the numpy runtime applies it: resize to
    ``image_size`` (``longest_side``: the longest side, keeping the aspect ratio, then
    zero-pad bottom-right to a square, as SAM; ``square``: both sides, as SAM 2), normalize by
    ``pixel_mean``/``pixel_std`` (RGB, 0-255)."""

    image_size: int
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]
    resize: str = "longest_side"
    pad: str = "bottom_right"


@dataclass(frozen=True)
class Postprocess:
    """How decoder logits become masks, and which mask is the single one.

    ``upscale``: ``padded_input`` (SAM: ``low_res_size`` logits to the padded input frame,
    crop the padding, resize to the original image) or ``original`` (SAM 2: straight to the
    original image); then threshold at ``mask_threshold``. ``single_mask`` (multimask_output
    False): ``first_token`` (SAM) or ``dynamic_stability`` (SAM 2: the single-mask token when
    its stability at +-``stability_delta`` reaches ``stability_thresh``, else the multimask
    output with the best predicted IoU). ``low_res_clamp``: low-res logits returned clipped
    to +-this (SAM 2's predictor), None: as they are."""

    low_res_size: int
    mask_threshold: float = 0.0
    upscale: str = "padded_input"
    single_mask: str = "first_token"
    stability_delta: float = 0.05
    stability_thresh: float = 0.98
    low_res_clamp: Optional[float] = None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: Tuple[Dim, ...]
    doc: str

    @property
    def dynamic_axes(self) -> Dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class Tolerance:
    """Allowed difference from PyTorch: |onnx - torch| <= atol + rtol * max|torch|, and
    thresholded masks overlapping PyTorch's by at least ``min_mask_iou``."""

    atol: float
    rtol: float
    min_mask_iou: float = 0.99


@dataclass(frozen=True)
class GraphContract:
    name: str
    role: str  # "encoder" or "decoder"
    doc: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    #: Parity with PyTorch per precision, used by the exporter's checks.
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    #: A decoder that returns one mask a prompt, chosen in the graph: the rule's name
    #: (``select_masks``: segment-anything's), "" when the caller chooses.
    selects: str = ""
    #: An encoder that takes the image resized but not normalized or padded (HxWx3): the
    #: family's normalization and padding are inside the graph.
    preprocess_inside: bool = False

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def input(self, name: str) -> TensorSpec:
        return {t.name: t for t in self.inputs}[name]

    def output(self, name: str) -> TensorSpec:
        return {t.name: t for t in self.outputs}[name]

    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        """Symbolic dims by tensor name, in the form torch.onnx.export takes."""
        return {t.name: t.dynamic_axes for t in self.inputs + self.outputs if t.dynamic_axes}

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> "GraphContract":
        def spec(d):
            return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), d.get("doc", ""))

        return cls(
            name=data["name"],
            role=data["role"],
            doc=data.get("doc", ""),
            inputs=tuple(spec(d) for d in data["inputs"]),
            outputs=tuple(spec(d) for d in data["outputs"]),
            tolerances={k: Tolerance(**v) for k, v in data.get("tolerances", {}).items()},
            selects=data.get("selects", ""),
            preprocess_inside=bool(data.get("preprocess_inside", False)),
        )
