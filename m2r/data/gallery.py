"""Draw every degradation type of every preset on one photo: one labelled tile per type.

    python -m m2r.data.gallery --image PATH --out gallery.png [--size 192] [--seed 0]

`--image skimage:NAME` takes a scikit-image sample photo (e.g. skimage:astronaut).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from m2r.cli import run_main
from m2r.config import ConfigError
from m2r.data.augment import center_crop
from m2r.data.builtin import load_photo
from m2r.data.degradations import apply_steps, to_float, to_uint8
from m2r.data.images import read_rgb
from m2r.data.presets import PRESETS

LABEL_HEIGHT = 14


def gallery_types():
    """(name, steps) for the clean image and each distinct type name over all presets."""
    seen = {}
    for preset in PRESETS.values():
        for t in preset:
            seen.setdefault(t.name, t.steps)
    return [("clean", ())] + list(seen.items())


def render(photo: np.ndarray, size: int = 192, seed: int = 0, columns: int = 6) -> Image.Image:
    tile = center_crop(photo, size)
    types = gallery_types()
    rows = math.ceil(len(types) / columns)
    sheet = Image.new("RGB", (columns * size, rows * (size + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (name, steps) in enumerate(types):
        degraded, _ = apply_steps(to_float(tile), np.random.default_rng((seed, index)), steps)
        x, y = (index % columns) * size, (index // columns) * (size + LABEL_HEIGHT)
        sheet.paste(Image.fromarray(to_uint8(degraded)), (x, y + LABEL_HEIGHT))
        draw.text((x + 3, y + 1), name, fill="black")
    return sheet


def read_image(spec: str) -> np.ndarray:
    if spec.startswith("skimage:"):
        import skimage.data

        name = spec.split(":", 1)[1]
        if not callable(getattr(skimage.data, name, None)):
            raise ConfigError(f"--image {spec}: scikit-image has no sample photo named {name!r}")
        return load_photo(name)
    return read_rgb(Path(spec))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="image file, or skimage:NAME")
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=192, help="tile side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    render(read_image(args.image), args.size, args.seed).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
