"""The torch modules that are exported, one per contract.

They reuse segment_anything's own modules and its ONNX helpers
(``segment_anything.utils.onnx.SamOnnxModel``); only what stops a graph from being
correct for every image size is rewritten.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.utils.onnx import SamOnnxModel

from .contracts import IMAGE_SIZE


class OfficialDecoder(SamOnnxModel):
    """The ``official`` contract: segment-anything's decoder, returning all four masks.

    segment-anything crops the upscaled masks with ``int(tensor)``, which the tracer
    records as a constant: the graph is then right only for the image size used while
    exporting.  Here the crop indexes with ``arange(size)``, which stays dynamic.
    """

    def __init__(self, sam) -> None:
        super().__init__(sam, return_single_mask=False)

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                              align_corners=False)
        prepadded = self.resize_longest_image_size(orig_im_size, IMAGE_SIZE)
        masks = masks.index_select(2, torch.arange(prepadded[0]))
        masks = masks.index_select(3, torch.arange(prepadded[1]))
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)


class LowResDecoder(SamOnnxModel):
    """The ``lowres`` contract: four inputs, low-res logits and scores; no upscaling.

    Without a ``has_mask_input`` the mask prompt is used when ``mask_input`` is not all zero.
    """

    def __init__(self, sam) -> None:
        super().__init__(sam, return_single_mask=False)

    @torch.no_grad()
    def forward(self, image_embeddings, point_coords, point_labels, mask_input):
        has_mask_input = (mask_input.abs().amax() > 0).to(torch.float32).reshape(1)
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return masks, scores


DECODERS = {"official": OfficialDecoder, "lowres": LowResDecoder}


def decoder_module(contract_name: str, sam) -> torch.nn.Module:
    return DECODERS[contract_name](sam).eval()
