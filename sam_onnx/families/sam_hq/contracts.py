"""HQ-SAM's graphs, declared once as data: SAM's, plus the encoder's intermediate embeddings
(the ViT's output after its first global-attention block; TinyViT's after its second stage)
that HQ-SAM's decoder fuses into its high-quality mask, and the HQ output token.

The forms follow sam-hq's own ONNX export (segment_anything_hq/utils/onnx.py: the
intermediate embeddings stacked as [num_interm, 1, 64, 64, vit_dim], one mask returned), with
its two export-time switches, ``multimask_output`` and ``hq_token_only``, as inputs instead of
baked in, so that one graph serves every SamPredictor.predict call.
"""
from __future__ import annotations

from typing import Dict

from ...core.contracts import GraphContract, TensorSpec
from ..sam.contracts import (
                             DECODER_BATCHED,
                             DECODER_OFFICIAL,
                             ENCODER,
                             IMAGE_SIZE,
                             MASK_INPUT_SIZE,
                             POSTPROCESS,
                             PREPROCESS,
)

__all__ = ["HQ_ENCODER", "HQ_OFFICIAL", "HQ_BATCHED", "CONTRACTS", "PREPROCESS", "POSTPROCESS",
           "IMAGE_SIZE"]

_FP32 = "float32"
_M = MASK_INPUT_SIZE
_IMAGE_EMBEDDINGS = ENCODER.output("image_embeddings")
_INTERM = TensorSpec(
    "interm_embeddings", _FP32, ("num_interm", 1, 64, 64, "vit_dim"),
    "the image encoder's intermediate embeddings, stacked (4 for a ViT, one per global-attention "
    "block; 1 for TinyViT); the decoder reads the first")
_FLAGS = (
    TensorSpec("multimask_output", _FP32, (1,),
               "1: SAM's best of its three multimask outputs, 0: its single-mask output; "
               "either is added to the HQ mask (SamPredictor.predict's multimask_output)"),
    TensorSpec("hq_token_only", _FP32, (1,),
               "1: the HQ token's mask alone, 0: SAM's mask plus the HQ mask"),
)

HQ_ENCODER = GraphContract(
    name="hq_encoder",
    role="encoder",
    doc="HQ-SAM's image encoder on one pre-processed image: SAM's embeddings and the "
    "intermediate embeddings HQ-SAM's decoder fuses.",
    inputs=ENCODER.inputs,
    outputs=(_IMAGE_EMBEDDINGS, _INTERM),
    tolerances=ENCODER.tolerances,
)

HQ_OFFICIAL = GraphContract(
    name="hq_official",
    role="decoder",
    doc="HQ-SAM's decoder as sam-hq exports it (prompt encoder, HQ mask decoder, upscaling to "
    "the original image size), one mask per prompt, with multimask_output and hq_token_only "
    "as inputs.",
    inputs=(DECODER_OFFICIAL.inputs[0], _INTERM, *DECODER_OFFICIAL.inputs[1:], *_FLAGS),
    outputs=(
        TensorSpec("masks", _FP32, (1, 1, "image_height", "image_width"),
                   "mask logits at the original image size; threshold at 0"),
        TensorSpec("iou_predictions", _FP32, (1, 1), "the predicted IoU of SAM's mask chosen"),
        TensorSpec("low_res_masks", _FP32, (1, 1, _M, _M), "mask logits at 256x256"),
    ),
    tolerances=DECODER_OFFICIAL.tolerances,
)

HQ_BATCHED = GraphContract(
    name="hq_batched",
    role="decoder",
    doc="Many point prompts against one image in one run, as the automatic mask generator "
    "sends them: no mask prompt, one mask and score per prompt; the caller upscales.",
    inputs=(_IMAGE_EMBEDDINGS, _INTERM, DECODER_BATCHED.input("point_coords"),
            DECODER_BATCHED.input("point_labels"), *_FLAGS),
    outputs=(
        TensorSpec("low_res_masks", _FP32, ("num_prompts", 1, _M, _M),
                   "mask logits at 256x256 per prompt, before upscaling"),
        TensorSpec("iou_predictions", _FP32, ("num_prompts", 1), "predicted IoU per prompt"),
    ),
    tolerances=DECODER_OFFICIAL.tolerances,
)

#: By name; the encoder first, then the decoders.
CONTRACTS: Dict[str, GraphContract] = {c.name: c for c in (HQ_ENCODER, HQ_OFFICIAL, HQ_BATCHED)}
