"""SAM 2's PyTorch side: sam2's builder and reference predictors, and the modules exported for
its contracts.

The encoder runs sam2's own ``forward_image`` and ``_prepare_backbone_features`` and adds the
no-memory embedding, as SAM2ImagePredictor.set_image; the decoders run sam2's own prompt
encoder (``_embed_points``) and its mask decoder's weights through SAM's reassociated
``fast_decoder`` (SAM 2's transformer is SAM's; its object-score token and high-resolution
maps are handled there): one prompt 24.1 -> 12 ms on this machine, measured. The mask prompt
is chosen by ``has_mask_input`` rather than by a Python ``if``, and the image is shared by
every prompt of a run, so that prompts batch along the first axis.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor
from torch import nn

from ..base import load_strict
from ..sam.fast_decoder import layer_norm_2d, pixel_order, two_way_transformer
from . import config, reference
from .blocks import TOKENS
from .contracts import POSTPROCESS

__all__ = ["build", "encoder_module", "decoder_module", "reference_context", "export_context",
           "reference", "SamPredictor", "SamAutomaticMaskGenerator", "predictor_encoded"]


class SamPredictor(SAM2ImagePredictor):
    """SAM2ImagePredictor, made without its torch.jit.script deprecation warning."""

    def __init__(self, sam_model, **kwargs) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(sam_model, **kwargs)


class SamAutomaticMaskGenerator(SAM2AutomaticMaskGenerator):
    """SAM2AutomaticMaskGenerator, made without that warning either."""

    def __init__(self, model, **kwargs) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(model, **kwargs)


def build(model_type: str, state: Optional[Mapping] = None, seed: int = 0):
    """SAM 2 through sam2's build_sam2 (with its image post-processing settings); seeded
    random weights when ``state`` is None, else the state_dict's tensors, every one of them."""
    torch.manual_seed(seed)
    model = build_sam2(config(model_type), None, device="cpu")
    return model.eval() if state is None else load_strict(model, state, model_type)


class _Encoder(nn.Module):
    """The image embedding and the high-resolution maps, as SAM2ImagePredictor.set_image."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, image):
        backbone_out = self.model.forward_image(image)
        _, feats, _, sizes = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + self.model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(1, -1, h, w) for f, (h, w) in zip(feats, sizes)]
        return maps[0], maps[1], maps[2]


def encoder_module(model) -> nn.Module:
    return _Encoder(model).eval()


def predictor_encoded(predictor) -> Dict[str, np.ndarray]:
    """What SAM2ImagePredictor holds after set_image, by the encoder contract's names."""
    feats = predictor._features
    return {"high_res_feats_0": feats["high_res_feats"][0].numpy(),
            "high_res_feats_1": feats["high_res_feats"][1].numpy(),
            "image_embed": feats["image_embed"].numpy()}


def reference_context():
    return contextlib.nullcontext()


def export_context():
    return contextlib.nullcontext()


