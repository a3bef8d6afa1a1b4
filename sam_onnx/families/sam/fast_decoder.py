"""segment_anything's mask decoder rewritten to do far fewer FLOPs with the same result;
every decoder contract is exported through it.

segment_anything repeats the 64x64 image tokens for every prompt and projects all 4,096 of
them in every attention layer (3.6 GFLOP per prompt). Here, with the same weights:

* every attention between the image tokens and a prompt's ~7 tokens is reassociated so the
  projection acts on the 7 tokens instead of on the 4,096 image tokens: ``(q Wk)(x + pe)^T``
  instead of ``q (Wk (x + pe))^T``, ``(A x) Wv`` instead of ``A (x Wv)``, and the output
  projection folded into the 7 token values (key biases shift every score of a row equally,
  which softmax ignores);
* the last attention runs only for the tokens read after it (each token attends on its
  own): the IoU and mask tokens, not the prompt's;
* for prompts without a mask prompt (the ``batched`` contracts) the first layer's image
  tokens are the same for every prompt, so they are projected as they are, once per batch
  in the graph and once an image in the predictor, which runs what depends on the image
  alone ahead of the prompts; and the upscaler runs only for the prompts whose predicted
  IoU passes a threshold;
* the two transposed 2x2/stride-2 convolutions of the upscaler are matrix products on
  channels-last tokens, and the mask tokens are applied before the pixels are put in order.

Measured on this 2-core machine (vit_b, ONNX Runtime, 16 prompts a run): the batched decoder
takes ~15.3 ms a prompt with its masks and ~7.8 ms for the scores alone; segment_anything's
decoder in PyTorch takes ~95-130 ms a prompt. About 1.4 GFLOP a prompt remain, most of it the
upscaler (0.8 GFLOP) that no reassociation removes (a layer norm and GELUs sit between its
products).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .contracts import EMBEDDING_SIZE


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, heads, T, D / heads)"""
    b, t, d = x.shape
    return x.reshape(b, t, num_heads, d // num_heads).transpose(1, 2)


def _per_head_weight(linear: nn.Linear, num_heads: int) -> torch.Tensor:
    """A projection to the internal dim, split per head: (heads, d, C)."""
    d_int, c = linear.weight.shape
    return linear.weight.reshape(num_heads, d_int // num_heads, c)


def _token_to_image(attn, tokens: torch.Tensor, image: torch.Tensor, image_with_pe: torch.Tensor,
                    shared: bool) -> torch.Tensor:
    """``attn(q=tokens, k=image_with_pe, v=image)``; ``shared``: image is (1, N, C)."""
    h = attn.num_heads
    q = _heads(attn.q_proj(tokens), h)  # (B, h, T, d)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if shared:
        k = _heads(attn.k_proj(image_with_pe), h)  # (1, h, N, d), once per batch
        v = _heads(attn.v_proj(image), h)
        out = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v
    else:
        b, _, t, _ = q.shape
        qk = q @ _per_head_weight(attn.k_proj, h)  # (B, h, T, C); the key bias cancels
        scores = qk.reshape(b, h * t, -1) @ image_with_pe.transpose(1, 2)  # (B, hT, N)
        mixed = torch.softmax(scores * scale, dim=-1) @ image  # (B, hT, C)
        wv = _per_head_weight(attn.v_proj, h).transpose(1, 2)  # (h, C, d)
        out = mixed.reshape(b, h, t, -1) @ wv + attn.v_proj.bias.reshape(h, 1, -1)
    b, _, t, _ = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, -1))


def _image_to_token(attn, image_q: torch.Tensor, tokens_k: torch.Tensor,
                    tokens_v: torch.Tensor, shared: bool) -> torch.Tensor:
    """``attn(q=image_q, k=tokens_k, v=tokens_v)`` for (1 or B, N, C) image queries."""
    h = attn.num_heads
    k = _heads(attn.k_proj(tokens_k), h)  # (B, h, T, d)
    v = _heads(attn.v_proj(tokens_v), h)
    b, _, t, d = k.shape
    k = k / math.sqrt(d)  # the scale on the few keys rather than on the N x T scores
    # scores as (B, h, T, N), the few prompt tokens on the softmax axis and the N image
    # tokens contiguous: ONNX Runtime's Softmax over a last axis of 7 took 0.3 ms a layer
    if shared:
        q = _heads(attn.q_proj(image_q), h)  # (1, h, N, d), once per batch
        scores = k @ q.transpose(-2, -1)  # (B, h, T, N)
    else:
        wq = _per_head_weight(attn.q_proj, h)  # (h, d, C)
        m = (k @ wq).reshape(b, h * t, -1)  # (B, hT, C)
        bias = (k @ attn.q_proj.bias.reshape(h, d, 1)).reshape(b, h, t, 1)
        scores = (m @ image_q.transpose(1, 2)).reshape(b, h, t, -1) + bias
    probs = _softmax_over_tokens(scores).reshape(b, h * t, -1)  # (B, hT, N)
    wo = attn.out_proj.weight.reshape(-1, h, d).permute(1, 2, 0)  # (h, d, C)
    # (B, hT, C): values already out-projected; every head's probabilities sum to 1, so the
    # output bias is added to the few values (bias / heads) instead of the N outputs
    values = (v @ wo).reshape(b, h * t, -1) + attn.out_proj.bias / h
    return probs.transpose(1, 2) @ values


