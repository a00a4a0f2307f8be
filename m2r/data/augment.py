"""Geometric augmentation of uint8 (H, W, 3) images: crop with optional zoom-out, flips, rot90.

Small images are never padded (a model would learn to restore borders that no real photo has):
an image whose short side is below the crop window is upscaled bilinearly so the short side
equals the window, then cropped.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR, reducing_gap=None))


def fit_short_side(img: np.ndarray, size: int) -> np.ndarray:
    """Upscale so the short side is at least `size` (unchanged if already large enough)."""
    h, w = img.shape[:2]
    if min(h, w) >= size:
        return img
    scale = size / min(h, w)
    return _resize(img, max(size, round(h * scale)), max(size, round(w * scale)))


def random_crop(images: Sequence[np.ndarray], crop: int, rng: np.random.Generator,
                scale_range: Tuple[float, float] = (1.0, 1.0)) -> List[np.ndarray]:
    """The same random window from each aligned image. With scale s drawn from `scale_range`
    (s <= 1 zooms out), a crop/s window is cut and resized to crop x crop."""
    scale = float(rng.uniform(*scale_range)) if scale_range[0] != scale_range[1] else float(scale_range[0])
    window = max(crop, int(round(crop / scale)))
    images = [fit_short_side(img, window) for img in images]
    h, w = images[0].shape[:2]
    y = int(rng.integers(0, h - window + 1))
    x = int(rng.integers(0, w - window + 1))
    cut = [img[y:y + window, x:x + window] for img in images]
    return [_resize(c, crop, crop) if window != crop else c for c in cut]


def center_crop(img: np.ndarray, crop: int) -> np.ndarray:
    img = fit_short_side(img, crop)
    h, w = img.shape[:2]
    y, x = (h - crop) // 2, (w - crop) // 2
    return img[y:y + crop, x:x + crop]


def random_dihedral(images: Sequence[np.ndarray], rng: np.random.Generator,
                    rotate: bool = True) -> List[np.ndarray]:
    """Horizontal flip, and with `rotate` also one of 4 rot90s (all 8 symmetries of the square)."""
    flip = bool(rng.integers(2))
    turns = int(rng.integers(4)) if rotate else 0
    out = []
    for img in images:
        if flip:
            img = img[:, ::-1]
        out.append(np.rot90(img, turns) if turns else img)
    return out
