r"""Restore image files or folders of any size on CPU or GPU.

    python -m m2r.restore --weights model.safetensors photo.jpg more/ --out restored/ [--tile 512]
    accelerate launch --num_processes 8 --mixed_precision bf16 -m m2r.restore --weights model.safetensors \
        /data/photos --out restored/                                         # 8 GPUs, images split
    accelerate launch --multi_gpu --num_processes 2 -m m2r.restore ...       # 2 CPU processes, no CUDA

Outputs are RGB PNGs named after the inputs (folders keep their relative layout), of the input sizes:
images are reflect-padded to a multiple of 8 and cropped back, or tiled with overlap blending. Inputs
whose names differ only in their suffix keep it (a.jpg and a.png -> a.jpg.png and a.png.png); two
inputs that would still write one output stop the run. Grey images come out as RGB, alpha is dropped.
An input that cannot be read is skipped and named at the end (exit status 1); `--skip-existing` leaves
the inputs already restored, so a rerun finishes an interrupted folder.
Under Accelerate (see m2r.evaluate) every process holds the whole model on `accelerator.device`,
restores a contiguous share of the images under `accelerator.autocast()` and writes its own outputs.
Weight formats: m2r/eval/loading.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from m2r import dist
from m2r.cli import run_main
from m2r.config import ConfigError
from m2r.data.images import IMAGE_SUFFIXES, list_image_files, read_rgb
from m2r.eval.image_io import as_unit, save_png, with_png_names
from m2r.eval.loading import (add_inference_arguments, load_inference_model, make_accelerator,
                              parse_inference_arguments, require_output_folder)
from m2r.eval.tiling import restore_image


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m m2r.restore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    add_inference_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: this process's GPU when there is one (pick GPUs with CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="leave the inputs whose output exists (outputs are written whole, so one that "
                             "exists is complete): a rerun finishes an interrupted folder; not after changing weights")
    return parse_inference_arguments(parser, argv)


def collect_inputs(inputs: List[str], out: Path) -> List[Tuple[Path, Path]]:
    """(image, output path relative to --out); folders keep their sub-folders. Images under `out` are left
    out: an --out inside an input folder would otherwise restore its own outputs at every rerun."""
    found = []   # (image, its path relative to --out)
    outputs = out.resolve()
    for item in map(Path, inputs):
        if item.is_dir():
            found += [(p, p.relative_to(item)) for p in list_image_files(item, recursive=True)
                      if not p.resolve().is_relative_to(outputs)]
        elif item.is_file():
            found.append((item, Path(item.name)))
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {inputs}")
    return with_png_names(found)


def accelerator_for(args) -> Accelerator:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible")
    return make_accelerator(args.precision, cpu=args.device == "cpu")


@torch.no_grad()
def restore_files(model, jobs: Sequence[Tuple[Path, Path]], args, accelerator: Accelerator) -> List[str]:
    """Restore this process's share; returns why each unreadable input was skipped (naming it)."""
    unreadable = []
    for source, relative in jobs:
        try:
            image = read_rgb(source)
        except OSError as error:   # undecodable, or gone since the listing: the rest of the folder goes on
            unreadable.append(str(error))
            continue
        with accelerator.autocast():
            restored = restore_image(model, as_unit(image, accelerator.device), tile=args.tile or None,
                                     overlap=args.overlap)[0]
        save_png(restored, Path(args.out) / relative)
    return unreadable


def inputs_to_restore(args) -> Tuple[List[Tuple[Path, Path]], int]:
    """(image, output) jobs, and how many were left because their output exists (--skip-existing)."""
    jobs = collect_inputs(args.inputs, require_output_folder(args.out))
    if not args.skip_existing:
        return jobs, 0
    remaining = [(image, output) for image, output in jobs if not (Path(args.out) / output).is_file()]
    return remaining, len(jobs) - len(remaining)


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = accelerator_for(args)
    # Process 0 lists the inputs for all, as m2r.evaluate does (a stale listing on one node).
    jobs, existing = dist.on_rank0(lambda: inputs_to_restore(args))
    model = load_inference_model(args.weights, accelerator.device, args.model_config, args.overrides)
    with accelerator.split_between_processes(jobs) as share:
        unreadable = gather_object(restore_files(model, share, args, accelerator))
    accelerator.wait_for_everyone()
    left = f" ({existing} restored before: --skip-existing)" if existing else ""
    accelerator.print(f"restored {len(jobs) - len(unreadable)} images into {args.out}{left} on "
                      f"{accelerator.num_processes} process(es)", flush=True)
    if unreadable:
        accelerator.print(f"{len(unreadable)} inputs could not be read and were skipped:\n  " + "\n  ".join(unreadable),
                          flush=True)
    dist.destroy_process_group()
    return 1 if unreadable else 0


if __name__ == "__main__":
    run_main(main)
