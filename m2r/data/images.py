"""Image files on disk: which suffixes count, listing them in a fixed order, reading them as RGB.

Shared by the shard builder (source folders), the benchmark datasets (paired folders) and
`m2r.restore` (input folders). A missing or unidentifiable file raises PIL's own error, which names
it; any other failure to read one (truncated data, malformed chunks, more pixels than PIL's
decompression-bomb limit, float pixels) raises UnreadableImage naming it. Both are OSErrors.
Callers that need a stricter vocabulary (a missing folder, a skipped sample) raise or record their own.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
    except FileNotFoundError:
        raise   # PIL names the file
    except UnidentifiedImageError as exc:
        raise UnreadableImage(f"{path}: not an image file PIL can read") from exc
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


# PIL's modes for one channel of more than 8 bits (16-bit grey PNG and TIFF): its convert("RGB")
# clips them at 255 instead of scaling them.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# EXIF orientations that turn the stored image by 90 degrees (5-8): width and height trade places.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
# Formats whose header size PIL leaves as stored and whose EXIF precedes the pixels (PIL reports a
# TIFF's size already turned; a PNG's EXIF may follow the pixels: PIL would decode the image to find it).
_HEADER_EXIF_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})


def open_rgb(path: Path) -> Image.Image:
    """The image at `path` as a PIL RGB image, turned as its EXIF orientation says (as viewers show
    it); grey and palette images are expanded, 16-bit ones scaled to 8 bits, alpha dropped."""
    with _naming(path), Image.open(path) as image:
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode in _WIDE_GREY_MODES:
            return Image.fromarray(_grey_to_8_bits(np.asarray(image), path)).convert("RGB")
        if image.mode == "F":   # no agreed range: PIL would clip it at 255, mostly to black
            raise UnreadableImage(f"{path}: 32-bit float pixels; save it with 8 or 16 bits per channel")
        return image.convert("RGB")


def _grey_to_8_bits(grey: np.ndarray, path: Path) -> np.ndarray:
    """16-bit grey values (0..65535) to 8 bits, 65535 -> 255."""
    if grey.size and (grey.min() < 0 or grey.max() > 65535):
        raise UnreadableImage(f"{path}: grey values span {grey.min()}..{grey.max()}, beyond 16 bits")
    return np.round(grey.astype(np.float32) / 257.0).astype(np.uint8)


def read_size(path: Path) -> Tuple[int, int]:
    """(width, height) of the image at `path` as `open_rgb` gives it, from its header alone: the pixels
    are not decoded (a PNG's rare EXIF orientation is not looked for; reading the pair then names the
    sizes that differ)."""
    with _naming(path), Image.open(path) as image:
        width, height = image.size
        turned = (image.format in _HEADER_EXIF_FORMATS
                  and image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS)
        return (height, width) if turned else (width, height)


def read_rgb(path: Path) -> np.ndarray:
    """The image at `path` as uint8 (H, W, 3)."""
    return np.asarray(open_rgb(path))
