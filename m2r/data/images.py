"""Image files on disk: which suffixes count, listing them in a fixed order, reading them as RGB.

Shared by the shard builder (source folders), the benchmark datasets (paired folders) and
`m2r.restore` (input folders). Failures
are PIL's own errors, which name the file for a missing or unidentifiable image; callers that need
a stricter vocabulary (a missing folder, a skipped sample) raise or record their own.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def is_image_file(path: Path) -> bool:
    """A file with an image suffix, in any letter case."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_image_files(folder: Path, recursive: bool = False) -> List[Path]:
    """The image files in `folder` (and its sub-folders when `recursive`), sorted by path.

    The caller checks that `folder` exists, so that the error speaks its own terms.
    """
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if is_image_file(path))


def open_rgb(path: Path) -> Image.Image:
    """The image at `path` as a PIL RGB image; PIL converts grey, palette and 16-bit images and
    drops alpha."""
    with Image.open(path) as image:
        return image.convert("RGB")


def read_rgb(path: Path) -> np.ndarray:
    """The image at `path` as uint8 (H, W, 3)."""
    return np.asarray(open_rgb(path))
