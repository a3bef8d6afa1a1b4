"""SAM v1's graphs (vit_b / vit_l / vit_h and the test-size ``tiny``), declared once as data.

segment-anything's geometry and pre-processing (segment_anything/build_sam.py,
segment_anything/utils/onnx.py): the exporter writes graphs that follow these contracts and
records them in each graph's metadata; validate, repair and the runtime read them back.
"""
from __future__ import annotations

from typing import Dict

from ...core.contracts import GraphContract, Postprocess, Preprocess, TensorSpec, Tolerance

IMAGE_SIZE = 1024
EMBEDDING_SIZE = IMAGE_SIZE // 16
MASK_INPUT_SIZE = 4 * EMBEDDING_SIZE
EMBEDDING_DIM = 256
NUM_MASK_TOKENS = 4
PREPROCESS = Preprocess(image_size=IMAGE_SIZE, pixel_mean=(123.675, 116.28, 103.53),
                        pixel_std=(58.395, 57.12, 57.375))
POSTPROCESS = Postprocess(low_res_size=MASK_INPUT_SIZE, mask_threshold=0.0)
MASK_THRESHOLD = POSTPROCESS.mask_threshold

_FP32 = "float32"
_E, _M = EMBEDDING_SIZE, MASK_INPUT_SIZE

_IMAGE_EMBEDDINGS = TensorSpec(
    "image_embeddings", _FP32, (1, EMBEDDING_DIM, _E, _E), "the encoder's output for one image"
)
_POINT_COORDS = TensorSpec(
    "point_coords",
    _FP32,
    (1, "num_points", 2),
    "(x, y) in the resized 1024-pixel frame; a box is two points labelled 2 and 3",
)
_POINT_LABELS = TensorSpec(
    "point_labels",
    _FP32,
    (1, "num_points"),
    "1 foreground, 0 background, 2/3 box corners, -1 padding (add one when there is no box)",
)
_MASK_INPUT = TensorSpec(
    "mask_input", _FP32, (1, 1, _M, _M), "low-res logits of an earlier prediction, to refine"
)
_IOU_PREDICTIONS = TensorSpec(
    "iou_predictions", _FP32, (1, NUM_MASK_TOKENS),
    "predicted IoU per mask (single-mask token first)"
)
_LOW_RES_MASKS = TensorSpec(
    "low_res_masks", _FP32, (1, NUM_MASK_TOKENS, _M, _M), "mask logits at 256x256, before upscaling"
)

ENCODER = GraphContract(
    name="encoder",
    role="encoder",
    doc="The image encoder (SAM's ViT; MobileSAM's TinyViT) on one pre-processed image.",
    inputs=(
        TensorSpec(
            "image",
            _FP32,
            (1, 3, IMAGE_SIZE, IMAGE_SIZE),
            "RGB resized so its longest side is 1024, normalized by pixel mean/std, zero-padded "
            "bottom-right",
        ),
    ),
    outputs=(_IMAGE_EMBEDDINGS,),
    tolerances={"fp32": Tolerance(atol=1e-4, rtol=1e-3), "fp16": Tolerance(atol=1e-3, rtol=0.02),
                "int8": Tolerance(atol=0.0, rtol=0.25)},
)

#: Decoders: the masks are what users keep, so reduced precision is also held to overlap.
_DECODER_TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, min_mask_iou=0.99),
    "fp16": Tolerance(atol=1e-3, rtol=0.02, min_mask_iou=0.98),
    "int8": Tolerance(atol=0.0, rtol=0.25, min_mask_iou=0.95),
}

DECODER_OFFICIAL = GraphContract(
    name="official",
    role="decoder",
    doc="segment-anything's ONNX decoder (scripts/export_onnx_model.py): prompt encoder, mask "
    "decoder and upscaling to the original image size, all four mask tokens returned.",
    inputs=(
        _IMAGE_EMBEDDINGS,
        _POINT_COORDS,
        _POINT_LABELS,
        _MASK_INPUT,
        TensorSpec("has_mask_input", _FP32, (1,), "1 when mask_input holds a mask, else 0"),
        TensorSpec("orig_im_size", _FP32, (2,), "(height, width) of the original image"),
    ),
    outputs=(
        TensorSpec(
            "masks",
            _FP32,
            (1, NUM_MASK_TOKENS, "image_height", "image_width"),
            "mask logits at the original image size; threshold at 0",
        ),
        _IOU_PREDICTIONS,
        _LOW_RES_MASKS,
    ),
    tolerances=_DECODER_TOLERANCES,
)

#: segment-anything's ``select_masks``: with N points (the padding point counted), the score
#: of the single-mask token is raised by (N - 2.5) * 1000 and the best score wins: the
#: single-mask token for 3 points or more, else the best of the three multimask outputs.
SELECT_MASKS = "select_masks"