class _Decoder(nn.Module):
    """sam2's prompt encoder and mask decoder on samexporter's seven inputs."""

    def __init__(self, model) -> None:
        super().__init__()
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder
        # the dense positional encoding as (1, 4096, C) tokens, stored once in the graph
        dense_pe = model.sam_prompt_encoder.get_dense_pe().detach()
        self.embedding_hw = tuple(dense_pe.shape[2:])
        self.register_buffer("image_pe", dense_pe.flatten(2).transpose(1, 2).contiguous())

    def _tokens(self, image_embed, point_coords, point_labels, mask_input, has_mask_input,
                shared_first: bool = False):
        """The output tokens (N, 5, C) and image tokens (N, 4096, C) after the transformer for
        N prompts; the padding point is appended here, as sam2's prompt encoder and
        samexporter's graph do. ``shared_first``: as fast_decoder's."""
        sparse = self.prompt_encoder._embed_points(point_coords, point_labels, pad=True)
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask * self.prompt_encoder.mask_downscaling(mask_input) + \
            (1 - has_mask) * no_mask
        return two_way_transformer(self.mask_decoder, image_embed + dense, self.image_pe,
                                   sparse, shared_first)

    def _hypernetworks(self, out):
        """The mask tokens' (N, 4, 32) weights for the upscaled channels."""
        return torch.stack([mlp(out[:, 1 + i]) for i, mlp in
                            enumerate(self.mask_decoder.output_hypernetworks_mlps)], dim=1)

    def _masks(self, out, keys, high_res_feats_0, high_res_feats_1):
        """All four tokens' (N, 4, 256, 256) logits, the upscaler as sam2's, in pixel order,
        for samexporter's pixel-order maps: bringing them into block order in the graph took
        10 ms a run (``_block_masks`` takes them permuted once an image), and ConvTranspose as
        products and a pixel shuffle (DepthToSpace) 1.5 ms more than ConvTranspose
        (measured, one prompt)."""
        dec = self.mask_decoder
        dc1, ln1, act1, dc2, act2 = dec.output_upscaling
        # sizes but the prompts' as constants: a Reshape's -1 cannot be inferred for an empty
        # batch (no prompt passed the batched decoder's threshold)
        b, (h, w), c = keys.shape[0], self.embedding_hw, int(keys.shape[2])
        src = keys.transpose(1, 2).reshape(b, c, h, w)
        x = act1(layer_norm_2d(ln1, dc1(src) + high_res_feats_1))
        x = act2(dc2(x) + high_res_feats_0)
        hyper = self._hypernetworks(out)
        masks = hyper @ x.reshape(b, dc2.out_channels, 16 * h * w)
        return masks.reshape(b, hyper.shape[1], 4 * h, 4 * w)

    def _block_masks(self, out, keys, high_res_blocks_0, high_res_blocks_1):
        """The same logits from the maps in block order (``blocks.to_blocks``): each
        transposed convolution one product on channels-last tokens, the maps added in that
        order, the layer norm over a last axis, and only the four masks put in pixel order
        (fast_decoder's upscaler): the decoder alone 16.3 / 23.3 instead of 20.1 / 25.3 ms a prompt
        in two side-by-side runs (sam2.1 tiny, 2 threads)."""
        dc1, ln1, act1, dc2, act2 = self.mask_decoder.output_upscaling
        b, n, c1, c2 = keys.shape[0], TOKENS * TOKENS, dc1.out_channels, dc2.out_channels
        w1 = dc1.weight.permute(0, 2, 3, 1).reshape(dc1.in_channels, -1)  # (C, 2*2*c1)
        # each bias added to its map, not to every prompt's product
        x = (keys @ w1).reshape(b, n, 4, c1) + (high_res_blocks_1 + dc1.bias)
        x = act1(F.layer_norm(x, (c1,), ln1.weight, ln1.bias, ln1.eps))
        w2 = dc2.weight.permute(0, 2, 3, 1).reshape(c1, -1)  # (c1, 2*2*c2)
        x = act2((x @ w2).reshape(b, n, 16, c2) + (high_res_blocks_0 + dc2.bias))
        return pixel_order(self._hypernetworks(out) @ x.reshape(b, n * 16, c2).transpose(1, 2))


class OfficialDecoder(_Decoder):
    """The ``sam2_official`` contract: the three multimask outputs, clipped as samexporter's."""

    @torch.no_grad()
    def forward(self, image_embed, high_res_feats_0, high_res_feats_1, point_coords,
                point_labels, mask_input, has_mask_input):
        out, keys = self._tokens(image_embed, point_coords, point_labels, mask_input,
                                 has_mask_input)
        masks = self._masks(out, keys, high_res_feats_0, high_res_feats_1)
        clamp = POSTPROCESS.low_res_clamp
        scores = self.mask_decoder.iou_prediction_head(out[:, 0])
        return torch.clamp(masks[:, 1:], -clamp, clamp), scores[:, 1:]


class BatchedDecoder(_Decoder):
    """The ``sam2_batched`` contract: every token's score for every prompt, and every
    token's unclipped logits for the prompts with a score above ``pred_iou_thresh``, as SAM's
    batched decoder: the automatic mask generator drops the others unseen. sam2.1 tiny, 16
    prompts a run: 7.8 ms a prompt for the scores, 16-18 with the masks (measured).

    The first layer's image tokens are projected as they are (SAM's ``shared_first``) and
    each upscaler bias is added to its high-resolution map: those depend on the image alone,
    so the predictor computes them once an image (``passes.split_at_inputs``). One prompt,
    sam2.1 tiny, 7 alternating rounds: 23.2 ms against 28.0 for the reassociated first layer
    (which needs no such split: 30.3 ms run whole, as a mask prompt runs it)."""

    @torch.no_grad()
    def forward(self, image_embed, high_res_blocks_0, high_res_blocks_1, point_coords,
                point_labels, mask_input, has_mask_input, pred_iou_thresh):
        out, keys = self._tokens(image_embed, point_coords, point_labels, mask_input,
                                 has_mask_input, shared_first=True)
        scores = self.mask_decoder.iou_prediction_head(out[:, 0])
        # "not all at or below" rather than "any above": a NaN score keeps its prompt
        kept = torch.nonzero(~(scores <= pred_iou_thresh).all(dim=1)).reshape(-1)
        masks = self._block_masks(out.index_select(0, kept), keys.index_select(0, kept),
                                  high_res_blocks_0, high_res_blocks_1)
        return masks, scores, kept


DECODERS = {"sam2_official": OfficialDecoder, "sam2_batched": BatchedDecoder}


def decoder_module(contract_name: str, model) -> nn.Module:
    return DECODERS[contract_name](model).eval()
