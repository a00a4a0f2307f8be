"""Restore image files or folders of any size on CPU or GPU.

    python -m m2r.restore --weights model.safetensors photo.jpg more/ --out restored/ [--tile 512]

Outputs are PNGs named after the inputs (folders keep their relative layout), of the input sizes:
images are reflect-padded to a multiple of 8 and cropped back, or tiled with overlap blending.
Weight formats: m2r/eval/loading.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Tuple

import torch

from m2r.eval.datasets import IMAGE_SUFFIXES, read_rgb, to_chw_uint8
from m2r.eval.loading import AUTOCAST, add_inference_arguments, load_inference_model
from m2r.eval.tiling import restore_image
from m2r.evaluate import save_png


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    add_inference_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser.parse_args(argv)


def collect_inputs(inputs: List[str]) -> List[Tuple[Path, Path]]:
    """(image, output path relative to --out); folders keep their sub-folders."""
    jobs = []
    for item in map(Path, inputs):
        if item.is_dir():
            jobs += [(p, p.relative_to(item).with_suffix(".png")) for p in sorted(item.rglob("*"))
                     if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif item.is_file():
            jobs.append((item, Path(item.name).with_suffix(".png")))
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not jobs:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {inputs}")
    return jobs


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    jobs = collect_inputs(args.inputs)
    model = load_inference_model(args.weights, device, args.model_config, args.overrides)
    dtype = AUTOCAST[args.precision] if device.type == "cuda" else None
    out = Path(args.out)
    for source, relative in jobs:
        lq = to_chw_uint8(read_rgb(source)).to(device).float().div(255.0).unsqueeze(0)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            restored = restore_image(model, lq, tile=args.tile or None, overlap=args.overlap)[0]
        save_png(restored.float(), out / relative)
    print(f"restored {len(jobs)} images into {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
