"""Image files on disk: which suffixes count, listing them in a fixed order, reading them as RGB.

Shared by the shard builder (source folders), the benchmark datasets (paired folders) and
`m2r.restore` (input folders). A missing or unidentifiable file raises PIL's own error, which names
it; any other failure to read one (truncated data, malformed chunks) raises UnreadableImage naming
it. Both are OSErrors. Callers that need a stricter vocabulary (a missing folder, a skipped sample)
raise or record their own.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
# What PIL raises for a damaged file: truncated data (OSError), malformed chunks (ValueError,
# SyntaxError), an early end (EOFError). Its messages rarely name the file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


class UnreadableImage(OSError):
    """An image file that exists but cannot be decoded; the message names the file."""


def is_image_file(path: Path) -> bool:
    """A file with an image suffix, in any letter case."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_image_files(folder: Path, recursive: bool = False) -> List[Path]:
    """The image files in `folder` (and its sub-folders when `recursive`), sorted by path.

    The caller checks that `folder` exists, so that the error speaks its own terms.
    """
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if is_image_file(path))


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise PIL's decoding errors as UnreadableImage naming `path`."""
    try:
        yield
    except (FileNotFoundError, UnidentifiedImageError):
        raise   # PIL names the file in these
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def open_rgb(path: Path) -> Image.Image:
    """The image at `path` as a PIL RGB image; PIL converts grey, palette and 16-bit images and
    drops alpha."""
    with _naming(path), Image.open(path) as image:
        return image.convert("RGB")


def read_size(path: Path) -> Tuple[int, int]:
    """(width, height) of the image at `path`, from its header alone: the pixels are not decoded."""
    with _naming(path), Image.open(path) as image:
        return image.size


def read_rgb(path: Path) -> np.ndarray:
    """The image at `path` as uint8 (H, W, 3)."""
    return np.asarray(open_rgb(path))
