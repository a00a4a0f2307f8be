"""Training speed of m2r's own engine step on one GPU: the pretraining run users launch, not a plain PyTorch loop.

    python bench/engine_speed.py --json runs/bench/engine_speed.json                  # GPU: every row
    python bench/engine_speed.py --variants fp32-eager --reference train_speed.json   # against plain-torch figures
    python bench/engine_speed.py --smoke --json /tmp/engine_smoke.json                # CPU: tiny model, under a minute
    python bench/engine_speed.py --table engine_speed.json --reference train_speed.json  # compare measured rows

Each row is a variant of bench/train_speed.py (same settings, so that its plain-PyTorch figure compares)
trained through the pretraining `Trainer` of its recipe (configs/pretrain/m2restore.yaml, or -plus.yaml for
the plus network): DeepSpeed ZeRO 1 in fp32, ZeRO 2 in bf16 (its gradients summed in fp32), torch AdamW
under DeepSpeed (not fused), the data stream with its workers, the EMA, the step's report and all-reduce,
the loop's log steps every run.log_every. The engine's bf16 is DeepSpeed's: bf16 weights (fp32 masters in
the optimizer) and no autocast, where train_speed's bf16 rows autocast fp32 weights; a row's ratio to its
plain-torch figure holds that difference as well as the engine's own costs. One optimizer step per batch of
4, as train_speed and the official figure count it (train.grad_accum=1; the pretraining recipe's 4, given as
an extra argument, spreads the optimizer's share over 16 images). What differs from a real run: the data are the
built-in photos (no shards on the GPU machine; no zstd decode; synthetic shards where scikit-image, whose photos
they are, does not import), DA-CLIP has random weights (as in
bench/train_speed.py), and validation and checkpoints are left out (the loop excludes them from its
throughput too).

Each row builds its run in a process of its own (its peak memory, compiled graphs and DeepSpeed's
process-wide state are its own), takes --warmup steps, then times --steps steps through the loop's own
`train_step` and `_report_step`, CUDA-synchronised. Reported: ms per optimizer step, img/s, peak allocated
GPU memory (the whole process: weights, DA-CLIP, EMA, optimizer states, activations), the share of the
timed window spent waiting for the data stream, and img/s against the same variant's plain-PyTorch figure
from bench/train_speed.py's JSON (--reference) or else the official recipe's 8.54 img/s. Extra key=value
arguments override every row's config after the row's own settings. The JSON is written after each row.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's m2r, whatever is installed
sys.path.insert(0, str(REPO / "bench"))

import train_speed  # noqa: E402  (the variants, random DA-CLIP weights and the official figure)
from m2r.atomic import write_json_atomically  # noqa: E402
from m2r.engine.monitor import StepTimer  # noqa: E402

# Most wanted first: the official recipe through our engine, bf16 ZeRO 2 with channels_last (eager: no compile to
# wait for), the same compiled (the fast faithful variant), the faithful memory-target candidate (compiled,
# AC(full_res); docs/BENCHMARKS.md), the plus recipe's (eager).
GPU_ROWS = ("fp32-eager", "bf16-eager", "bf16-compiled", "bf16-compiled-ac-full-res", "plus-bf16-ac-full-res")
# The smoke rows: the tiny fp32 variant at ZeRO 1, and the fast settings' engine path at ZeRO 2, compiled with the
# eager backend (dynamo captures the forward under DeepSpeed's hooks as on the GPU; aot_eager would add 20 s of
# tracing on this CPU, inductor minutes).
SMOKE_VARIANTS = [train_speed.SMOKE_VARIANTS[0],
                  replace(train_speed.SMOKE_VARIANTS[0], key="tiny-bf16-compiled", bf16=True, channels_last=True,
                          compile="eager", name="tiny bf16 + channels_last + compile(eager)")]
PRETRAIN_CONFIGS = {"m2restore": "configs/pretrain/m2restore.yaml",
                    "m2restore-plus": "configs/pretrain/m2restore-plus.yaml", "tiny": "configs/pretrain/tiny-test.yaml"}
RANDOM_CLIP = Path("/tmp/m2r-bench/daclip_random.pt")
# Where no shards exist (the GPU machine); one validation crop per type keeps the start short.
BENCH_DATA = ("data.source=builtin", "data.val_samples_per_type=1", "run.tensorboard=false", "run.progress_bar=false",
              "train.grad_accum=1")
SYNTHETIC_PHOTOS, SYNTHETIC_SIDE = 12, 320   # larger than the recipes' 224 crop


def bench_data(scratch: Path) -> List[str]:
    """Every row's data settings: the built-in photos, which are scikit-image's; where it does not import (the GPU
    machine's image may lack it: every row would fail at its start), shards of synthetic photos built in `scratch`."""
    try:
        importlib.import_module("skimage.data")
    except ImportError as error:
        shards = write_synthetic_shards(scratch / "synthetic")
        print(f"engine_speed: no scikit-image ({error}): rows train on synthetic shards, {shards}", flush=True)
        kept = [override for override in BENCH_DATA if not override.startswith("data.source=")]
        return [*kept, "data.source=shards", f"data.shards={shards}", f"data.val_shards={shards}"]
    return list(BENCH_DATA)


def write_synthetic_shards(folder: Path, side: int = SYNTHETIC_SIDE) -> Path:
    """Shards of smooth random colour photos of `side` px (training and validation alike) under `folder`; returns
    their directory. tests/test_engine_gpu.py trains on them too."""
    from PIL import Image

    from m2r.shards.build import BuildOptions, build

    photos = folder / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(SYNTHETIC_PHOTOS):
        coarse = torch.rand(1, 3, 8, 8, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic",
                                                align_corners=False)[0].clamp(0, 1)
        Image.fromarray((image * 255).byte().permute(1, 2, 0).numpy()).save(photos / f"photo{index:02d}.png")
    build(BuildOptions(src=[str(photos)], out=str(folder / "shards"), samples_per_shard=4), progress=False)
    return folder / "shards"


def known_variants(smoke: bool) -> list:
    return SMOKE_VARIANTS if smoke else train_speed.GPU_VARIANTS


def engine_overrides(variant: train_speed.Variant) -> List[str]:
    """The variant's settings as the pretraining config's keys: ZeRO 1 in fp32 (the official recipe), ZeRO 2 in
    bf16; the model overrides under model."""
    flag = lambda value: str(bool(value)).lower()   # noqa: E731
    overrides = [f"train.precision={'bf16' if variant.bf16 else 'fp32'}",
                 f"train.zero_stage={2 if variant.bf16 else 1}",
                 f"train.channels_last={flag(variant.channels_last)}",
                 f"train.cudnn_benchmark={flag(variant.cudnn_benchmark)}",
                 f"train.tf32_matmul={flag(variant.tf32_matmul)}",
                 f"train.activation_checkpointing={variant.checkpointing}",
                 f"train.compile={flag(variant.compile)}"]
    if variant.compile:
        overrides.append(f"train.compile_backend={variant.compile}")
    return overrides + [f"model.{override}" for override in variant.overrides]


class WindowTimer(StepTimer):
    """Also keeps the data wait of the whole timed window: a log step's `take` resets the timer's own."""

    def __init__(self):
        super().__init__()
        self.window_data_seconds = 0.0

    def add_data_wait(self, seconds: float) -> None:
        super().add_data_wait(seconds)
        self.window_data_seconds += seconds


def time_engine_steps(run, warmup: int, steps: int) -> Dict[str, float]:
    """`warmup` then `steps` steps of the loop (train_step and _report_step, as Trainer._train takes them)."""
    run.engine.train()
    timer = WindowTimer()
    for _ in range(warmup):
        run._report_step(run.train_step(timer), timer)
    train_speed.sync(run.device)
    timer = WindowTimer()
    start = time.perf_counter()
    for _ in range(steps):
        run._report_step(run.train_step(timer), timer)
    train_speed.sync(run.device)
    seconds = (time.perf_counter() - start) / steps
    return {"ms_per_step": 1e3 * seconds, "data_wait_share": timer.window_data_seconds / (seconds * steps)}


def measure_row(variant: train_speed.Variant, args, overrides: List[str]) -> dict:
    """One row, in this process: build the pretraining run of `variant`, warm up, time."""
    from m2r import dist
    from m2r.config import load_config
    from m2r.engine.config import PretrainConfig
    from m2r.engine.deepspeed_config import images_per_step
    from m2r.engine.trainer import Trainer

    config = PRETRAIN_CONFIGS[variant.config]
    cfg = load_config(PretrainConfig, REPO / config, overrides)
    run = Trainer(cfg, dist.discover_dist_env())
    try:
        warmup = args.warmup + (1 if variant.compile else 0)   # the first compiled steps compile
        timed = time_engine_steps(run, warmup, args.steps)
    finally:
        run._stream_iter.close()   # the data workers
    images = images_per_step(cfg.train, 1)
    row = {"variant": variant.name, "key": variant.key, "config": config, "overrides": overrides,
           "precision": cfg.train.precision, "zero_stage": cfg.train.zero_stage, "images_per_step": images,
           "grad_accum": cfg.train.grad_accum, "crop": cfg.train.crop, "ema": cfg.train.ema_decay > 0,
           "activation_checkpointing": run.activation_checkpointing, **timed,
           "img_per_s": images / (timed["ms_per_step"] / 1e3),
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if run.device.type == "cuda" else None,
           "scan_path": train_speed.scan_path(run.engine.module, run.device), "variant_settings": asdict(variant)}
    dist.destroy_process_group()
    return row


def reference_figures(paths: List[Path]) -> Dict[str, float]:
    """img/s by variant name from bench/train_speed.py JSON files (rows that failed left out)."""
    figures = {}
    for path in paths:
        for key, value in json.loads(path.read_text()).items():
            if key.startswith("train/") and isinstance(value, dict) and "img_per_s" in value:
                figures[key[len("train/"):]] = value["img_per_s"]
    return figures


def compared(row: dict, references: Dict[str, float]) -> dict:
    """The row's img/s against its variant's plain-PyTorch figure, else against the official recipe's."""
    if row["variant"] in references:
        basis, img_per_s = "plain PyTorch, same variant (bench/train_speed.py)", references[row["variant"]]
    else:
        basis, img_per_s = "official recipe, official code, H100", train_speed.OFFICIAL_IMG_PER_S
    return {"vs": basis, "vs_img_per_s": img_per_s, "x_vs": row["img_per_s"] / img_per_s}


def run_row_in_child(variant: train_speed.Variant, args, overrides: List[str], scratch: Path) -> dict:
    """`measure_row` in a process of its own; its error, last output lines included, if it fails."""
    out = scratch / f"{variant.key}.json"
    command = [sys.executable, __file__, "--child", variant.key, "--child-json", str(out), "--steps", str(args.steps),
               "--warmup", str(args.warmup), *(["--smoke"] if args.smoke else []), *overrides]
    # --smoke rows are CPU rows on a GPU machine too (no peak memory, the torch scan: what its test checks)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if args.smoke else None
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.row_timeout, env=env)
    sys.stdout.write(result.stdout[-2000:])
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(f"row process exit {result.returncode}: {(result.stdout + result.stderr)[-1500:]}")
    return json.loads(out.read_text())


