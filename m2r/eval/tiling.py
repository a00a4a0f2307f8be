"""Whole-image inference at any size: reflect-pad to a multiple of 8 and crop back, or, for large
images, overlapping tiles blended with weights that fall off linearly towards each tile's border.

Tiles are restored independently, so the CLIP prior and the task prompt see one tile at a time.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from m2r.models.config import MIN_SIZE, SIZE_MULTIPLE


def padded_size(size: int) -> int:
    return max(MIN_SIZE, -(-size // SIZE_MULTIPLE) * SIZE_MULTIPLE)


def pad_to_multiple(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> bottom/right padded to multiples of 8 (at least 16): reflect, replicate where too small."""
    h, w = image.shape[-2:]
    pad_h, pad_w = padded_size(h) - h, padded_size(w) - w
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)


def restore_padded(model, image: torch.Tensor) -> torch.Tensor:
    """One forward on the padded image, cropped back to the input size (unclamped)."""
    h, w = image.shape[-2:]
    return model(pad_to_multiple(image)).restored[..., :h, :w].float()


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start offsets covering [0, size) with tiles of `tile` overlapping by at least `overlap`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _blend_ramp(length: int, overlap: int, device) -> torch.Tensor:
    """1 in the middle, rising linearly over `overlap` pixels at both ends (never 0)."""
    position = torch.arange(length, device=device, dtype=torch.float32)
    distance = torch.minimum(position + 1, length - position)
    return (distance / max(1, overlap)).clamp(max=1.0)


@torch.no_grad()
def restore_image(model, image: torch.Tensor, tile: Optional[int] = None, overlap: int = 32) -> torch.Tensor:
    """Restore a (B, 3, H, W) [0, 1] image of any size; tiles of `tile` px when it is larger than that."""
    h, w = image.shape[-2:]
    if not tile or (h <= tile and w <= tile):
        return restore_padded(model, image)
    if tile % SIZE_MULTIPLE or not 0 <= overlap < tile:
        raise ValueError(f"tile={tile} must be a multiple of {SIZE_MULTIPLE} and overlap={overlap} in [0, tile)")
    padded = pad_to_multiple(image)
    ph, pw = padded.shape[-2:]
    tile_h, tile_w = min(tile, ph), min(tile, pw)
    out = torch.zeros(image.shape[0], 3, ph, pw, device=image.device)
    weight = torch.zeros(1, 1, ph, pw, device=image.device)
    mask = _blend_ramp(tile_h, overlap, image.device)[:, None] * _blend_ramp(tile_w, overlap, image.device)[None]
    for top in tile_starts(ph, tile_h, overlap):
        for left in tile_starts(pw, tile_w, overlap):
            window = padded[..., top:top + tile_h, left:left + tile_w]
            out[..., top:top + tile_h, left:left + tile_w] += model(window).restored.float() * mask
            weight[..., top:top + tile_h, left:left + tile_w] += mask
    return (out / weight)[..., :h, :w]
