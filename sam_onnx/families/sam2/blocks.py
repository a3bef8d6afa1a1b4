"""SAM 2's high-resolution maps in the upscaler's block order, made once an image (numpy).

The mask decoder's upscaler is two 2x2/stride-2 transposed convolutions: each of the 64x64
image tokens becomes a 2x2 block of 128x128 pixels, then each of those a 2x2 block of
256x256 pixels. As matrix products on channels-last tokens (``fast_decoder``) the result is
in block order, (token i*64+j, di, dj, ei, ej, channel) for pixel (4i+2di+ei, 4j+2dj+ej), and
the high-resolution maps added at each level must be in that order too. Permuting them inside
the decoder cost 10 ms a run; they are the same for every prompt of an image, so the
``sam2_batched`` decoder takes them already permuted, made here once an image (4-10 ms): the
decoder alone 16.3 / 23.3 ms a prompt against 20.1 / 25.3 with the pixel-order upscaler (sam2.1
tiny, 2 threads, two side-by-side runs of 5 rounds; same outputs within 5e-7). At the
predictor's level the gain was within this machine's noise: docs/benchmarks.md.
"""
from __future__ import annotations

import numpy as np

#: The image tokens a side (the stride-16 embedding of a 1024x1024 image).
TOKENS = 64


def to_blocks(feats: np.ndarray) -> np.ndarray:
    """A (1, C, 64 * 2^L, 64 * 2^L) map -> (1, 4096, 4^L, C) in block order: token (i, j),
    then the sub-pixel offsets coarse to fine (di, dj, then ei, ej), then the channel."""
    _, c, h, _ = feats.shape
    levels = max((h // TOKENS).bit_length() - 1, 0)
    if feats.shape != (1, c, TOKENS << levels, TOKENS << levels) or levels < 1:
        raise ValueError(f"expected a (1, C, {TOKENS * 2}*k, {TOKENS * 2}*k) map, got "
                         f"{feats.shape}")
    # rows 2^L i + sum(2^(L-1-l) d_l), columns alike -> (i, j, d_0 rows, d_0 cols, ..., c)
    x = feats.reshape(c, TOKENS, *(2,) * levels, TOKENS, *(2,) * levels)
    rows, cols = range(2, 2 + levels), range(3 + levels, 3 + 2 * levels)
    offsets = [axis for pair in zip(rows, cols) for axis in pair]
    order = (1, 2 + levels, *offsets, 0)
    return np.ascontiguousarray(x.transpose(order)).reshape(1, TOKENS * TOKENS, 4 ** levels, c)
