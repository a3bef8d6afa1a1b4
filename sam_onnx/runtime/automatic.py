"""``SamOnnxAutomaticMaskGenerator``: segment_anything's SamAutomaticMaskGenerator on ONNX
Runtime, with the same parameters and record fields, so a pipeline can swap one for the other.

Differences are in how the work is done, not in what is returned:
* a ``batched`` decoder runs a whole batch of point prompts in one call (other decoder
  contracts work too, one prompt per call);
* masks are filtered by predicted IoU before they are computed: a ``batched`` decoder runs
  its upscaler only for prompts with a score above ``pred_iou_thresh`` (segment_anything
  computes and upscales every mask, then drops most of them), and the kept ones are upscaled
  in chunks of bounded memory with the three resizes folded into one band matrix per axis;
* post-processing is numpy (``amg``), with no torch or torchvision.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.contracts import EVERY_PROMPT
from ..core.errors import SamOnnxError
from . import amg
from .images import ImageLike, load_image
from .predictor import SamOnnxPredictor

log = logging.getLogger("sam_onnx.automatic")

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
#: Upscaled float32 logits held at once while post-processing a batch.
CHUNK_BYTES = 64 << 20

Model = Union[SamOnnxPredictor, Tuple[Union[str, Path], Union[str, Path]]]


class SamOnnxAutomaticMaskGenerator:
    """Generates masks for a whole image from a grid of point prompts; see segment_anything's
    SamAutomaticMaskGenerator (and sam2's SAM2AutomaticMaskGenerator, for ``mask_threshold``,
    ``use_m2m`` and ``multimask_output``) for the meaning of every parameter.

    ``pred_iou_thresh`` and ``mask_threshold`` default to the graphs' family's own generator
    (0.88 for SAM, MobileSAM and HQ-SAM; 0.8 for SAM 2)."""

    def __init__(self, model: Model, points_per_side: Optional[int] = 32,
                 points_per_batch: int = 64, pred_iou_thresh: Optional[float] = None,
                 stability_score_thresh: float = 0.95, stability_score_offset: float = 1.0,
                 box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1,
                 point_grids: Optional[List[np.ndarray]] = None, min_mask_region_area: int = 0,
                 output_mode: str = "binary_mask", mask_threshold: Optional[float] = None,
                 use_m2m: bool = False, multimask_output: bool = True) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise SamOnnxError("give exactly one of points_per_side or point_grids")
        if output_mode not in OUTPUT_MODES:
            raise SamOnnxError(f"unknown output_mode {output_mode!r}; use one of: "
                               f"{', '.join(OUTPUT_MODES)}")
        if points_per_batch < 1:
            raise SamOnnxError(f"points_per_batch must be at least 1; got {points_per_batch}")
        if min_mask_region_area > 0:
            try:
                import scipy.ndimage  # noqa: F401
            except ImportError:
                raise SamOnnxError("min_mask_region_area needs scipy: pip install scipy") from None
        if points_per_side is not None:
            point_grids = amg.build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        if len(point_grids) < crop_n_layers + 1:
            raise SamOnnxError(f"point_grids has {len(point_grids)} grid(s); crop_n_layers="
                               f"{crop_n_layers} needs {crop_n_layers + 1}")
        self.predictor = model if isinstance(model, SamOnnxPredictor) else \
            SamOnnxPredictor(*model)
        if not self.predictor.batched:
            log.warning("the %s decoder runs one prompt per call; export a batched decoder "
                        "(--decoder-contract batched) for the fast path",
                        self.predictor.decoder_contract.name)
        defaults = self.predictor.family.generator_defaults
        self.point_grids = point_grids
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = defaults.get("pred_iou_thresh", 0.88) \
            if pred_iou_thresh is None else pred_iou_thresh
        self.mask_threshold = self.predictor.family.postprocess.mask_threshold \
            if mask_threshold is None else mask_threshold
        self.use_m2m = use_m2m
        self.multimask_output = multimask_output
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    def generate(self, image: ImageLike, image_format: str = "RGB",
                 progress: Optional[Callable[[int, int], None]] = None) -> List[Dict[str, Any]]:
        """Records with segmentation, area, bbox (XYWH), predicted_iou, point_coords,
        stability_score and crop_box (XYWH), as segment_anything's generate() returns.

        ``progress(done, total)`` is called after every batch of prompts."""
        data = self.generate_raw(image, image_format, progress)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh))
        records = []
        for i, rle in enumerate(data.get("rles", [])):
            if self.output_mode == "coco_rle":
                segmentation: Any = amg.coco_encode_rle(rle)
            elif self.output_mode == "binary_mask":
                segmentation = amg.rle_to_mask(rle)
            else:
                segmentation = rle
            records.append({
                "segmentation": segmentation,
                "area": amg.area_from_rle(rle),
                "bbox": amg.box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                "predicted_iou": float(data["iou_preds"][i]),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": float(data["stability_score"][i]),
                "crop_box": amg.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
            })
        return records

    def generate_raw(self, image: ImageLike, image_format: str = "RGB",
                     progress: Optional[Callable[[int, int], None]] = None) -> amg.MaskData:
        """The masks as columns (rles, boxes, iou_preds, points, stability_score,
        crop_boxes) before the small-region clean-up and the records."""
        rgb = load_image(image, image_format)
        orig_size = rgb.shape[:2]
        crop_boxes, layer_idxs = amg.generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        total = sum(len(self.point_grids[i]) for i in layer_idxs)
        done = [0]

        def step(n):
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        data = amg.MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            data.cat(self._process_crop(rgb, crop_box, layer_idx, orig_size, step))
        if len(crop_boxes) > 1 and len(data):  # prefer masks from smaller crops
            scores = 1 / amg.box_area(data["crop_boxes"]).astype(np.float64)
            data.filter(amg.nms(data["boxes"], scores, self.crop_nms_thresh))
        return data

    def _process_crop(self, image: np.ndarray, crop_box: List[int], layer_idx: int,
                      orig_size: Tuple[int, int], step) -> amg.MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = np.ascontiguousarray(image[y0:y1, x0:x1])
        self.predictor.set_image(cropped)
        points = self.point_grids[layer_idx] * np.array(cropped.shape[:2])[None, ::-1]
        data = amg.MaskData()
        for (batch,) in amg.batch_iterator(self.points_per_batch, points):
            data.cat(self._process_batch(batch, cropped.shape[:2], crop_box, orig_size))
            step(len(batch))
        self.predictor.reset_image()
        if len(data):
            data.filter(amg.nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
            data["boxes"] = amg.uncrop_boxes_xyxy(data["boxes"], crop_box)
            data["points"] = amg.uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = np.array([crop_box] * len(data), np.int64).reshape(-1, 4)
        return data

    def _predict(self, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Low-res logits (P, M, 256, 256), scores (P, M) and points (P, 2) of the prompts
        that may pass ``pred_iou_thresh``; with ``use_m2m`` every mask refined first, as
        SAM2AutomaticMaskGenerator.refine_with_m2m: its own logits as the mask prompt, one
        mask out (P: the masks, M: 1)."""
        ones = np.ones((len(points), 1))
        if self.use_m2m:
            low_res, iou = self.predictor.predict_batch(points[:, None, :], ones,
                                                        self.multimask_output)
            points = np.repeat(points, iou.shape[1], axis=0)
            prompts = self.predictor.clamp_low_res(low_res.reshape(-1, *low_res.shape[2:]))
            low_res, iou = self.predictor.predict_batch(
                points[:, None, :], np.ones((len(points), 1)), False, mask_input=prompts)
            return low_res, iou, points
        filtering = self.pred_iou_thresh > 0.0  # segment_anything skips the filter at <= 0
        low_res, iou, kept = self.predictor.predict_batch_filtered(
            points[:, None, :], ones, self.pred_iou_thresh if filtering else EVERY_PROMPT,
            self.multimask_output)
        return low_res, iou[kept], points[kept]

    def _process_batch(self, points: np.ndarray, im_size: Tuple[int, int],
                       crop_box: List[int], orig_size: Tuple[int, int]) -> amg.MaskData:
        low_res, iou, points = self._predict(points)
        keep = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else \
            np.ones(iou.shape, bool)  # (prompts, masks), in segment_anything's order
        low_res, iou = low_res[keep], iou[keep]
        pts = np.repeat(points[:, None], keep.shape[1], axis=1)[keep]
        orig_h, orig_w = orig_size
        h, w = im_size
        threshold = self.mask_threshold
        chunk = max(1, CHUNK_BYTES // (4 * h * w))
        data = amg.MaskData()
        for start in range(0, len(low_res), chunk):
            sl = slice(start, start + chunk)
            logits = self.predictor.postprocess_masks(low_res[sl], return_logits=True)
            part = amg.MaskData(iou_preds=iou[sl], points=pts[sl],
                                stability_score=amg.stability_score(
                                    logits, threshold, self.stability_score_offset))
            keep = part["stability_score"] >= self.stability_score_thresh \
                if self.stability_score_thresh > 0.0 else np.ones(len(logits), bool)
            part.filter(keep)
            # threshold, then pick: indexing the float logits first copied 4x the bytes
            # (sam2.1 tiny, every mask kept: 6.7 s of a 40 s run, measured)
            masks = (logits > threshold)[keep]
            del logits
            part["boxes"] = amg.batched_mask_to_box(masks)
            near = amg.is_box_near_crop_edge(part["boxes"], crop_box, [0, 0, orig_w, orig_h])
            part.filter(~near)
            masks = masks[~near]
            part["rles"] = _rles_uncropped(masks, crop_box, orig_h, orig_w)
            data.cat(part)
        return data

    @staticmethod
    def postprocess_small_regions(data: amg.MaskData, min_area: int,
                                  nms_thresh: float) -> amg.MaskData:
        """Fill small holes and drop small islands, then NMS again (unchanged masks first)."""
        if not len(data):
            return data
        masks, scores = [], []
        for rle in data["rles"]:
            mask, holes = amg.remove_small_regions(amg.rle_to_mask(rle), min_area, "holes")
            mask, islands = amg.remove_small_regions(mask, min_area, "islands")
            masks.append(mask)
            scores.append(float(not (holes or islands)))
        boxes = amg.batched_mask_to_box(np.stack(masks))
        keep = amg.nms(boxes, np.array(scores), nms_thresh)
        for i in keep:
            if scores[i] == 0.0:
                data["rles"][i] = amg.mask_to_rle(masks[i][None])[0]
                data["boxes"][i] = boxes[i]
        data.filter(keep)
        return data


def _rles_uncropped(masks: np.ndarray, crop_box: Sequence[int], orig_h: int,
                    orig_w: int) -> List[amg.Rle]:
    """RLEs of the masks placed in the whole image (segment_anything's uncrop_masks)."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) != (0, 0, orig_w, orig_h):
        masks = np.pad(masks, ((0, 0), (y0, orig_h - y1), (x0, orig_w - x1)))
    return amg.mask_to_rle(masks)
