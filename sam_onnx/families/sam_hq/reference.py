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


def hq_features(mask_decoder, image_embeddings: torch.Tensor, interm_embeddings) -> torch.Tensor:
    """HQ-SAM's image-level HQ features, as the first line of ``MaskDecoderHQ.forward``
    computes them: the embedding and the ViT's early features, each lifted to 256x256 by the
    decoder's transposed convolutions, summed: (1, 32, 256, 256). Nothing in them depends on
    the prompt, yet segment_anything_hq computes them on every call (hq_vit_b: ~8.3 GFLOP);
    sam-onnx's encoder graph returns them once an image."""
    vit_features = interm_embeddings[0].permute(0, 3, 1, 2)
    return mask_decoder.embedding_encoder(image_embeddings) + \
        mask_decoder.compress_vit_feat(vit_features)


@torch.inference_mode()
def encoder_reference(sam, feed: Arrays) -> Arrays:
    embeddings, interm = sam.image_encoder(torch.from_numpy(feed["image"]))
    return {"image_embeddings": embeddings.numpy(),
            "hq_features": hq_features(sam.mask_decoder, embeddings, interm).numpy()}


@torch.inference_mode()
def random_encoder_outputs(sam, seed: int = 0) -> Arrays:
    """A random embedding and the HQ features made from it and random intermediate
    embeddings of the shapes this model's encoder returns (its decoder's fusion layer tells
    their width)."""
    vit_dim = sam.mask_decoder.compress_vit_feat[0].in_channels
    rng = np.random.default_rng(seed + 1)
    interm = torch.from_numpy(rng.standard_normal((1, 1, 64, 64, vit_dim), np.float32))
    embeddings = random_embeddings(seed)
    return {"image_embeddings": embeddings,
            "hq_features": hq_features(sam.mask_decoder, torch.from_numpy(embeddings),
                                       interm).numpy()}


def decoder_feed(contract: GraphContract, encoded: Arrays, prompt: Prompt) -> Arrays:
    """The feed HQ's SamPredictor-like wrapper builds for ``contract`` from ``prompt``."""
    batched = contract.name == "hq_batched"
    values = sam_feed(DECODER_BATCHED if batched else DECODER_OFFICIAL, encoded, prompt)
    multimask, hq_only = BATCH_FLAGS if batched else FLAGS[prompt.name]
    values.update(hq_features=encoded["hq_features"],
                  multimask_output=np.array([multimask], np.float32),
                  hq_token_only=np.array([hq_only], np.float32))
    return {name: values[name] for name in contract.input_names}


@torch.inference_mode()
def decoder_reference(sam, contract: GraphContract, encoded: Arrays, prompt: Prompt) -> Arrays:
    """What segment_anything_hq computes for ``prompt``, as its SamPredictor.predict_torch:
    its prompt encoder, its ``MaskDecoderHQ.predict_masks`` on the HQ features, and the
    selection ``MaskDecoderHQ.forward`` makes after it."""
    feed = decoder_feed(contract, encoded, prompt)
    transform = ResizeLongestSide(IMAGE_SIZE)
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
    masks, iou = sam.mask_decoder.predict_masks(
        image_embeddings=torch.from_numpy(encoded["image_embeddings"]),
        image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, hq_features=torch.from_numpy(encoded["hq_features"]))
    low_res, iou = _forward_selection(masks, iou, bool(feed["multimask_output"][0]),
                                      bool(feed["hq_token_only"][0]))
    values = {"low_res_masks": low_res, "iou_predictions": iou,
              "kept_prompts": torch.arange(len(iou))}
    if "masks" in contract.output_names:
        input_size = transform.get_preprocess_shape(*prompt.image_size, IMAGE_SIZE)
        values["masks"] = sam.postprocess_masks(low_res, input_size, prompt.image_size)
    return {name: values[name].numpy() for name in contract.output_names}


def _forward_selection(masks: torch.Tensor, iou: torch.Tensor, multimask_output: bool,
                       hq_token_only: bool):
    """segment_anything_hq's ``MaskDecoderHQ.forward`` after ``predict_masks``, as written
    there: the best of SAM's three multimask outputs (or its single-mask output), plus the
    HQ token's mask, or that mask alone."""
    num_mask_tokens = masks.shape[1]
    if multimask_output:
        mask_slice = slice(1, num_mask_tokens - 1)
        iou, best = torch.max(iou[:, mask_slice], dim=1)
        iou = iou.unsqueeze(1)
        masks_multi = masks[:, mask_slice]
        masks_sam = masks_multi[torch.arange(masks_multi.size(0)), best].unsqueeze(1)
    else:
        iou = iou[:, :1]
        masks_sam = masks[:, :1]
    masks_hq = masks[:, num_mask_tokens - 1:]
    return (masks_hq if hq_token_only else masks_sam + masks_hq), iou
