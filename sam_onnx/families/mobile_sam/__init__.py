"""MobileSAM (``vit_t``): a TinyViT image encoder (~5.7 M parameters, distilled from SAM's
vit_h) with SAM's own prompt encoder and mask decoder, so SAM's graph contracts, pre- and
post-processing apply unchanged; the practical choice on a CPU.

Code: the ``mobile_sam`` module (PyPI ``mobilesam-mirror`` 1.0.0, Apache-2.0, needs timm).
Checkpoint: ``mobile_sam.pt``, recognised by its TinyViT patch embedding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ...core.errors import CheckpointError
from ..base import Family
from ..sam.contracts import CONTRACTS, POSTPROCESS, PREPROCESS

PATCH_EMBED = "image_encoder.patch_embed.seq.0.c.weight"
NECK = "image_encoder.neck.0.weight"
#: TinyViT-5M as build_sam_vit_t makes it: embed_dims (64, 128, 160, 320); the patch
#: embedding's first convolution has 64 / 2 outputs, the neck reads the last stage's 320.
WIDTHS = {"vit_t": (32, 320)}
KEYS = (PATCH_EMBED, NECK, "mask_decoder.iou_token.weight", "prompt_encoder.no_mask_embed.weight")


def identify(state: Mapping, path: Path = Path("checkpoint")) -> str:
    """``vit_t`` when the TinyViT's widths are MobileSAM's, else a CheckpointError."""
    widths = (int(state[PATCH_EMBED].shape[0]), int(state[NECK].shape[1]))
    for name, expected in WIDTHS.items():
        if widths == expected:
            return name
    raise CheckpointError(
        f"{path} is a MobileSAM-like checkpoint whose TinyViT has widths {widths}, which "
        f"matches none of {', '.join(WIDTHS)}")


MOBILE_SAM = Family(
    name="mobile_sam",
    doc="MobileSAM: a TinyViT image encoder distilled from SAM's vit_h, with SAM's decoder.",
    checkpoints={"vit_t": "mobile_sam.pt"},
    checkpoint_url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/",
    contracts=CONTRACTS,
    encoder_forms={"image": "encoder_image"},
    preprocess=PREPROCESS,
    postprocess=POSTPROCESS,
    keys=KEYS,
    identify=identify,
    torch_side="sam_onnx.families.mobile_sam.modeling",
    torch_requires=(("torch", "torch"), ("mobile_sam", "mobilesam-mirror"), ("timm", "timm"),
                    ("segment_anything", "segment-anything")),
)
