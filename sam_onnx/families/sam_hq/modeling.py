"""HQ-SAM's PyTorch side: segment_anything_hq's builder and reference predictors, and the
modules exported for its contracts.

The decoders reuse sam-hq's ONNX helpers (``segment_anything_hq.utils.onnx.SamOnnxModel``:
point and mask embedding) and HQ's own modules and weights. Rewritten: the switches (graph
inputs instead of export-time flags); the crop to the image size, which stays dynamic as in
SAM's official decoder (``families.sam.modeling.upscale``); the HQ features, computed by the
encoder graph once an image (contracts.py); and ``MaskDecoderHQ.predict_masks``' arithmetic:
SAM's reassociated transformer (``families.sam.fast_decoder``, the HQ token riding along) and
the HQ mask's last convolution folded into the HQ token (``hq_masks``). Same result in far
fewer FLOPs; the figures are in docs/benchmarks.md.
"""
from __future__ import annotations

import warnings
from typing import Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():  # timm's deprecation and registry chatter on import
    warnings.simplefilter("ignore")
    from segment_anything_hq import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
    from segment_anything_hq.modeling import image_encoder
    from segment_anything_hq.utils.onnx import SamOnnxModel

from ...core.errors import CheckpointError
from ..sam.contracts import EMBEDDING_SIZE
from ..sam.fast_decoder import image_pe, layer_norm_2d, two_way_transformer
from ..sam.modeling import (
    EXPORT_CHUNK_ELEMENTS,
    REFERENCE_CHUNK_ELEMENTS,
    chunked_attention,
    upscale,
)
from . import reference
from .reference import hq_features

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
    """The image encoder, and the HQ features computed from what it returns once an image
    (the decoder's fusion layers ride in the encoder graph; see contracts.HQ_FEATURES)."""

    def __init__(self, sam) -> None:
        super().__init__()
        self.encoder, self.mask_decoder = sam.image_encoder, sam.mask_decoder

    def forward(self, image):
        embeddings, interm = self.encoder(image)
        return embeddings, hq_features(self.mask_decoder, embeddings, interm)


def encoder_module(sam) -> nn.Module:
    return _Encoder(sam).eval()


@torch.no_grad()
def predictor_encoded(predictor) -> Dict[str, np.ndarray]:
    """What HQ's SamPredictor holds after set_image, as the encoder graph returns it: the
    embedding, and the HQ features its decoder computes from it and the early features."""
    embedding = predictor.get_image_embedding()
    return {"image_embeddings": embedding.numpy(),
            "hq_features": hq_features(predictor.model.mask_decoder, embedding,
                                       predictor.interm_features).numpy()}


def reference_context():
    """A ViT encoder attends a head at a time (as SAM's: bounded memory, same arithmetic)."""
    return chunked_attention(REFERENCE_CHUNK_ELEMENTS, image_encoder)


def export_context():
    return chunked_attention(EXPORT_CHUNK_ELEMENTS, image_encoder)


