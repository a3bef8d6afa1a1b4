"""SAM v1 (segment-anything): vit_b, vit_l, vit_h, and ``tiny``, SAM's architecture with a
two-block encoder for tests and trying the tool quickly.

A checkpoint is identified by its own tensor shapes, so a vit_h file passed as vit_b (or a
file that is not SAM at all) is refused before anything is built or written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

from ...core.errors import CheckpointError
from ..base import Family
from .contracts import CONTRACTS, POSTPROCESS, PREPROCESS

#: The MD5 of each official checkpoint, as published with it (and as its file name begins).
CHECKPOINT_MD5 = {
    "vit_h": "4b8939a88964f0f4ff5f5b2642c598a6",
    "vit_l": "0b3195507c641ddb6910d2bb5adee89c",
    "vit_b": "01ec64d29a2fca3f0661936605ae66f8",
}


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
    "tiny": ModelSpec(64, 2, 2, (1,), None),
}

PATCH_EMBED = "image_encoder.patch_embed.proj.weight"
_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")
#: The tensors every SAM v1 checkpoint has (a ViT patch embedding, SAM's prompt and mask heads).
KEYS = (PATCH_EMBED, "mask_decoder.iou_token.weight", "prompt_encoder.no_mask_embed.weight")


def identify(state: Mapping, path: Path = Path("checkpoint")) -> str:
    """The model type whose shapes the state_dict (which has ``KEYS``) has, or a
    CheckpointError saying what it is."""
    embed_dim = int(state[PATCH_EMBED].shape[0])
    depth = len({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    for name, spec in MODEL_SPECS.items():
        if (spec.embed_dim, spec.depth) == (embed_dim, depth):
            return name
    raise CheckpointError(
        f"{path} is a SAM-like checkpoint with a {depth}-block, {embed_dim}-wide encoder, "
        f"which matches none of {', '.join(MODEL_SPECS)}"
    )


SAM = Family(
    name="sam",
    doc="Segment Anything (SAM v1): ViT image encoders and SAM's prompt-driven mask decoder.",
    checkpoints={name: spec.checkpoint for name, spec in MODEL_SPECS.items()},
    checkpoint_url="https://dl.fbaipublicfiles.com/segment_anything/",
    checkpoint_md5=CHECKPOINT_MD5,
    contracts=CONTRACTS,
    encoder_forms={"image": "encoder_image"},
    preprocess=PREPROCESS,
    postprocess=POSTPROCESS,
    keys=KEYS,
    identify=identify,
    torch_side="sam_onnx.families.sam.modeling",
    torch_requires=(("torch", "torch"), ("segment_anything", "segment-anything")),
)
