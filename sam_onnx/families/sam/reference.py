"""PyTorch reference outputs for the exporter's checks, computed the way SamPredictor does.

Decoder references go through segment_anything's own prompt encoder, mask decoder and
``Sam.postprocess_masks``, not through the exported wrapper, so a wrapper bug shows up
as a parity failure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from segment_anything.utils.onnx import SamOnnxModel
from segment_anything.utils.transforms import ResizeLongestSide

from ...core.contracts import EVERY_PROMPT, GraphContract
from .contracts import EMBEDDING_DIM, EMBEDDING_SIZE, IMAGE_SIZE, MASK_INPUT_SIZE

Arrays = Dict[str, np.ndarray]


@dataclass(frozen=True)
class Prompt:
    """One decoder check: prompts in original-image pixels, and that image's (h, w)."""

    name: str
    image_size: Tuple[int, int]
    points: np.ndarray  # (N, 2) x, y
    labels: np.ndarray  # (N,)
    box: Optional[np.ndarray] = None  # (4,) x0, y0, x1, y1
    with_mask: bool = False


#: Two image sizes and aspect ratios, so a graph that bakes in one size fails the other.
PROMPTS = (
    Prompt("points+mask@534x800", (534, 800), np.array([[400.0, 260.0], [120.0, 90.0]]),
           np.array([1.0, 0.0]), with_mask=True),
    Prompt("box+point@1200x1800", (1200, 1800), np.array([[900.0, 600.0]]), np.array([1.0]),
           box=np.array([500.0, 300.0, 1400.0, 1000.0])),
)


def encoder_input(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)}


@torch.inference_mode()
def encoder_reference(sam, feed: Arrays) -> Arrays:
    return {"image_embeddings": sam.image_encoder(torch.from_numpy(feed["image"])).numpy()}


def random_embeddings(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (1, EMBEDDING_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE)
    return rng.standard_normal(shape, dtype=np.float32)


def random_encoder_outputs(sam, seed: int = 0) -> Arrays:
    """What the decoders take from the encoder, random: for a decoder exported alone."""
    return {"image_embeddings": random_embeddings(seed)}


def grid_points(prompt: Prompt, per_side: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """A batched decoder's check: each of the prompt's points and a grid over its image, in
    its pixels: (B, 2) points and (B,) labels, one prompt each."""
    h, w = prompt.image_size
    offsets = (np.arange(per_side) + 0.5) / per_side
    grid = np.stack(np.meshgrid(offsets * w, offsets * h), -1).reshape(-1, 2)
    return (np.concatenate([prompt.points, grid]),
            np.concatenate([prompt.labels, np.ones(len(grid))]))


def grid_prompts(prompt: Prompt, per_side: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """``grid_points`` in SAM's 1024 frame, as the automatic mask generator sends them:
    (B, 1, 2) and (B, 1)."""
    points, labels = grid_points(prompt, per_side)
    coords = ResizeLongestSide(IMAGE_SIZE).apply_coords(points, prompt.image_size)
    return coords[:, None, :], labels[:, None]


def decoder_feed(contract: GraphContract, encoded: Arrays, prompt: Prompt) -> Arrays:
    """The feed a SamPredictor-like wrapper builds for ``contract`` from ``prompt`` and the
    encoder's outputs ``encoded``."""
    embeddings = encoded["image_embeddings"]
    transform = ResizeLongestSide(IMAGE_SIZE)
    if contract.name == "batched":
        coords, labels = grid_prompts(prompt)
        pad = np.zeros_like(coords)
        return {"image_embeddings": embeddings,
                "point_coords": np.concatenate([coords, pad], 1).astype(np.float32),
                "point_labels": np.concatenate([labels, -np.ones_like(labels)], 1)
                .astype(np.float32),
                "pred_iou_thresh": np.array([EVERY_PROMPT], np.float32)}
    coords = transform.apply_coords(prompt.points, prompt.image_size)
    labels = prompt.labels
    if prompt.box is not None:
        corners = transform.apply_boxes(prompt.box[None], prompt.image_size).reshape(2, 2)
        coords, labels = np.concatenate([coords, corners]), np.concatenate([labels, [2.0, 3.0]])
    else:
        coords, labels = np.concatenate([coords, [[0.0, 0.0]]]), np.concatenate([labels, [-1.0]])
    mask = np.zeros((1, 1, MASK_INPUT_SIZE, MASK_INPUT_SIZE), np.float32)
    if prompt.with_mask:
        mask[...] = np.random.default_rng(1).standard_normal(mask.shape)
    values = {
        "image_embeddings": embeddings,
        "point_coords": coords[None].astype(np.float32),
        "point_labels": labels[None].astype(np.float32),
        "mask_input": mask,
        "has_mask_input": np.array([float(prompt.with_mask)], np.float32),
        "orig_im_size": np.array(prompt.image_size, np.float32),
    }
    return {name: values[name] for name in contract.input_names}


@torch.inference_mode()
def decoder_reference(sam, contract: GraphContract, encoded: Arrays, prompt: Prompt) -> Arrays:
    """What segment_anything computes for ``prompt``: all four masks, logits and scores."""
    embeddings = encoded["image_embeddings"]
    transform = ResizeLongestSide(IMAGE_SIZE)
    if contract.name == "batched":  # as SamPredictor.predict_torch, which adds the padding
        coords, labels = (torch.from_numpy(a).float() for a in grid_prompts(prompt))
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low_res, iou = sam.mask_decoder.predict_masks(
            image_embeddings=torch.from_numpy(embeddings),
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        return {"low_res_masks": low_res.numpy(), "iou_predictions": iou.numpy(),
                "kept_prompts": np.arange(len(iou), dtype=np.int64)}
    coords = torch.from_numpy(transform.apply_coords(prompt.points, prompt.image_size)).float()
    labels = torch.from_numpy(prompt.labels).float()
    box = None
    if prompt.box is not None:
        box = torch.from_numpy(transform.apply_boxes(prompt.box[None], prompt.image_size)).float()
    mask = None
    if prompt.with_mask:
        mask = torch.from_numpy(decoder_feed(contract, encoded, prompt)["mask_input"])
    sparse, dense = sam.prompt_encoder(points=(coords[None], labels[None]), boxes=box, masks=mask)
    low_res, iou = sam.mask_decoder.predict_masks(
        image_embeddings=torch.from_numpy(embeddings),
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
    )
    if contract.selects:  # segment-anything's own select_masks picks the one mask
        num_points = decoder_feed(contract, encoded, prompt)["point_coords"].shape[1]
        low_res, iou = SamOnnxModel(sam, return_single_mask=True).select_masks(
            low_res, iou, num_points)
    input_size = transform.get_preprocess_shape(*prompt.image_size, IMAGE_SIZE)
    masks = sam.postprocess_masks(low_res, input_size, prompt.image_size)
    values = {"masks": masks, "iou_predictions": iou, "low_res_masks": low_res}
    return {name: values[name].numpy() for name in contract.output_names}