def markdown(rows: List[dict]) -> str:
    """The rows' table; their names are train_speed's variants', whose AdamW the engine's replaces (below)."""
    lines = ["| variant | precision, ZeRO | images/step | ms/step | img/s | peak GB | data wait % | x vs | vs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['precision']}, {r['zero_stage']} | {r['images_per_step']} "
                     f"| {r['ms_per_step']:.1f} | {r['img_per_s']:.2f} | {train_speed.gb_text(r['peak_gb'])} "
                     f"| {100 * r['data_wait_share']:.1f} | {r['x_vs']:.2f} | {r['vs']} ({r['vs_img_per_s']:.2f}) |")
    lines.append("Every row steps torch's AdamW under DeepSpeed ZeRO (not fused, whatever the variant's name says).")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]]):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny pretraining run on CPU, under a minute")
    parser.add_argument("--variants", default="",
                        help="comma-separated bench/train_speed.py variant keys, run in that order (default: "
                             f"{','.join(GPU_ROWS)}; --smoke: {','.join(v.key for v in SMOKE_VARIANTS)})")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps timed per row")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing (compiled rows: +1)")
    parser.add_argument("--reference", type=Path, action="append", default=[],
                        help="bench/train_speed.py JSON (repeatable): compare each row with its variant's figure")
    parser.add_argument("--row-timeout", type=float, default=900, help="seconds a row's process may take")
    parser.add_argument("--json", type=Path, help="write the rows here (after each one)")
    parser.add_argument("--table", type=Path,
                        help="measure nothing: print this earlier --json's table, compared with --reference files")
    parser.add_argument("--child", help=argparse.SUPPRESS)        # the row this process measures
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args, extra = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        variant = train_speed.variant_named(args.child, known_variants(args.smoke))
        write_json_atomically(args.child_json, measure_row(variant, args, extra))
        return
    if args.table:   # e.g. the GPU machine's JSON against train_speed's from another device call
        references = reference_figures(args.reference)
        rows = json.loads(args.table.read_text())["rows"].values()
        print(markdown([{**row, **compared(row, references)} for row in rows if "error" not in row]))
        return
    if not args.smoke and not torch.cuda.is_available():
        # on the GPU machine this is CUDA failing to initialise: it should cost seconds of the device window
        raise SystemExit("engine_speed: no CUDA device; run with --smoke on a CPU")
    if args.smoke:
        args.steps, args.warmup = 2, 1
    keys = args.variants.split(",") if args.variants else [v.key for v in SMOKE_VARIANTS] if args.smoke else GPU_ROWS
    variants = [train_speed.variant_named(key, known_variants(args.smoke)) for key in keys]
    references = reference_figures(args.reference)
    # Random DA-CLIP weights cost the time of the released ones (the tiny model has its own random CLIP).
    clip = [] if args.smoke else [f"model.clip.weights={train_speed.write_random_clip(RANDOM_CLIP)}"]
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke
               else platform.processor() or "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "steps": args.steps, "warmup": args.warmup, "rows": {}}
    print(f"engine_speed on {results['device']}, torch {results['torch']}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="m2r-engine-speed-"))
    try:
        data = bench_data(scratch)
        for variant in variants:
            overrides = [*data, f"run.dir={scratch / variant.key}", *clip, *engine_overrides(variant), *extra]
            results["rows"][variant.key] = measured_row(variant, args, overrides, scratch, references)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomically(args.json, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(markdown([row for row in results["rows"].values() if "error" not in row]))


def measured_row(variant: train_speed.Variant, args, overrides: List[str], scratch: Path,
                 references: Dict[str, float]) -> dict:
    """The row, compared; its error instead when it failed (outside --smoke: the other rows still run)."""
    try:
        row = run_row_in_child(variant, args, overrides, scratch)
    except Exception as exc:
        if args.smoke:
            raise
        row = {"variant": variant.name, "key": variant.key, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"  {variant.name}: {row['error']}", flush=True)
        return row
    row.update(compared(row, references))
    print(f"  {variant.name}: {row['ms_per_step']:.1f} ms/step, {row['img_per_s']:.2f} img/s, peak "
          f"{train_speed.gb_text(row['peak_gb'])} GB, data wait {100 * row['data_wait_share']:.1f}%, "
          f"{row['x_vs']:.2f}x {row['vs']}", flush=True)
    return row


if __name__ == "__main__":
    main()
