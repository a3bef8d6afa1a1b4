"""segment_anything's ResizeLongestSide and Sam.preprocess/postprocess_masks, and SAM 2's
SAM2Transforms, in numpy, for the pre- and post-processing a family declares
(``core.contracts.Preprocess`` / ``Postprocess``)."""
from __future__ import annotations

import concurrent.futures
import functools
from typing import Optional, Tuple

import numpy as np
from PIL import Image
from threadpoolctl import ThreadpoolController

from ..core.contracts import Preprocess


def preprocess_shape(h: int, w: int, long_side: int) -> Tuple[int, int]:
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def input_shape(h: int, w: int, pre: Preprocess) -> Tuple[int, int]:
    """The (h, w) an image of (h, w) is resized to before it is padded."""
    if pre.resize == "square":
        return pre.image_size, pre.image_size
    return preprocess_shape(h, w, pre.image_size)


def apply_coords(coords: np.ndarray, original_size: Tuple[int, int],
                 pre: Preprocess) -> np.ndarray:
    """(x, y) in the original image's pixels -> in the resized frame."""
    h, w = original_size
    new_h, new_w = input_shape(h, w, pre)
    coords = np.array(coords, dtype=np.float64, copy=True)
    coords[..., 0] *= new_w / w
    coords[..., 1] *= new_h / h
    return coords


def resize_image(image: np.ndarray, pre: Preprocess) -> np.ndarray:
    """HxWx3 uint8 -> the resized image, float32 0-255, before normalization and padding.

    The resize is PIL's bilinear: on the uint8 image for SAM, as segment_anything's
    (torchvision on a PIL image); on each channel as float for SAM 2, whose SAM2Transforms
    resize the float tensor with antialiasing, the filter PIL's is (no rounding to uint8)."""
    h, w = image.shape[:2]
    new_h, new_w = input_shape(h, w, pre)
    if pre.resize == "square":
        return np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32))
                                    .resize((new_w, new_h), Image.BILINEAR))
                         for c in range(3)], axis=-1)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR),
                      dtype=np.float32)


def image_to_input(image: np.ndarray, pre: Preprocess) -> Tuple[np.ndarray, Tuple[int, int]]:
    """HxWx3 uint8 -> the encoder's 1x3xSxS float32 (S: ``pre.image_size``): resized
    (``resize_image``), normalized, zero-padded; and the resized (h, w)."""
    resized = resize_image(image, pre)
    new_h, new_w = resized.shape[:2]
    x = (resized - np.float32(pre.pixel_mean)) / np.float32(pre.pixel_std)
    out = np.zeros((1, 3, pre.image_size, pre.image_size), np.float32)
    out[0, :, :new_h, :new_w] = x.transpose(2, 0, 1)
    return out, (new_h, new_w)


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Rows of weights that F.interpolate(mode="bilinear", align_corners=False) uses."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m


def postprocess_masks(low_res: np.ndarray, input_size: Tuple[int, int],
                      original_size: Tuple[int, int], image_size: int,
                      threshold: Optional[float] = None,
                      upscale: str = "padded_input") -> np.ndarray:
    """(..., 256, 256) logits -> (..., H, W): upscale to ``image_size``, crop the padding,
    resize to the original size, the three steps folded into one band matrix per axis;
    ``upscale="original"``: one resize straight to the original size (SAM 2).

    ``threshold``: return ``logits > threshold`` (bool) instead, thresholding each block of
    rows while it is in cache rather than writing and re-reading the float masks."""
    with _blas().limit(limits=1, user_api="blas"):
        return _band_products(low_res, input_size, original_size, image_size, threshold,
                              upscale == "original")


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    """numpy's BLAS, run single-threaded for the band products: they are small, and
    OpenBLAS's worker threads keep spinning after them on the cores ONNX Runtime's next run
    needs (measured, vit_b prompt at 1800x1200: 51 ms a prompt with them, 24 ms without)."""
    return ThreadpoolController()


def _band_products(low_res, input_size, original_size, image_size, threshold, direct):
    rows, cols, row_bands, col_bands = _resize_matrices(
        tuple(low_res.shape[-2:]), tuple(input_size), tuple(original_size), image_size, direct)
    x = low_res.astype(np.float32, copy=False)
    wide = np.empty((*x.shape[:-1], cols.shape[1]), np.float32)
    out = np.empty((*x.shape[:-2], rows.shape[0], cols.shape[1]),
                   np.float32 if threshold is None else bool)

    def by_cols(bands):
        for out_cols, in_cols in bands:
            wide[..., out_cols] = x[..., in_cols] @ cols[in_cols, out_cols]

    def by_rows(bands):  # the big step writes whole rows: contiguous
        for out_rows, in_rows in bands:
            block = rows[out_rows, in_rows] @ wide[..., in_rows, :]
            if threshold is None:
                out[..., out_rows, :] = block
            else:
                np.greater(block, threshold, out=out[..., out_rows, :])

    _in_two_halves(by_cols, col_bands)
    _in_two_halves(by_rows, row_bands)
    return out


def _in_two_halves(work, bands) -> None:
    """``work`` over the first half of ``bands`` here and the second on a helper thread
    (numpy's products release the GIL): the upscaling is memory-bound and starts with cold
    caches after a decoder run, and two cores take 3.5 ms where one took 5.4 (three vit_b
    masks at 1800x1200, measured)."""
    half = len(bands) // 2
    other = _helper().submit(work, bands[half:])
    work(bands[:half])
    other.result()


@functools.lru_cache(maxsize=1)
def _helper() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sam-onnx-upscale")


@functools.lru_cache(maxsize=16)
def _resize_matrices(low_res_size, input_size, original_size, size, direct):
    """(H x 256) and (256 x W) float32 matrices (upscale to ``size``, crop and resize per
    axis; ``direct``: resize straight to the original size) and their bands."""
    if direct:
        rows = _bilinear_matrix(original_size[0], low_res_size[0])
        cols = _bilinear_matrix(original_size[1], low_res_size[1])
    else:
        rows = _bilinear_matrix(original_size[0], input_size[0]) @ \
            _bilinear_matrix(size, low_res_size[0])[: input_size[0]]
        cols = _bilinear_matrix(original_size[1], input_size[1]) @ \
            _bilinear_matrix(size, low_res_size[1])[: input_size[1]]
    rows, cols = rows.astype(np.float32), np.ascontiguousarray(cols.T.astype(np.float32))
    # block sizes measured on three 1800x1200 masks: 32 output rows, 64 output columns
    return rows, cols, _bands(rows, 32), _bands(cols.T, 64)


def _bands(matrix: np.ndarray, block: int):
    """(output slice, input slice) per block of output rows: each output pixel of a
    bilinear resize reads a few neighbouring inputs, so a block reads a narrow band, and a
    product over the band skips the zeros a dense product multiplies (2-5x faster)."""
    bands = []
    for start in range(0, matrix.shape[0], block):
        out = slice(start, min(start + block, matrix.shape[0]))
        used = np.flatnonzero(np.any(matrix[out] != 0, axis=0))
        bands.append((out, slice(int(used[0]), int(used[-1]) + 1) if len(used) else
                      slice(0, 0)))
    return tuple(bands)