def hq_masks(mask_decoder, keys: torch.Tensor, mask_tokens: torch.Tensor,
             features: torch.Tensor) -> torch.Tensor:
    """``MaskDecoderHQ.predict_masks``'s masks from the transformer's image tokens ``keys``
    (B, 4096, C) and the mask and HQ tokens (B, 5, C): (B, 5, 256, 256), SAM's four then HQ's.

    The HQ mask is ``h . (conv2(g) + features)`` for the HQ token's weights h (32): the last
    3x3 convolution (64 -> 32 channels at 256x256, 2.4 GFLOP a prompt) is folded into one
    output channel, ``(h W2) * g``, as nine (B, 9, 64) x (B, 64, 65536) products summed at
    their offsets (0.08 GFLOP)."""
    dec = mask_decoder
    # every size but the prompts' is a constant: the exporter writes a -1 for a size read
    # from a tensor, which ONNX Runtime cannot infer when no prompt passed (b = 0)
    b, s = keys.shape[0], EMBEDDING_SIZE
    deconv1, norm1, act1, deconv2, act2 = dec.output_upscaling
    up = act2(deconv2(act1(layer_norm_2d(norm1, deconv1(
        keys.transpose(1, 2).reshape(b, dec.transformer_dim, s, s))))))
    c, h, w = (int(d) for d in up.shape[1:])
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in
                         enumerate(dec.output_hypernetworks_mlps)], dim=1)  # (B, 4, c)
    sam_masks = (hyper @ up.reshape(b, c, h * w)).reshape(b, hyper.shape[1], h, w)
    conv1, norm, gelu, conv2 = dec.embedding_maskfeature
    g = gelu(layer_norm_2d(norm, conv1(up)))  # (B, d, h, w)
    d, (kh, kw) = conv2.in_channels, conv2.kernel_size
    hq = dec.hf_mlp(mask_tokens[:, -1])  # (B, c)
    kernel = (hq @ conv2.weight.reshape(c, -1)).reshape(b, d, kh * kw)
    shifted = F.pad((kernel.transpose(1, 2) @ g.reshape(b, d, h * w)).reshape(b, kh * kw, h, w),
                    (kw // 2, kw // 2, kh // 2, kh // 2))
    hq_mask = sum(shifted[:, i * kw + j, i:i + h, j:j + w] for i in range(kh) for j in range(kw))
    hq_mask = hq_mask + (hq @ (features.reshape(c, h * w) + conv2.bias.reshape(c, 1))
                         ).reshape(b, h, w)
    return torch.cat([sam_masks, hq_mask.unsqueeze(1)], dim=1)


class _HQDecoder(SamOnnxModel):
    """HQ's prompt encoder and mask decoder with the switches as tensors, through SAM's
    reassociated transformer (``fast_decoder``) and ``hq_masks``."""

    def __init__(self, sam) -> None:
        super().__init__(sam)
        self.register_buffer("image_pe", image_pe(sam))

    def _transformer(self, image, sparse, shared_first=False):
        """The IoU, mask and HQ tokens after the transformer, the image tokens, and HQ's
        scores: (B, 6, C), (B, 4096, C), (B, 4)."""
        decoder = self.model.mask_decoder
        out, keys = two_way_transformer(decoder, image, self.image_pe, sparse, shared_first)
        return out, keys, decoder.iou_prediction_head(out[:, 0])


def _pick(scores: torch.Tensor, multimask_output: torch.Tensor):
    """Which of SAM's masks MaskDecoderHQ.forward returns, and its score: the best-scored
    of the three multimask outputs, or the single-mask token's. (B,) and (B, 1)."""
    best, index = torch.max(scores[:, 1:4], dim=1)
    multi = multimask_output.reshape(1) > 0.5
    return (torch.where(multi, index + 1, torch.zeros_like(index)),
            torch.where(multi, best, scores[:, 0]).unsqueeze(1))


def _select(masks: torch.Tensor, index: torch.Tensor, hq_token_only: torch.Tensor):
    """(B, 1, 256, 256): SAM's picked mask plus the HQ mask, or the HQ mask alone."""
    gather = index.reshape(-1, 1, 1, 1).expand(-1, 1, *masks.shape[2:])
    hq_mask = masks[:, -1:]
    return torch.where(hq_token_only.reshape(1, 1, 1, 1) > 0.5, hq_mask,
                       masks.gather(1, gather) + hq_mask)


class HQOfficialDecoder(_HQDecoder):
    """The ``hq_official`` contract: one prompt, masks at the original size."""

    @torch.no_grad()
    def forward(self, image_embeddings, hq_features, point_coords, point_labels,
                mask_input, has_mask_input, orig_im_size, multimask_output, hq_token_only):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        out, keys, scores = self._transformer(image_embeddings + dense, sparse)
        masks = hq_masks(self.model.mask_decoder, keys, out[:, 1:], hq_features)
        index, score = _pick(scores, multimask_output)
        low_res = _select(masks, index, hq_token_only)
        return upscale(low_res, orig_im_size), score, low_res


class HQBatchedDecoder(_HQDecoder):
    """The ``hq_batched`` contract: many point prompts, no mask prompt, low-res logits for
    the prompts whose chosen score passes ``pred_iou_thresh`` (the automatic mask generator
    drops the others unseen; the scores cost a fraction of the masks)."""

    @torch.no_grad()
    def forward(self, image_embeddings, hq_features, point_coords, point_labels,
                multimask_output, hq_token_only, pred_iou_thresh):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        out, keys, scores = self._transformer(image_embeddings + dense, sparse,
                                              shared_first=True)
        index, score = _pick(scores, multimask_output)
        # "not at or below" rather than "above": a NaN score keeps its prompt
        kept = torch.nonzero(~(score <= pred_iou_thresh).reshape(-1)).reshape(-1)
        masks = hq_masks(self.model.mask_decoder, keys.index_select(0, kept),
                         out.index_select(0, kept)[:, 1:], hq_features)
        return _select(masks, index.index_select(0, kept), hq_token_only), score, kept


DECODERS = {"hq_official": HQOfficialDecoder, "hq_batched": HQBatchedDecoder}


def decoder_module(contract_name: str, sam) -> nn.Module:
    return DECODERS[contract_name](sam).eval()
