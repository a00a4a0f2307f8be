"""The built-in source: scikit-image's bundled sample photos, no files needed.

Used by the demo and by tests. Two photos are held out for validation; the rest feed training.
Grayscale photos are replicated to RGB, alpha is dropped.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import numpy as np

TRAIN_PHOTOS: Tuple[str, ...] = ("astronaut", "coffee", "rocket", "immunohistochemistry",
                                 "hubble_deep_field", "retina", "camera", "brick", "grass", "gravel")
VAL_PHOTOS: Tuple[str, ...] = ("chelsea", "coins")


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """uint8 (H, W, 3) scikit-image sample `name` (read-only, cached per process)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3].astype(np.uint8))
    img.setflags(write=False)
    return img
