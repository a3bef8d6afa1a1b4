"""SAM v1's PyTorch side: its builders, the modules that are exported (one per contract), the
export-time patch of the encoder's attention, and the reference predictors check compares with.

The wrappers reuse segment_anything's own modules and its ONNX helpers
(``segment_anything.utils.onnx.SamOnnxModel``); rewritten are what stops a graph from being
correct for every image size, and the mask decoder's arithmetic (``fast_decoder``: the same
result in far fewer FLOPs).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import image_encoder
from segment_anything.utils.onnx import SamOnnxModel

from ..base import load_strict
from . import MODEL_SPECS, reference
from .contracts import IMAGE_SIZE
from .fast_decoder import BatchedDecoder, image_pe, predict_masks

#: What every family's PyTorch side provides (the exporter, check and bench use only these).
__all__ = ["build", "encoder_module", "decoder_module", "reference_context", "export_context",
           "reference", "SamPredictor", "SamAutomaticMaskGenerator", "predictor_encoded"]

#: Attention scores held at once, in fp32 elements: one vit_h head (64 MB) in PyTorch, which
#: runs a chunk at a time; four heads (256 MB) in the exported graph, where ONNX Runtime may
#: hold several chunks at once anyway and one-head chunks made vit_h's export 1.5x slower.
REFERENCE_CHUNK_ELEMENTS = 1 << 24
EXPORT_CHUNK_ELEMENTS = 1 << 26


def build(model_type: str, state: Optional[Mapping] = None, seed: int = 0):
    """SAM through segment_anything's builders; seeded random weights when ``state`` is None,
    else the state_dict's own tensors (no random initialisation first)."""
    if state is None:
        torch.manual_seed(seed)
        sam = _build(model_type)
    else:
        with torch.device("meta"):  # no random init: the checkpoint's tensors are assigned
            sam = _build(model_type)
        load_strict(sam, state, model_type, assign=True)
    return sam.eval()


def _build(model_type: str):
    if model_type in sam_model_registry:
        return sam_model_registry[model_type](checkpoint=None)
    spec = MODEL_SPECS[model_type]
    return _build_sam(encoder_embed_dim=spec.embed_dim, encoder_depth=spec.depth,
                      encoder_num_heads=spec.num_heads,
                      encoder_global_attn_indexes=list(spec.global_attn_indexes))


def encoder_module(sam) -> torch.nn.Module:
    return sam.image_encoder


def predictor_encoded(predictor) -> Dict[str, np.ndarray]:
    """What a SamPredictor holds after set_image, by the encoder contract's output names."""
    return {"image_embeddings": predictor.get_image_embedding().numpy()}


def _chunked_attention_forward(self, x: torch.Tensor, chunk_elements: int,
                               add_decomposed_rel_pos) -> torch.Tensor:
    """segment_anything's ``Attention.forward`` computed a few heads at a time.

    The global-attention blocks hold (heads x 4096 x 4096) scores two or three times over
    (4 GB for vit_h); per head the arithmetic is the same, so bounding how many heads are
    in flight bounds memory in PyTorch and, once exported, in ONNX Runtime (measured on
    vit_b: ONNX Runtime peaks at 1.95 GiB instead of 3.49).
    """
    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
    step = max(1, chunk_elements // (H * W) ** 2)
    outs = []
    for i in range(0, B * self.num_heads, step):
        qi, ki, vi = q[i:i + step], k[i:i + step], v[i:i + step]
        attn = (qi * self.scale) @ ki.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(
                attn, qi, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        outs.append(attn.softmax(dim=-1) @ vi)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    x = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(x)


def reference_context():
    """Around the PyTorch reference runs: the encoder's attention a head at a time."""
    return chunked_attention(REFERENCE_CHUNK_ELEMENTS)


def export_context():
    """Around the encoder's export: four heads at a time in the graph."""
    return chunked_attention(EXPORT_CHUNK_ELEMENTS)


@contextlib.contextmanager
def chunked_attention(chunk_elements: int, module=image_encoder):
    """Within this block the ViT image encoder of ``module`` (segment_anything's, or a copy of
    it such as HQ-SAM's) attends a few heads at a time (see above)."""
    original = module.Attention.forward
    module.Attention.forward = (
        lambda self, x: _chunked_attention_forward(self, x, chunk_elements,
                                                   module.add_decomposed_rel_pos))
    try:
        yield
    finally:
        module.Attention.forward = original


class _FastSamOnnxModel(SamOnnxModel):
    """SamOnnxModel whose mask decoder runs through ``fast_decoder.predict_masks``."""

    def __init__(self, sam) -> None:
        super().__init__(sam, return_single_mask=False)
        self.register_buffer("image_pe", image_pe(sam))

    def _predict(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        dense = self._embed_masks(mask_input, has_mask_input)
        return predict_masks(self.mask_decoder, image_embeddings + dense, self.image_pe,
                             self._embed_points(point_coords, point_labels))


class OfficialDecoder(_FastSamOnnxModel):
    """The ``official`` contract: segment-anything's decoder, returning all four masks.

    segment-anything crops the upscaled masks with ``int(tensor)``, which the tracer
    records as a constant: the graph is then right only for the image size used while
    exporting.  Here the crop indexes with ``arange(size)``, which stays dynamic.
    """

    @torch.no_grad()
    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input,
                orig_im_size):
        masks, scores = self._predict(image_embeddings, point_coords, point_labels, mask_input,
                                      has_mask_input)
        return self.mask_postprocessing(masks, orig_im_size), scores, masks

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        return upscale(masks, orig_im_size)


class OfficialSingleDecoder(OfficialDecoder):
    """The ``official_single`` contract: segment-anything's decoder with
    ``return_single_mask=True``, its own ``select_masks`` choosing the mask before it is
    upscaled (one mask upscaled, not four)."""

    def __init__(self, sam) -> None:
        super().__init__(sam)
        self.return_single_mask = True

    @torch.no_grad()
    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input,
                orig_im_size):
        masks, scores = self._predict(image_embeddings, point_coords, point_labels, mask_input,
                                      has_mask_input)
        masks, scores = self.select_masks(masks, scores, point_coords.shape[1])
        return self.mask_postprocessing(masks, orig_im_size), scores, masks


def upscale(masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
    """Low-res logits to the original image size, for every image size (see OfficialDecoder)."""
    masks = F.interpolate(masks, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                          align_corners=False)
    prepadded = SamOnnxModel.resize_longest_image_size(orig_im_size, IMAGE_SIZE)
    masks = masks.index_select(2, torch.arange(prepadded[0]))
    masks = masks.index_select(3, torch.arange(prepadded[1]))
    size = orig_im_size.to(torch.int64)
    return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)


class LowResDecoder(_FastSamOnnxModel):
    """The ``lowres`` contract: four inputs, low-res logits and scores; no upscaling.

    Without a ``has_mask_input`` the mask prompt is used when ``mask_input`` is not all zero.
    """

    @torch.no_grad()
    def forward(self, image_embeddings, point_coords, point_labels, mask_input):
        has_mask_input = (mask_input.abs().amax() > 0).to(torch.float32).reshape(1)
        return self._predict(image_embeddings, point_coords, point_labels, mask_input,
                             has_mask_input)


DECODERS = {"official": OfficialDecoder, "official_single": OfficialSingleDecoder,
            "lowres": LowResDecoder, "batched": BatchedDecoder}


def decoder_module(contract_name: str, sam) -> torch.nn.Module:
    return DECODERS[contract_name](sam).eval()
