"""HQ-SAM's PyTorch side: segment_anything_hq's builder and reference predictors, and the
modules exported for its contracts.

The decoders reuse sam-hq's ONNX helpers (``segment_anything_hq.utils.onnx.SamOnnxModel``:
point and mask embedding) and HQ's own ``MaskDecoderHQ.predict_masks``; rewritten are the
switches (graph inputs instead of export-time flags) and the crop to the image size, which
stays dynamic as in SAM's official decoder (``families.sam.modeling.upscale``).
"""
from __future__ import annotations

import warnings
from typing import Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn

with warnings.catch_warnings():  # timm's deprecation and registry chatter on import
    warnings.simplefilter("ignore")
    from segment_anything_hq import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
    from segment_anything_hq.modeling import image_encoder
    from segment_anything_hq.utils.onnx import SamOnnxModel

from ...core.errors import CheckpointError
from ..sam.modeling import (
    EXPORT_CHUNK_ELEMENTS,
    REFERENCE_CHUNK_ELEMENTS,
    chunked_attention,
    upscale,
)
from . import reference

__all__ = ["build", "encoder_module", "decoder_module", "reference_context", "export_context",
           "reference", "SamPredictor", "SamAutomaticMaskGenerator", "predictor_encoded"]

#: Our model names -> segment_anything_hq's registry names.
_REGISTRY = {"hq_vit_b": "vit_b", "hq_vit_l": "vit_l", "hq_vit_h": "vit_h",
             "hq_vit_tiny": "vit_tiny"}


def build(model_type: str, state: Optional[Mapping] = None, seed: int = 0):
    """HQ-SAM through segment_anything_hq's builder; seeded random weights when ``state`` is
    None. Every tensor of the model must be in the checkpoint (sam-hq's builder loads with
    strict=False and prints what is missing; here a missing tensor is an error)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam = sam_model_registry[_REGISTRY[model_type]](checkpoint=None)
    if state is not None:
        missing, _ = sam.load_state_dict(state, strict=False)
        if missing:
            raise CheckpointError(f"the checkpoint does not fit {model_type}: it lacks "
                                  f"{len(missing)} tensor(s), e.g. {missing[0]}")
    return sam.eval()


class _Encoder(nn.Module):
    """The image encoder with its intermediate embeddings stacked into one output."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image):
        embeddings, interm = self.encoder(image)
        return embeddings, torch.stack(interm)


def encoder_module(sam) -> nn.Module:
    return _Encoder(sam.image_encoder).eval()


def predictor_encoded(predictor) -> Dict[str, np.ndarray]:
    """What HQ's SamPredictor holds after set_image: the embedding and the intermediate ones."""
    return {"image_embeddings": predictor.get_image_embedding().numpy(),
            "interm_embeddings": torch.stack(predictor.interm_features).numpy()}


def reference_context():
    """A ViT encoder attends a head at a time (as SAM's: bounded memory, same arithmetic)."""
    return chunked_attention(REFERENCE_CHUNK_ELEMENTS, image_encoder)


def export_context():
    return chunked_attention(EXPORT_CHUNK_ELEMENTS, image_encoder)


class _HQDecoder(SamOnnxModel):
    """HQ's prompt encoder and mask decoder with the switches as tensors."""

    def _masks(self, image_embeddings, interm_embeddings, sparse, dense, multimask_output,
               hq_token_only):
        """(B, 1, 256, 256) logits and (B, 1) scores, as MaskDecoderHQ.forward selects them."""
        decoder = self.model.mask_decoder
        vit_features = interm_embeddings[0].permute(0, 3, 1, 2)
        hq_features = decoder.embedding_encoder(image_embeddings) + \
            decoder.compress_vit_feat(vit_features)
        masks, scores = decoder.predict_masks(
            image_embeddings=image_embeddings, image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            hq_features=hq_features)
        best, index = torch.max(scores[:, 1:4], dim=1)
        gather = (index + 1).reshape(-1, 1, 1, 1).expand(-1, 1, *masks.shape[2:])
        multi = multimask_output.reshape(1, 1) > 0.5
        sam_mask = torch.where(multi.reshape(1, 1, 1, 1), masks.gather(1, gather), masks[:, :1])
        score = torch.where(multi, best.unsqueeze(1), scores[:, :1])
        hq_mask = masks[:, -1:]
        hq_only = hq_token_only.reshape(1, 1, 1, 1) > 0.5
        return torch.where(hq_only, hq_mask, sam_mask + hq_mask), score


class HQOfficialDecoder(_HQDecoder):
    """The ``hq_official`` contract: one prompt, masks at the original size."""

    @torch.no_grad()
    def forward(self, image_embeddings, interm_embeddings, point_coords, point_labels,
                mask_input, has_mask_input, orig_im_size, multimask_output, hq_token_only):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        low_res, score = self._masks(image_embeddings, interm_embeddings, sparse, dense,
                                     multimask_output, hq_token_only)
        return upscale(low_res, orig_im_size), score, low_res


class HQBatchedDecoder(_HQDecoder):
    """The ``hq_batched`` contract: many point prompts, no mask prompt, low-res logits."""

    @torch.no_grad()
    def forward(self, image_embeddings, interm_embeddings, point_coords, point_labels,
                multimask_output, hq_token_only):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self._masks(image_embeddings, interm_embeddings, sparse, dense,
                           multimask_output, hq_token_only)


DECODERS = {"hq_official": HQOfficialDecoder, "hq_batched": HQBatchedDecoder}


def decoder_module(contract_name: str, sam) -> nn.Module:
    return DECODERS[contract_name](sam).eval()
