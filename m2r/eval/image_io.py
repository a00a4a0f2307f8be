"""Images to the device and back to files: training batches, m2r.evaluate and m2r.restore."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from m2r.atomic import atomic_path
from m2r.config import ConfigError
from m2r.eval.datasets import to_chw_uint8
from m2r.eval.metrics import as_saved_uint8


def to_unit_float(images_uint8: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 batches travel to the device, the /255 happens there."""
    return images_uint8.to(device, non_blocking=True).to(dtype) / 255.0


def as_unit(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 image -> float32 (1, 3, H, W) in [0, 1] on `device`."""
    return to_unit_float(to_chw_uint8(image), device, torch.float32).unsqueeze(0)


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) float image -> 8-bit PNG at `path`, the image the rgb and y metrics measure; written
    atomically, so that a killed run leaves no truncated PNG behind."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = as_saved_uint8(image).permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def with_png_names(found: Sequence[Tuple[Path, Path]]) -> List[Tuple[Path, Path]]:
    """a/b.jpg -> a/b.png, except where inputs share a/b: each keeps its suffix (a/b.jpg.png), so no
    output overwrites another; inputs that still collide (the same name in two input folders) stop."""
    suffixes_per_stem = Counter(relative.with_suffix("") for relative in {relative for _, relative in found})
    jobs, writers = [], {}
    for image, relative in found:
        shared = suffixes_per_stem[relative.with_suffix("")] > 1
        output = relative.with_name(relative.name + ".png") if shared else relative.with_suffix(".png")
        if output in writers:
            raise ConfigError(f"inputs {writers[output]} and {image} would both be written to "
                              f"{output} under --out: give them separate runs")
        writers[output] = image
        jobs.append((image, output))
    return jobs
