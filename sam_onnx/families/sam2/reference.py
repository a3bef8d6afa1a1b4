"""PyTorch reference outputs for the exporter's SAM 2 checks, through sam2's own code:
``SAM2ImagePredictor._predict`` for the three-mask form (prompt encoder, mask decoder, its
clipping), the prompt encoder and ``MaskDecoder.predict_masks`` for every token; not through
the exported wrappers."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from sam2.sam2_image_predictor import SAM2ImagePredictor

from ...core.contracts import EVERY_PROMPT, GraphContract
from ..sam.reference import PROMPTS, Prompt, grid_points
from . import SAM2
from .contracts import IMAGE_SIZE, MASK_INPUT_SIZE, NUM_MASK_TOKENS, SAM2_ENCODER

__all__ = ["PROMPTS", "encoder_input", "encoder_reference", "random_encoder_outputs",
           "decoder_feed", "decoder_reference"]

Arrays = Dict[str, np.ndarray]


def encoder_input(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)}


@torch.inference_mode()
def encoder_reference(model, feed: Arrays) -> Arrays:
    """SAM2ImagePredictor.set_image's steps on an already transformed image."""
    backbone_out = model.forward_image(torch.from_numpy(feed["image"]))
    _, feats, _, sizes = model._prepare_backbone_features(backbone_out)
    feats[-1] = feats[-1] + model.no_mem_embed
    maps = [f.permute(1, 2, 0).view(1, -1, h, w).numpy() for f, (h, w) in zip(feats, sizes)]
    return dict(zip(SAM2_ENCODER.output_names, maps))


def random_encoder_outputs(model, seed: int = 0) -> Arrays:
    """What the decoders take from the encoder, random: for a decoder exported alone."""
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape, dtype=np.float32) for t in SAM2_ENCODER.outputs}


def _frame(points: np.ndarray, image_size) -> np.ndarray:
    """(x, y) in image pixels -> the 1024x1024 frame (SAM2Transforms.transform_coords)."""
    h, w = image_size
    return points * np.array([IMAGE_SIZE / w, IMAGE_SIZE / h])


def _grid(prompt: Prompt):
    """SAM's grid of point prompts (``grid_points``) in SAM 2's frame: (B, 1, 2), (B, 1)."""
    points, labels = grid_points(prompt)
    return _frame(points, prompt.image_size)[:, None], labels[:, None]


def decoder_feed(contract: GraphContract, encoded: Arrays, prompt: Prompt) -> Arrays:
    """``sam2_batched`` gets a grid of prompts at once, every one's masks asked for;
    ``sam2_official`` the prompt itself (box corners first, as SAM2ImagePredictor); the
    graphs add the padding point."""
    if contract.name == "sam2_batched":
        coords, labels = _grid(prompt)
        with_mask = False
    else:
        coords, labels = _frame(prompt.points, prompt.image_size), prompt.labels
        if prompt.box is not None:
            corners = _frame(prompt.box.reshape(2, 2), prompt.image_size)
            coords, labels = np.concatenate([corners, coords]), np.concatenate([[2.0, 3.0],
                                                                                 labels])
        coords, labels = coords[None], labels[None]
        with_mask = prompt.with_mask
    n = len(coords)
    mask = np.zeros((n, 1, MASK_INPUT_SIZE, MASK_INPUT_SIZE), np.float32)
    if with_mask:
        mask[...] = np.random.default_rng(1).standard_normal(mask.shape)
    values = {**encoded, **SAM2.derive_inputs(encoded, contract.input_names),
              "point_coords": coords.astype(np.float32),
              "point_labels": labels.astype(np.float32), "mask_input": mask,
              "has_mask_input": np.full(n, float(with_mask), np.float32),
              "pred_iou_thresh": np.full(NUM_MASK_TOKENS, EVERY_PROMPT, np.float32)}
    return {name: values[name] for name in contract.input_names}


@torch.inference_mode()
def decoder_reference(model, contract: GraphContract, encoded: Arrays, prompt: Prompt) -> Arrays:
    feed = decoder_feed(contract, encoded, prompt)
    high_res = [torch.from_numpy(encoded[f"high_res_feats_{i}"]) for i in (0, 1)]
    embed = torch.from_numpy(encoded["image_embed"])
    if contract.name == "sam2_batched":
        points = (torch.from_numpy(feed["point_coords"]), torch.from_numpy(feed["point_labels"]))
        sparse, dense = model.sam_prompt_encoder(points=points, boxes=None, masks=None)
        masks, scores, _, _ = model.sam_mask_decoder.predict_masks(
            image_embeddings=embed, image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, repeat_image=True,
            high_res_features=high_res)
        return {"low_res_masks": masks.numpy(), "iou_predictions": scores.numpy(),
                "kept_prompts": np.arange(len(scores), dtype=np.int64)}
    predictor = SAM2ImagePredictor(model, disable_torch_jit=True)  # its transforms unused
    predictor._features = {"image_embed": embed, "high_res_feats": high_res}
    predictor._orig_hw, predictor._is_image_set = [prompt.image_size], True
    box = None if prompt.box is None else torch.from_numpy(
        _frame(prompt.box.reshape(2, 2), prompt.image_size).reshape(1, 4)).float()
    points = torch.from_numpy(_frame(prompt.points, prompt.image_size)).float()[None]
    labels = torch.from_numpy(prompt.labels).int()[None]
    mask = torch.from_numpy(feed["mask_input"]) if prompt.with_mask else None
    _, scores, low_res = predictor._predict(points, labels, box, mask, multimask_output=True,
                                            return_logits=True)
    return {"masks": low_res.numpy(), "iou_predictions": scores.numpy()}