def _softmax_over_tokens(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 2 of (B, h, T, N), spelled out: ONNX Runtime runs a Softmax on an
    inner axis through transposes (0.47 ms here), the reductions directly (0.11 ms)."""
    e = torch.exp(scores - scores.amax(dim=2, keepdim=True))
    return e / e.sum(dim=2, keepdim=True)


class BatchedDecoder(nn.Module):
    """The ``batched`` contract: (image_embeddings, point_coords, point_labels,
    pred_iou_thresh) for many prompts -> (low_res_masks, iou_predictions, kept_prompts),
    equal to segment_anything's mask decoder.

    Masks are upscaled only for the prompts with a predicted IoU above the threshold: the
    scores need no upscaler, which is half of a prompt's time, and the automatic mask
    generator drops every mask at or below it unseen."""

    def __init__(self, sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.register_buffer("image_pe", image_pe(sam))

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """segment_anything's SamOnnxModel._embed_points: the caller sends the padding point."""
        pe_layer = self.prompt_encoder.pe_layer
        coords = pe_layer._pe_encoding((coords + 0.5) / self.prompt_encoder.input_image_size[0])
        labels = labels.unsqueeze(-1)
        coords = coords * (labels != -1)
        coords = coords + self.prompt_encoder.not_a_point_embed.weight * (labels == -1)
        for i, embed in enumerate(self.prompt_encoder.point_embeddings):
            coords = coords + embed.weight * (labels == i)
        return coords

    @torch.no_grad()
    def forward(self, image_embeddings, point_coords, point_labels, pred_iou_thresh):
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dec = self.mask_decoder
        out, keys = two_way_transformer(
            dec, image_embeddings + no_mask, self.image_pe,
            self._embed_points(point_coords, point_labels), shared_first=True)
        iou = dec.iou_prediction_head(out[:, 0])
        # "not all at or below" rather than "any above": a NaN score keeps its prompt
        kept = torch.nonzero(~(iou <= pred_iou_thresh).all(dim=1)).reshape(-1)
        masks = _upscale_masks(dec, keys.index_select(0, kept),
                               _hypernetworks(dec, out.index_select(0, kept)[:, 1:]))
        return masks, iou, kept


def image_pe(sam) -> torch.Tensor:
    """The dense positional encoding as (1, 4096, C) tokens: a constant, stored once in the
    graph (a persistent buffer; a non-persistent one was inlined at each of its 3 uses)."""
    return sam.prompt_encoder.get_dense_pe().detach().flatten(2).transpose(1, 2).contiguous()


def predict_masks(mask_decoder, image: torch.Tensor, image_pe: torch.Tensor,
                  sparse: torch.Tensor):
    """``MaskDecoder.predict_masks`` for one image: ``image`` (1, C, 64, 64) is the
    embedding plus the dense prompt, ``image_pe`` (1, 4096, C), ``sparse`` (B, T, C) ->
    low-res masks (B, 4, 256, 256) and scores (B, 4)."""
    out, keys = two_way_transformer(mask_decoder, image, image_pe, sparse)
    return (_upscale_masks(mask_decoder, keys, _hypernetworks(mask_decoder, out[:, 1:])),
            mask_decoder.iou_prediction_head(out[:, 0]))


def two_way_transformer(mask_decoder, image: torch.Tensor, image_pe: torch.Tensor,
                        sparse: torch.Tensor, shared_first: bool = False):
    """The decoder's transformer, reassociated: the IoU and mask tokens (B, 5, C) and the
    image tokens (B, 4096, C) after it.

    ``shared_first``: project the first layer's image tokens once for all B prompts (worth it
    for many prompts; for one, the reassociated form does fewer FLOPs)."""
    dec = mask_decoder
    transformer = dec.transformer
    b = sparse.shape[0]
    # SAM 2's decoder puts an object-score token first; the image predictor never reads it.
    # HQ-SAM's puts its HQ output token last (counted in its num_mask_tokens).
    first = int(getattr(dec, "pred_obj_scores", False))
    output_tokens = torch.cat(([dec.obj_score_token.weight] if first else []) +
                              [dec.iou_token.weight, dec.mask_tokens.weight] +
                              ([dec.hf_token.weight] if hasattr(dec, "hf_token") else []), dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
    image = image.flatten(2).transpose(1, 2)  # (1, N, C)
    pe = image_pe

    queries, keys = tokens, image
    for i, layer in enumerate(transformer.layers):
        shared = shared_first and i == 0  # later layers' image tokens differ per prompt
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        keys_pe = keys + pe  # both cross attentions of a layer see the same keys
        queries = layer.norm2(queries + _token_to_image(
            layer.cross_attn_token_to_image, queries + tokens, keys, keys_pe, shared))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _image_to_token(
            layer.cross_attn_image_to_token, keys_pe, queries + tokens, queries, shared))
    # the last attention only for the tokens read after it (each attends on its own)
    outputs = slice(first, first + 1 + dec.num_mask_tokens)
    queries, tokens = queries[:, outputs], tokens[:, outputs]
    queries = transformer.norm_final_attn(queries + _token_to_image(
        transformer.final_attn_token_to_image, queries + tokens, keys, keys + pe,
        shared=shared_first and len(transformer.layers) == 0))
    return queries, keys


def _hypernetworks(mask_decoder, mask_tokens: torch.Tensor) -> torch.Tensor:
    """The mask tokens' (B, 4, C) weights for the upscaled channels: (B, 4, c)."""
    return torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in
                        enumerate(mask_decoder.output_hypernetworks_mlps)], dim=1)


