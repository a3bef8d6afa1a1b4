"""Images in, HxWx3 uint8 RGB out, as SamPredictor expects (numpy and PIL only)."""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps

from ..core.errors import SamOnnxError

ImageLike = Union[str, Path, BinaryIO, Image.Image, np.ndarray]


def load_image(image: ImageLike, image_format: str = "RGB") -> np.ndarray:
    """A path or binary stream (EXIF orientation applied), PIL image or array, as HxWx3
    uint8 RGB.

    Grayscale is repeated to three channels, alpha is dropped, 16-bit images are mapped
    from 0..65535 (x / 257), float images from 0..1; ``image_format="BGR"`` flips the
    channels of an array (OpenCV's order).
    """
    if image_format not in ("RGB", "BGR"):
        raise SamOnnxError(f"image_format must be RGB or BGR, not {image_format!r}")
    if isinstance(image, (str, Path)):
        image = _read(Path(image))
    elif hasattr(image, "read"):  # a binary stream (a remote file's bytes)
        image = _read(image)
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = np.asarray(image)
        else:
            image = np.asarray(image.convert("RGB"))
            image_format = "RGB"
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape:
        raise SamOnnxError(f"an image must be HxW, HxWx3 or HxWx4; got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]
    if image_format == "BGR":
        arr = arr[..., ::-1]
    return np.ascontiguousarray(_to_uint8(arr))


def _read(source: Union[Path, BinaryIO]) -> Image.Image:
    path = getattr(source, "name", source)
    try:
        with Image.open(source) as pil:
            pil = ImageOps.exif_transpose(pil)
            pil.load()
            return pil
    except Image.DecompressionBombError as exc:
        raise SamOnnxError(f"image {path} is too large to read safely ({exc}); downscale it, "
                           "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (OSError, ValueError) as exc:
        raise SamOnnxError(f"cannot read image {path} ({exc}); check that it is a whole "
                           "image file (JPEG, PNG, TIFF...)") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:  # the full 16-bit range onto 0..255, no per-image stretch
        arr = (arr.astype(np.float64) / 257.0).round()
    elif arr.dtype.kind in "iu" and arr.max(initial=0) > 255:
        arr = (arr.astype(np.float64) / max(int(arr.max()), 1) * 255.0).round()
    elif arr.dtype.kind == "f":
        arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).round()
    return arr.astype(np.uint8)


def synthetic(h: int, w: int) -> np.ndarray:
    """A test card of any size: gradients, a checkerboard, a red rectangle and a green disc,
    so that masks have edges to find (check's, bench's and the tests' images)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, ((x // 24 + y // 24) % 2) * 180], -1)
    img[h // 4: h // 2, w // 5: w // 2] = [230, 40, 40]
    img[((x - 2 * w // 3) ** 2 + (y - 2 * h // 3) ** 2) < (min(h, w) // 6) ** 2] = [30, 200, 60]
    return img.astype(np.uint8)
