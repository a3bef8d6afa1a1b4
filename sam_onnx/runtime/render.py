"""Pictures a person can look at: a mask as PNG, and the image with mask and prompts."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageDraw

from ..core.files import atomic_write


def _save(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), "pick a writable path")


def save_mask(mask: np.ndarray, path: Path) -> None:
    _save(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)), path)


def save_overlay(image: np.ndarray, mask: np.ndarray, path: Path,
                 coords: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                 box: Optional[np.ndarray] = None) -> None:
    """Blend the mask in blue, outline the box in green, points green (fg) / red (bg)."""
    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * np.array([30, 144, 255], np.float32)
    img = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = max(3, round(max(image.shape[:2]) / 150))
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=(0, 220, 0), width=max(2, r // 2))
    for (x, y), label in zip(coords if coords is not None else [],
                             labels if labels is not None else []):
        color = (0, 220, 0) if label == 1 else (230, 30, 30)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(255, 255, 255))
    _save(img, path)


def save_masks_overlay(image: np.ndarray, masks: Iterable[np.ndarray], path: Path,
                       seed: int = 0) -> None:
    """Every mask blended in its own colour (as segment_anything's notebooks show them)."""
    out = image.astype(np.float32)
    rng = np.random.default_rng(seed)
    for mask in masks:
        color = rng.integers(40, 256, 3).astype(np.float32)
        out[mask] = 0.5 * out[mask] + 0.5 * color
    _save(Image.fromarray(out.round().astype(np.uint8)), path)