DECODER_OFFICIAL_SINGLE = GraphContract(
    name="official_single",
    role="decoder",
    doc="segment-anything's ONNX decoder exported with return_single_mask=True (its script's "
    "--return-single-mask): one mask a prompt, chosen in the graph by segment-anything's "
    "select_masks rule (the single-mask token for three or more points, the padding point "
    "counted; else the best-scored of the three multimask outputs). The form the ONNX "
    "notebook, the web demo, samexporter's documented flow and AnyLabeling run.",
    inputs=DECODER_OFFICIAL.inputs,
    outputs=(
        TensorSpec("masks", _FP32, (1, 1, "image_height", "image_width"),
                   "the chosen mask's logits at the original image size; threshold at 0"),
        TensorSpec("iou_predictions", _FP32, (1, 1), "the chosen mask's predicted IoU"),
        TensorSpec("low_res_masks", _FP32, (1, 1, _M, _M),
                   "the chosen mask's logits at 256x256: the next prompt's mask_input"),
    ),
    tolerances=_DECODER_TOLERANCES,
    selects=SELECT_MASKS,
)

DECODER_LOWRES = GraphContract(
    name="lowres",
    role="decoder",
    doc="A 4-input decoder returning low-resolution logits and scores; the caller upscales. "
    "An all-zero mask_input means no mask prompt.",
    inputs=(_IMAGE_EMBEDDINGS, _POINT_COORDS, _POINT_LABELS, _MASK_INPUT),
    outputs=(_LOW_RES_MASKS, _IOU_PREDICTIONS),
    tolerances=DECODER_OFFICIAL.tolerances,
)

DECODER_BATCHED = GraphContract(
    name="batched",
    role="decoder",
    doc="Many prompts against one image embedding in one run, as the automatic mask "
    "generator (points) and detector pipelines (boxes, SamPredictor.predict_torch(boxes=)) "
    "need them: no mask prompt, scores for every prompt and low-resolution logits "
    "for the prompts whose scores pass a threshold (the generator drops the others unseen, "
    "and scores cost half of what masks do); the caller upscales. The work that does not "
    "depend on the prompt is done once per run.",
    inputs=(
        _IMAGE_EMBEDDINGS,
        TensorSpec("point_coords", _FP32, ("num_prompts", "num_points", 2),
                   "(x, y) in the resized 1024-pixel frame, one row of points per prompt"),
        TensorSpec("point_labels", _FP32, ("num_prompts", "num_points"),
                   "as for one prompt; the automatic mask generator sends [1, -1] (a point and "
                   "the padding point), predict_batch(boxes=) a box's corners [2, 3] after any "
                   "points"),
        TensorSpec("pred_iou_thresh", _FP32, (1,),
                   "masks are computed for every prompt except those whose predicted IoUs are "
                   "all at or below this; -inf for every prompt"),
    ),
    outputs=(
        TensorSpec("low_res_masks", _FP32, ("num_kept", NUM_MASK_TOKENS, _M, _M),
                   "mask logits at 256x256 per kept prompt, before upscaling"),
        TensorSpec("iou_predictions", _FP32, ("num_prompts", NUM_MASK_TOKENS),
                   "predicted IoU per prompt and mask (single-mask token first)"),
        TensorSpec("kept_prompts", "int64", ("num_kept",),
                   "which prompts low_res_masks belongs to, in increasing order"),
    ),
    tolerances=DECODER_OFFICIAL.tolerances,
)

ENCODER_IMAGE = GraphContract(
    name="encoder_image",
    role="encoder",
    doc="The image encoder with SAM's pre-processing inside the graph: it takes the image "
    "itself, resized so its longest side is 1024 (RGB, 0-255, float32, height x width x 3), "
    "and normalizes, transposes and pads it. The form AnyLabeling and X-AnyLabeling feed "
    "(samexporter's --use-preprocess).",
    inputs=(
        TensorSpec("input_image", _FP32, ("image_height", "image_width", 3),
                   "RGB 0-255, resized so its longest side is 1024 (neither side over 1024), "
                   "not normalized, not padded"),
    ),
    outputs=(_IMAGE_EMBEDDINGS,),
    tolerances=ENCODER.tolerances,
    preprocess_inside=True,
)

#: By name; the encoders first, then the decoders.
CONTRACTS: Dict[str, GraphContract] = {
    c.name: c for c in (ENCODER, ENCODER_IMAGE, DECODER_OFFICIAL, DECODER_OFFICIAL_SINGLE,
                        DECODER_LOWRES, DECODER_BATCHED)
}

#: The decoder contracts ``repair --contract`` converts a decoder to
#: (graph.passes.CONTRACT_CONVERSIONS).
CONVERTIBLE = ("official", "official_single", "lowres", "batched")
