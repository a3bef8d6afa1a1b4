"""HQ-SAM's graphs, declared once as data: SAM's, plus the HQ features that HQ-SAM's decoder
fuses into its high-quality mask, and the HQ output token.

The decoders follow sam-hq's own ONNX export (segment_anything_hq/utils/onnx.py) with two
changes. Its export-time switches, ``multimask_output`` and ``hq_token_only``, are inputs, so
that one graph serves every SamPredictor.predict call. And the decoder takes ``hq_features``
where sam-hq's takes the encoder's intermediate embeddings: the first thing HQ's decoder does
with them (and the embedding) is lift both to 256x256 by four transposed convolutions, the
same for every prompt; here the encoder graph does that once an image. Measured (hq_vit_b):
~8.3 GFLOP a prompt saved, and what the predictor keeps an image is 8 MB of HQ features
instead of 50 MB of intermediate embeddings (docs/benchmarks.md, HQ-SAM).
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
_HQ_FEATURES = TensorSpec(
    "hq_features", _FP32, (1, 32, _M, _M),
    "HQ-SAM's image-level HQ features: the decoder's embedding_encoder(image_embeddings) + "
    "compress_vit_feat(the encoder's first intermediate embedding), as MaskDecoderHQ.forward "
    "computes them; every prompt's HQ mask adds them")
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
    doc="HQ-SAM's image encoder on one pre-processed image: SAM's embeddings and the HQ "
    "features HQ-SAM's decoder fuses, computed from the encoder's early features once an "
    "image (the decoder's fusion layers are in this graph).",
    inputs=ENCODER.inputs,
    outputs=(_IMAGE_EMBEDDINGS, _HQ_FEATURES),
    tolerances=ENCODER.tolerances,
)

HQ_OFFICIAL = GraphContract(
    name="hq_official",
    role="decoder",
    doc="HQ-SAM's decoder as sam-hq exports it (prompt encoder, HQ mask decoder, upscaling to "
    "the original image size), one mask per prompt, with multimask_output and hq_token_only "
    "as inputs.",
    inputs=(DECODER_OFFICIAL.inputs[0], _HQ_FEATURES, *DECODER_OFFICIAL.inputs[1:], *_FLAGS),
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
    "sends them: no mask prompt, one score per prompt, and one mask for each prompt whose "
    "score passes a threshold (the generator drops the others unseen); the caller upscales.",
    inputs=(_IMAGE_EMBEDDINGS, _HQ_FEATURES, DECODER_BATCHED.input("point_coords"),
            DECODER_BATCHED.input("point_labels"), *_FLAGS,
            DECODER_BATCHED.input("pred_iou_thresh")),
    outputs=(
        TensorSpec("low_res_masks", _FP32, ("num_kept", 1, _M, _M),
                   "mask logits at 256x256 per kept prompt, before upscaling"),
        TensorSpec("iou_predictions", _FP32, ("num_prompts", 1),
                   "predicted IoU of each prompt's mask"),
        DECODER_BATCHED.output("kept_prompts"),
    ),
    tolerances=DECODER_OFFICIAL.tolerances,
)

#: By name; the encoder first, then the decoders.
CONTRACTS: Dict[str, GraphContract] = {c.name: c for c in (HQ_ENCODER, HQ_OFFICIAL, HQ_BATCHED)}
