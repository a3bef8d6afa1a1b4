"""SAM 2's image graphs, declared once as data.

The encoder returns what SAM2ImagePredictor.set_image keeps: the image embedding with the
no-memory embedding added, and the two high-resolution maps already projected by the mask
decoder's conv_s0 / conv_s1. The decoders sam-onnx exports take samexporter's seven inputs (the
form X-AnyLabeling and AnyLabeling load), prompts batched along the first axis.

ONNX Runtime's own SAM 2 export (onnxruntime/transformers/models/sam2) names the same tensors
differently, takes int32 labels and the image size, and returns full-size masks; its graphs
are declared too (``sam2_ort*``), so that validate recognises them and the predictor runs them
(``ALIASES`` maps its names onto these), but sam-onnx does not write them.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

from ...core.contracts import GraphContract, Postprocess, TensorSpec
from ..sam.contracts import DECODER_BATCHED, DECODER_OFFICIAL, ENCODER
from ..sam.contracts import PREPROCESS as SAM_PREPROCESS

IMAGE_SIZE = 1024
MASK_INPUT_SIZE = 256
NUM_MASK_TOKENS = 4
#: SAM2Transforms: resize to 1024x1024 (aspect ratio not kept); ImageNet's mean/std, as SAM's.
PREPROCESS = dataclasses.replace(SAM_PREPROCESS, resize="square", pad="none")
#: SAM2ImagePredictor: logits resized straight to the image, a single mask chosen by
#: stability (build_sam2's apply_postprocessing), low-res logits returned clipped to +-32.
POSTPROCESS = Postprocess(low_res_size=MASK_INPUT_SIZE, mask_threshold=0.0, upscale="original",
                          single_mask="dynamic_stability", low_res_clamp=32.0)

_FP32 = "float32"
_M = MASK_INPUT_SIZE
_N = "num_labels"

_FEATURES = (
    TensorSpec("high_res_feats_0", _FP32, (1, 32, 256, 256),
               "the Hiera's stride-4 features through the mask decoder's conv_s0"),
    TensorSpec("high_res_feats_1", _FP32, (1, 64, 128, 128),
               "the Hiera's stride-8 features through the mask decoder's conv_s1"),
    TensorSpec("image_embed", _FP32, (1, 256, 64, 64),
               "the stride-16 image embedding with the no-memory embedding added"),
)
_INPUTS = (
    _FEATURES[2], *_FEATURES[:2],
    TensorSpec("point_coords", _FP32, (_N, "num_points", 2),
               "(x, y) in the 1024x1024 resized frame (x * 1024 / width); a box is two points "
               "labelled 2 and 3; one row of points per prompt"),
    TensorSpec("point_labels", _FP32, (_N, "num_points"),
               "1 foreground, 0 background, 2/3 box corners (first), -1 padding to a common "
               "count; the graph appends SAM 2's padding point itself"),
    TensorSpec("mask_input", _FP32, (_N, 1, _M, _M),
               "low-res logits of an earlier prediction, to refine"),
    TensorSpec("has_mask_input", _FP32, (_N,), "1 where mask_input holds a mask, else 0"),
)
#: SAM's limits: the same arithmetic in the same precisions.
_TOLERANCES = DECODER_OFFICIAL.tolerances

SAM2_ENCODER = GraphContract(
    name="sam2_encoder",
    role="encoder",
    doc="SAM 2's Hiera image encoder on one pre-processed image: the embedding and the two "
    "high-resolution maps the decoder fuses.",
    inputs=(TensorSpec("image", _FP32, (1, 3, IMAGE_SIZE, IMAGE_SIZE),
                       "RGB resized to 1024x1024, normalized by ImageNet mean/std"),),
    outputs=_FEATURES,
    tolerances=ENCODER.tolerances,
)

SAM2_OFFICIAL = GraphContract(
    name="sam2_official",
    role="decoder",
    doc="samexporter's SAM 2 decoder (the form X-AnyLabeling loads): prompt encoder and mask "
    "decoder, the three multimask outputs as low-res logits clipped to +-32; the caller "
    "resizes them to the image.",
    inputs=_INPUTS,
    outputs=(
        TensorSpec("masks", _FP32, (_N, 3, _M, _M), "low-res logits of the three multimask "
                   "outputs, clipped to +-32"),
        TensorSpec("iou_predictions", _FP32, (_N, 3), "predicted IoU per mask"),
    ),
    tolerances=_TOLERANCES,
)

#: The high-resolution maps as the ``sam2_batched`` decoder takes them (``blocks.to_blocks``
#: of the encoder's, made once an image): in the upscaler's block order.
BLOCKS = {"high_res_blocks_0": "high_res_feats_0", "high_res_blocks_1": "high_res_feats_1"}
_BLOCK_ORDER = ("in block order (blocks.to_blocks): [0, 64i+j, k, c] is {name}[0, c, {rows}, "
                "{cols}]; the caller makes it once an image")

SAM2_BATCHED = GraphContract(
    name="sam2_batched",
    role="decoder",
    doc="sam2_official's prompt inputs and a threshold, the high-resolution maps in the "
    "upscaler's block order; every mask token's score for every prompt, and all four tokens' "
    "unclipped logits for the prompts whose scores pass the threshold: what "
    "multimask_output=False (SAM 2's stability-chosen single mask) and the automatic mask "
    "generator need (it drops the other prompts' masks unseen, and the upscaler is most of "
    "a prompt's time). Its upscaler, on the maps in block order, is two matrix products "
    "(the decoder alone 8-19% faster than with sam2_official's pixel-order upscaler), and "
    "its first layer's image projections and the upscaler's biases on the maps depend on the "
    "image alone, so a caller that splits them off runs them once an image (the predictor "
    "does: one prompt 28.0 -> 23.2 ms, sam2.1 tiny).",
    inputs=(_INPUTS[0],
            TensorSpec("high_res_blocks_0", _FP32, (1, 4096, 16, 32), _BLOCK_ORDER.format(
                name="high_res_feats_0", rows="4i+2di+ei", cols="4j+2dj+ej") +
                ", k = 8di+4dj+2ei+ej"),
            TensorSpec("high_res_blocks_1", _FP32, (1, 4096, 4, 64), _BLOCK_ORDER.format(
                name="high_res_feats_1", rows="2i+di", cols="2j+dj") + ", k = 2di+dj"),
            *_INPUTS[3:], TensorSpec(
        "pred_iou_thresh", _FP32, (NUM_MASK_TOKENS,),
        "one per mask token (single-mask token first): masks are computed for every prompt "
        "except those whose predicted IoUs are all at or below their token's threshold; +inf "
        "leaves a token out (the single-mask token when the multimask outputs are read: its "
        "score would keep prompts whose masks are then dropped), -inf keeps every prompt")),
    outputs=(
        TensorSpec("low_res_masks", _FP32, ("num_kept", NUM_MASK_TOKENS, _M, _M),
                   "mask logits at 256x256 per kept prompt (single-mask token first)"),
        TensorSpec("iou_predictions", _FP32, (_N, NUM_MASK_TOKENS),
                   "predicted IoU per prompt and mask"),
        DECODER_BATCHED.output("kept_prompts"),
    ),
    tolerances=_TOLERANCES,
)

_ORT_FEATURES = tuple(TensorSpec(name, t.dtype, t.shape, t.doc) for name, t in zip(
    ("image_features_0", "image_features_1", "image_embeddings"), _FEATURES))

SAM2_ORT_ENCODER = GraphContract(
    name="sam2_ort_encoder",
    role="encoder",
    doc="ONNX Runtime's SAM 2 image encoder (convert_to_onnx.py): sam2_encoder's outputs under "
    "ONNX Runtime's names.",
    inputs=SAM2_ENCODER.inputs,
    outputs=_ORT_FEATURES,
    tolerances=SAM2_ENCODER.tolerances,
)


def _ort_decoder(name: str, masks: int, doc: str) -> GraphContract:
    return GraphContract(
        name=name,
        role="decoder",
        doc=doc,
        inputs=(*_ORT_FEATURES, _INPUTS[3],
                TensorSpec("point_labels", "int32", (_N, "num_points"), _INPUTS[4].doc),
                TensorSpec("input_masks", _FP32, (_N, 1, _M, _M), _INPUTS[5].doc),
                TensorSpec("has_input_masks", _FP32, (_N,), _INPUTS[6].doc),
                TensorSpec("original_image_size", "int32", (2,),
                           "(height, width) of the original image")),
        outputs=(
            TensorSpec("masks", "bool", (_N, masks, "original_image_height",
                                         "original_image_width"),
                       "masks at the original image size"),
            TensorSpec("iou_predictions", _FP32, (_N, masks), "predicted IoU per mask"),
            TensorSpec("low_res_masks", _FP32, (_N, masks, _M, _M),
                       "low-res logits, clipped to +-32"),
        ),
        tolerances=_TOLERANCES,
    )


SAM2_ORT = _ort_decoder(
    "sam2_ort", 1, "ONNX Runtime's SAM 2 image decoder as convert_to_onnx.py writes it by "
    "default: one mask per prompt, chosen by stability (SAM2ImagePredictor's "
    "multimask_output=False), full-size masks thresholded in the graph.")
SAM2_ORT_MULTIMASK = _ort_decoder(
    "sam2_ort_multimask", 3, "The same, written with --multimask_output: the three "
    "multimask outputs.")

#: ONNX Runtime's names -> the names of the contracts sam-onnx exports, for feeding either.
ALIASES = {"image_features_0": "high_res_feats_0", "image_features_1": "high_res_feats_1",
           "image_embeddings": "image_embed", "input_masks": "mask_input",
           "has_input_masks": "has_mask_input", "original_image_size": "orig_im_size"}

#: By name; the encoders first, then the decoders.
CONTRACTS: Dict[str, GraphContract] = {
    c.name: c for c in (SAM2_ENCODER, SAM2_ORT_ENCODER, SAM2_OFFICIAL, SAM2_BATCHED, SAM2_ORT,
                        SAM2_ORT_MULTIMASK)}
#: The decoder contracts ``repair --contract`` converts a decoder to: ONNX Runtime's
#: three-mask form to samexporter's (graph.passes.to_sam2_official).
CONVERTIBLE = (SAM2_OFFICIAL.name,)
#: Declared to recognise and run other tools' graphs; sam-onnx does not export them.
RECOGNISED_ONLY = (SAM2_ORT_ENCODER.name, SAM2_ORT.name, SAM2_ORT_MULTIMASK.name)
