"""Data pipeline speed on one CPU core: per-type synthesis and the whole stream.

    OMP_NUM_THREADS=1 python bench/data_speed.py [--crop 256] [--pairs 200]

Per type: degrading a planar uint8 crop as the stream does (float conversion, steps, uint8).
Whole stream: shards of 512x512 photos (raw uint8 + zstd) read through `build_train_stream` in the
main process: tar read, shuffle, decode, crop, flips/rot90, degradation, batching. Prints Markdown
tables.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's m2r, whatever is installed

from m2r.data import DataConfig, build_train_stream  # noqa: E402
from m2r.data.builtin import TRAIN_PHOTOS, load_photo  # noqa: E402
from m2r.data.presets import PRESETS, Degrader  # noqa: E402
from m2r.data.stream import planar  # noqa: E402
from m2r.shards.build import BuildOptions, build  # noqa: E402


def per_type_speed(crop: int, pairs: int):
    clean = [planar(load_photo(name)[:crop, :crop]) for name in TRAIN_PHOTOS if min(load_photo(name).shape[:2]) >= crop]
    rows = {}
    for preset in PRESETS:
        degrader = Degrader(preset)
        for type_id, t in enumerate(degrader.types):
            if t.name in rows:
                continue
            start = time.perf_counter()
            for i in range(pairs):
                degrader.degrade_planes(clean[i % len(clean)], type_id, np.random.default_rng(i))
            rows[t.name] = pairs / (time.perf_counter() - start)
    return rows


def make_shards(root: Path, count: int = 64, side: int = 512) -> Path:
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        img = load_photo(TRAIN_PHOTOS[i % len(TRAIN_PHOTOS)])
        img = np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR))
        Image.fromarray(np.rot90(img, int(rng.integers(4))).copy()).save(photos / f"{i:03d}.png")
    build(BuildOptions(src=[str(photos)], out=str(root / "shards"), samples_per_shard=16), progress=False)
    return root / "shards"


def stream_speed(shards: Path, preset: str, crop: int, pairs: int, batch: int = 8) -> float:
    cfg = DataConfig(source="shards", shards=str(shards), preset=preset, workers=0, shuffle_buffer=32)
    stream = build_train_stream(cfg, seed=0, rank=1, world_size=2, micro_batch=batch, crop=crop)
    iterator = iter(stream)
    next(iterator)  # first round's shard reads
    start = time.perf_counter()
    steps = max(1, pairs // batch)   # at least one batch past the first
    for _ in itertools.islice(iterator, steps):
        pass
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
          f"numpy {np.__version__}, torch {torch.__version__}\n")
    print(f"| type | pairs/s ({args.crop}x{args.crop}, 1 core) |\n|---|---|")
    for name, speed in per_type_speed(args.crop, args.pairs).items():
        print(f"| {name} | {speed:.0f} |")
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp))
        print(f"\n| whole stream, preset | pairs/s ({args.crop}x{args.crop} crops of 512x512 zstd shards, 1 core) |"
              "\n|---|---|")
        for preset in PRESETS:
            print(f"| {preset} | {stream_speed(shards, preset, args.crop, args.pairs):.0f} |")


if __name__ == "__main__":
    main()
