"""HQ-SAM (``hq_vit_b``, ``hq_vit_l``, ``hq_vit_h``, ``hq_vit_tiny``): SAM's encoders (Light
HQ-SAM: MobileSAM's TinyViT) with a high-quality mask decoder that also reads the encoder's
early features and adds an HQ output token.

Code: the ``segment_anything_hq`` module (PyPI ``segment-anything-hq`` 0.3, Apache-2.0).
Checkpoints ``sam_hq_vit_{b,l,h,tiny}.pth``, recognised by the HQ decoder's tensors and the
width of the features it fuses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ...core.errors import CheckpointError
from ..base import Family
from .contracts import CONTRACTS, POSTPROCESS, PREPROCESS

COMPRESS = "mask_decoder.compress_vit_feat.0.weight"
#: The width of the encoder features the HQ decoder fuses tells the model.
VIT_DIMS = {"hq_vit_b": 768, "hq_vit_l": 1024, "hq_vit_h": 1280, "hq_vit_tiny": 160}
KEYS = (COMPRESS, "mask_decoder.hf_token.weight", "mask_decoder.hf_mlp.layers.0.weight",
        "mask_decoder.embedding_encoder.0.weight", "mask_decoder.iou_token.weight",
        "prompt_encoder.no_mask_embed.weight")


def identify(state: Mapping, path: Path = Path("checkpoint")) -> str:
    width = int(state[COMPRESS].shape[0])
    for name, dim in VIT_DIMS.items():
        if width == dim:
            return name
    raise CheckpointError(
        f"{path} is an HQ-SAM-like checkpoint whose decoder fuses {width}-wide features, which "
        f"matches none of {', '.join(VIT_DIMS)}")


SAM_HQ = Family(
    name="sam_hq",
    doc="HQ-SAM: SAM's image encoders with a high-quality mask decoder that fuses the "
    "encoder's early features.",
    checkpoints={name: f"sam_{name}.pth" for name in VIT_DIMS},
    checkpoint_url="https://huggingface.co/lkeab/hq-sam/resolve/main/",
    contracts=CONTRACTS,
    preprocess=PREPROCESS,
    postprocess=POSTPROCESS,
    keys=KEYS,
    identify=identify,
    torch_side="sam_onnx.families.sam_hq.modeling",
    torch_requires=(("torch", "torch"), ("segment_anything_hq", "segment-anything-hq"),
                    ("timm", "timm"), ("segment_anything", "segment-anything")),
    decoder_forms={"official": "hq_official", "batched": "hq_batched"},
)
