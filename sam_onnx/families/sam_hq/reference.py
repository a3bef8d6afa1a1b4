"""PyTorch reference outputs for the exporter's HQ checks, through segment_anything_hq's own
image encoder, prompt encoder, HQ mask decoder and ``Sam.postprocess_masks`` (as its
SamPredictor runs them), not through the exported wrappers."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from ...core.contracts import GraphContract
from ..sam.contracts import DECODER_BATCHED, DECODER_OFFICIAL
from ..sam.reference import PROMPTS, Prompt, encoder_input, grid_prompts, random_embeddings
from ..sam.reference import decoder_feed as sam_feed
from .contracts import IMAGE_SIZE

__all__ = ["PROMPTS", "encoder_input", "encoder_reference", "random_encoder_outputs",
           "decoder_feed", "decoder_reference"]

Arrays = Dict[str, np.ndarray]
#: (multimask_output, hq_token_only) per check prompt: every branch of both switches is run.
FLAGS = {PROMPTS[0].name: (1.0, 0.0), PROMPTS[1].name: (0.0, 1.0)}
#: The automatic mask generator's switches (SamAutomaticMaskGenerator.generate's defaults).
BATCH_FLAGS = (1.0, 0.0)


@torch.inference_mode()
def encoder_reference(sam, feed: Arrays) -> Arrays:
    embeddings, interm = sam.image_encoder(torch.from_numpy(feed["image"]))
    return {"image_embeddings": embeddings.numpy(),
            "interm_embeddings": torch.stack(interm).numpy()}


def random_encoder_outputs(sam, seed: int = 0) -> Arrays:
    """Random embeddings and intermediate embeddings of the shapes this model's encoder
    returns (its decoder's fusion layer tells their width)."""
    vit_dim = sam.mask_decoder.compress_vit_feat[0].in_channels
    count = 1 if type(sam.image_encoder).__name__ == "TinyViT" else len(
        [b for b in sam.image_encoder.blocks if b.window_size == 0])
    rng = np.random.default_rng(seed + 1)
    return {"image_embeddings": random_embeddings(seed),
            "interm_embeddings": rng.standard_normal((count, 1, 64, 64, vit_dim), np.float32)}


def decoder_feed(contract: GraphContract, encoded: Arrays, prompt: Prompt) -> Arrays:
    """The feed HQ's SamPredictor-like wrapper builds for ``contract`` from ``prompt``."""
    batched = contract.name == "hq_batched"
    values = sam_feed(DECODER_BATCHED if batched else DECODER_OFFICIAL, encoded, prompt)
    multimask, hq_only = BATCH_FLAGS if batched else FLAGS[prompt.name]
    values.update(interm_embeddings=encoded["interm_embeddings"],
                  multimask_output=np.array([multimask], np.float32),
                  hq_token_only=np.array([hq_only], np.float32))
    return {name: values[name] for name in contract.input_names}


@torch.inference_mode()
def decoder_reference(sam, contract: GraphContract, encoded: Arrays, prompt: Prompt) -> Arrays:
    """What segment_anything_hq computes for ``prompt``, as its SamPredictor.predict_torch."""
    feed = decoder_feed(contract, encoded, prompt)
    transform = ResizeLongestSide(IMAGE_SIZE)
    interm = [torch.from_numpy(encoded["interm_embeddings"][0])]
    if contract.name == "hq_batched":
        points = (torch.from_numpy(a).float() for a in grid_prompts(prompt))
        box = mask = None
    else:
        coords = torch.from_numpy(transform.apply_coords(prompt.points, prompt.image_size))
        points = (coords.float()[None], torch.from_numpy(prompt.labels).float()[None])
        box = None if prompt.box is None else torch.from_numpy(
            transform.apply_boxes(prompt.box[None], prompt.image_size)).float()
        mask = torch.from_numpy(feed["mask_input"]) if prompt.with_mask else None
    sparse, dense = sam.prompt_encoder(points=tuple(points), boxes=box, masks=mask)
    low_res, iou = sam.mask_decoder(
        image_embeddings=torch.from_numpy(encoded["image_embeddings"]),
        image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=bool(feed["multimask_output"][0]),
        hq_token_only=bool(feed["hq_token_only"][0]), interm_embeddings=interm)
    values = {"low_res_masks": low_res, "iou_predictions": iou}
    if "masks" in contract.output_names:
        input_size = transform.get_preprocess_shape(*prompt.image_size, IMAGE_SIZE)
        values["masks"] = sam.postprocess_masks(low_res, input_size, prompt.image_size)
    return {name: values[name].numpy() for name in contract.output_names}