def _upscale_masks(mask_decoder, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
    """output_upscaling + the hypernetwork product, channels last.

    A 2x2/stride-2 transposed convolution maps each input pixel to a 2x2 block of
    outputs: one matrix product, the block's positions kept as axes (i, j, di, dj, ...)
    until the 4 masks, not the 32 channels, are put in pixel order."""
    conv1, norm, _, conv2, _ = mask_decoder.output_upscaling
    b, s = keys.shape[0], EMBEDDING_SIZE
    c1, c2 = conv1.out_channels, conv2.out_channels
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, -1)  # (C, 2*2*c1)
    x = (keys @ w1).reshape(b, s, s, 2, 2, c1) + conv1.bias
    x = F.gelu(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, -1)  # (c1, 2*2*c2)
    x = F.gelu((x @ w2).reshape(b, s * s * 16, c2) + conv2.bias)
    return pixel_order(hyper @ x.transpose(1, 2))


def pixel_order(masks: torch.Tensor) -> torch.Tensor:
    """(B, n, 4096 * 16) masks in the upscaler's block order (token i*64+j, di, dj, ei, ej)
    -> (B, n, 256, 256), row 4i + 2di + ei, column 4j + 2dj + ej: in two 4-D transposes,
    which ONNX Runtime does in about half the time of one 8-D transpose."""
    b, n, s = masks.shape[0], masks.shape[1], EMBEDDING_SIZE
    masks = masks.reshape(b * n * s, s, 2, 8)  # i | j, di, (dj, ei, ej)
    masks = masks.transpose(1, 2).reshape(b * n * s * 2, s * 2, 2, 2)  # (i, di) | (j, dj), ei, ej
    return masks.transpose(1, 2).reshape(b, n, 4 * s, 4 * s)


def layer_norm_2d(norm, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's (and sam2's) ``LayerNorm2d`` module ``norm`` on (B, C, H, W) ``x``,
    its channel statistics as (1, C) x (C, HW) products: ONNX Runtime's ReduceMean over the
    channel axis of a (1, 64, 256, 256) map took 9.2 ms, these products 3.2 ms (measured,
    2 threads; same result within 1e-6).

    The channels and the map's size are fixed in every decoder and traced as constants: a
    Reshape whose other sizes come from the tensor gets a -1, which ONNX Runtime cannot
    infer when the batch is empty (no prompt passed a batched decoder's threshold)."""
    b, c, h, w = x.shape[0], *(int(d) for d in x.shape[1:])
    average = torch.full((1, c), 1.0 / c, dtype=x.dtype)
    x = x.reshape(b, c, h * w)
    centred = x - average @ x
    x = centred / torch.sqrt(average @ (centred * centred) + norm.eps)
    return (norm.weight[:, None] * x + norm.bias[:, None]).reshape(b, c, h, w)
