r"""Evaluate restored images under the rgb, y and official PSNR/SSIM protocols (see m2r.eval.metrics).

    python -m m2r.evaluate --weights model.safetensors --dataset allweather --root /data/allweather \
        --metrics rgb,y,official --out results/allweather [--sets outdoor_rain,snow100k_l,raindrop_a]
    python -m m2r.evaluate --weights runs/ft/checkpoints --dataset cdd11 --root /data/CDD-11 --out results/cdd11
    accelerate launch --num_processes 8 --mixed_precision bf16 -m m2r.evaluate --weights model.safetensors \
        --dataset cdd11 --root /data/CDD-11 --out results/cdd11            # 8 GPUs, one process each
    accelerate launch --multi_gpu --num_processes 2 -m m2r.evaluate ...     # 2 CPU processes on a machine
                                                                            # without CUDA (gloo)

Runs under Accelerate (m2r.eval.loading.make_accelerator): every process holds the whole model (all
experts, no all-to-all) on `accelerator.device`, takes a contiguous share of the images
(`split_between_processes`) and restores them under `accelerator.autocast()` (`--precision`, or
`accelerate launch --mixed_precision`); the per-image metrics are gathered in image order
(`gather_for_metrics`) and the main process writes `results.json` (per set, per image, and the average
over sets) and `results.md` (the paper's table shape: sets as columns). `accelerate launch --cpu` starts
more than one process only through MPI, hence `--multi_gpu` (torchrun's launcher) for CPU worlds.
Images of any size: reflect-padded to a multiple of 8 and cropped back, or tiled with `--tile`
(overlap blending). Layouts of the datasets: m2r/eval/datasets.py. Weight formats: m2r/eval/loading.py.

    python -m m2r.evaluate --weights runs/m2restore --pretrain-val --out results/m2restore-val

`--pretrain-val` recomputes a pretraining run's validation (its val/* scalars, the val_* records of
metrics.jsonl) from a checkpoint: a run directory (its newest checkpoint), a checkpoint directory or
one tag directory. The run's config.yaml rebuilds its validation set (the same images, crops and
degradation seeds), and the run's weights choice and precision apply (EMA when train.ema_decay > 0,
cast to train.precision as the DeepSpeed engine held them): see m2r/eval/pretrain_validation.py. It
prints the metrics beside the run's record of that step and writes <out>/results.json. Its `--set` takes
the network's keys (clip.weights=..., or model.clip.weights as the run's config.yaml names it) and the run's
`data.` keys (data.val_shards=<where they are now>).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from accelerate import Accelerator

from m2r import dist
from m2r.atomic import atomic_path, atomic_paths, json_text
from m2r.cli import run_main
from m2r.config import ConfigError
from m2r.eval.datasets import (ALLWEATHER_PAPER_SETS, ALLWEATHER_TEST_DIRS, DATASETS, OFFICIAL_TEST_SIZES, Pair,
                               check_pairs, evaluation_sets, read_pair)
from m2r.eval.image_io import as_unit, save_png, with_png_names
from m2r.eval.loading import (add_inference_arguments, load_inference_model, make_accelerator, non_negative_int,
                              parse_inference_arguments, precision_name, require_output_folder)
from m2r.eval.metrics import image_metrics, parse_protocols
from m2r.eval.pretrain_validation import pretraining_checkpoint, recompute_validation, report_lines
from m2r.eval.tiling import restore_image

SET_TITLES = {"outdoor_rain": "Outdoor-Rain", "snow100k_s": "Snow100K-S", "snow100k_l": "Snow100K-L",
              "raindrop_a": "RainDrop", "low": "L", "haze": "H", "rain": "R", "snow": "S", "low_haze": "L+H",
              "low_rain": "L+R", "low_snow": "L+S", "haze_rain": "H+R", "haze_snow": "H+S",
              "low_haze_rain": "L+H+R", "low_haze_snow": "L+H+S"}
DEFAULT_METRICS = "rgb,y,official"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m m2r.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_arguments(parser)
    parser.add_argument("--dataset", choices=DATASETS, help="required unless --pretrain-val")
    parser.add_argument("--root", help="dataset root (layouts: m2r/eval/datasets.py); required unless --pretrain-val")
    parser.add_argument("--pretrain-val", action="store_true",
                        help="recompute a pretraining run's validation (val/* of metrics.jsonl) from --weights, its "
                             "run, checkpoint or tag directory, on the validation set its config.yaml describes")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help="comma-separated: rgb, y, official")
    parser.add_argument("--out", required=True, help="directory for results.json, results.md and images/")
    parser.add_argument("--sets", default="",
                        help="AllWeather test sets, CDD-11 types or a folder's set subfolders (default: AllWeather's "
                             "sets found, CDD-11's 11 types, every set of the folder)")
    parser.add_argument("--limit", type=non_negative_int, default=0, help="first N images per set (0 = all)")
    parser.add_argument("--save-images", action="store_true", help="write restored PNGs to <out>/images/<set>/")
    parser.add_argument("--official-sizes", action="store_true",
                        help="resize the pairs of " + ", ".join(f"{name} to {w}x{h}" for name, (w, h) in
                                                               OFFICIAL_TEST_SIZES.items())
                        + " (input and target, bicubic) as the official test does; "
                          "default: every image at its own size")
    args = parse_inference_arguments(parser, argv)
    if args.pretrain_val:
        not_applying = _benchmark_options_given(args)
        if not_applying:
            parser.error(f"--pretrain-val scores the run's own validation set, with its precision and network: "
                         f"{', '.join(not_applying)} {'does' if len(not_applying) == 1 else 'do'} not apply")
    elif args.dataset is None or args.root is None:
        parser.error("--dataset and --root are required (or --pretrain-val, for a pretraining run's validation)")
    return args


def _benchmark_options_given(args) -> List[str]:
    """The options given that only a benchmark evaluation reads (--set stays: the CLIP file's path)."""
    given = {"--dataset": args.dataset, "--root": args.root, "--sets": args.sets, "--limit": args.limit,
             "--save-images": args.save_images, "--official-sizes": args.official_sizes, "--tile": args.tile,
             "--precision": args.precision, "--model-config": args.model_config,
             "--metrics": args.metrics != DEFAULT_METRICS}
    return [option for option, value in given.items() if value]


@torch.no_grad()
def evaluate_pairs(model, jobs: Sequence[Tuple[Pair, Optional[Path]]], protocols: Sequence[str], args,
                   accelerator: Accelerator) -> List[dict]:
    """Metrics of this process's share of the images: one dict per image (computed on the CPU); with
    --save-images, each restored image under images/ at its job's path."""
    records = []
    for pair, output in jobs:
        lq, gt = read_pair(pair, official_sizes=args.official_sizes)
        lq, gt = as_unit(lq, accelerator.device), as_unit(gt, torch.device("cpu"))
        with accelerator.autocast():
            restored = restore_image(model, lq, tile=args.tile or None, overlap=args.overlap)[0]
        records.append({"set": pair.group, "image": pair.lq.name,
                        **image_metrics(restored.cpu(), gt[0], protocols)})
        if args.save_images:
            save_png(restored, Path(args.out) / "images" / output)
    return records


def averaged_sets(dataset: str, set_names: Sequence[str]) -> List[str]:
    """The sets the average is over: AllWeather's paper average covers Outdoor-Rain, Snow100K-L and
    RainDrop only, so Snow100K-S (when evaluated) is a column of its own outside the average."""
    if dataset == "allweather" and any(name in ALLWEATHER_PAPER_SETS for name in set_names):
        return [name for name in set_names if name in ALLWEATHER_PAPER_SETS]
    return list(set_names)


def paper_sets_left_out(dataset: str, set_names: Sequence[str]) -> List[str]:
    """The paper's averaged sets this evaluation has not scored: its average is not the paper's then."""
    return [name for name in ALLWEATHER_PAPER_SETS if name not in set_names] if dataset == "allweather" else []


def summarize(records: Sequence[dict], set_names: Sequence[str], metric_names: Sequence[str],
              average_over: Sequence[str]) -> dict:
    per_set = {}
    for name in set_names:
        rows = [r for r in records if r["set"] == name]
        per_set[name] = {"count": len(rows), **{m: sum(r[m] for r in rows) / len(rows) for m in metric_names}}
    average = {m: sum(per_set[name][m] for name in average_over) / len(average_over) for m in metric_names}
    images = {name: {r["image"]: {m: r[m] for m in metric_names} for r in records if r["set"] == name}
              for name in set_names}
    return {"sets": per_set, "average": average, "average_over": list(average_over), "images": images}


def _size_note(name: str, official_sizes: bool) -> str:
    """' (720x480)' for a set whose pairs were resized as the official test does, else ''."""
    size = OFFICIAL_TEST_SIZES.get(name) if official_sizes else None
    return f" ({size[0]}x{size[1]})" if size else ""


def _average_title(summary: dict) -> str:
    """'Average', or which sets it covers when it leaves some columns or some of the paper's sets out."""
    left_out = summary["paper_sets_left_out"]
    if len(summary["average_over"]) == len(summary["sets"]) and not left_out:
        return "Average"
    covered = ", ".join(SET_TITLES.get(n, n) for n in summary["average_over"])
    return f"Average ({covered}" + "".join(f"; {SET_TITLES.get(n, n)} not evaluated" for n in left_out) + ")"


def markdown_table(summary: dict, protocols: Sequence[str]) -> str:
    """Sets as columns (as the paper's tables), one row per protocol, cells 'PSNR / SSIM'."""
    names = list(summary["sets"])
    header = (["Protocol"] + [SET_TITLES.get(n, n) + _size_note(n, summary["official_sizes"]) for n in names]
              + [_average_title(summary)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for protocol in protocols:
        cells = [summary["sets"][n] for n in names] + [summary["average"]]
        lines.append(f"| {protocol} | " + " | ".join(
            f"{c[f'psnr_{protocol}']:.2f} / {c[f'ssim_{protocol}']:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(records: Sequence[dict], sets: Sequence[str], protocols: Sequence[str], args) -> None:
    metric_names = [f"{kind}_{p}" for p in protocols for kind in ("psnr", "ssim")]
    summary = dict(summarize(records, sets, metric_names, averaged_sets(args.dataset, sets)),
                   paper_sets_left_out=paper_sets_left_out(args.dataset, sets), official_sizes=args.official_sizes)
    report = {"weights": args.weights, "dataset": args.dataset, "root": args.root, "metrics": list(protocols),
              **summary}
    table = markdown_table(summary, protocols)
    print(table, end="", flush=True)   # first: the numbers survive a write that fails
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_paths(out / "results.json", out / "results.md") as (json_tmp, table_tmp):
        json_tmp.write_text(json_text(report))
        table_tmp.write_text(table)


def listed_sets(args) -> Dict[str, List[Pair]]:
    """The pairs of each set to evaluate (the first --limit of each), their headers checked; --out checked."""
    require_output_folder(args.out)
    sets = evaluation_sets(args.dataset, args.root, [s for s in args.sets.split(",") if s] or None)
    absent = paper_sets_left_out(args.dataset, list(sets))
    if absent and not args.sets:   # the average would silently leave out a column of the paper's table
        dist.print0(f"evaluate: warning: AllWeather test sets not found under {args.root}: " + "; ".join(
            f"{name} (looked for {', '.join(ALLWEATHER_TEST_DIRS[name])})" for name in absent)
            + f"; the average covers only {', '.join(n for n in ALLWEATHER_PAPER_SETS if n in sets) or 'none'}")
    if args.limit:
        sets = {name: pairs[: args.limit] for name, pairs in sets.items()}
    if args.official_sizes and not set(sets) & set(OFFICIAL_TEST_SIZES):
        raise ConfigError(f"--official-sizes: none of the sets evaluated ({', '.join(sets)}) is resized by the "
                          f"official test (only {', '.join(OFFICIAL_TEST_SIZES)})")
    check_pairs([pair for pairs in sets.values() for pair in pairs])
    return sets


def evaluate_pretraining_validation(args) -> int:
    """--pretrain-val: the run's validation at the checkpoint, printed and written to <out>/results.json."""
    out = require_output_folder(args.out)
    accelerator = make_accelerator(None)
    ref = dist.on_rank0(lambda: pretraining_checkpoint(args.weights))
    accelerator.print(f"evaluate: the pretraining validation of {ref.path} on {accelerator.num_processes} "
                      "process(es)", flush=True)
    result = recompute_validation(ref, accelerator.device, args.overrides)
    if accelerator.is_main_process:
        print(report_lines(result), end="", flush=True)   # first: the numbers survive a write that fails
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "results.json") as json_tmp:
            json_tmp.write_text(json_text({"weights": args.weights, **result}))
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pretrain_val:
        return evaluate_pretraining_validation(args)
    protocols = parse_protocols(args.metrics)
    accelerator = make_accelerator(args.precision)
    # Process 0 lists (and checks) the images for all: processes listing a shared folder themselves could
    # disagree (a stale NFS listing) and score some images twice or not at all.
    sets = dist.on_rank0(lambda: listed_sets(args))
    pairs = [pair for pairs in sets.values() for pair in pairs]
    # <set>/<input stem>.png, unless two inputs of a set share a stem (a.jpg, a.png): then a.jpg.png
    outputs = ([output for _, output in with_png_names([(pair.lq, Path(pair.group) / pair.lq.name) for pair in pairs])]
               if args.save_images else [None] * len(pairs))
    jobs = list(zip(pairs, outputs))
    named = ", ".join(name + _size_note(name, args.official_sizes) for name in sets)
    accelerator.print(f"evaluate: {len(jobs)} images in {len(sets)} sets ({named}) on "
                      f"{accelerator.num_processes} process(es), metrics {','.join(protocols)}, "
                      f"precision {precision_name(accelerator)}", flush=True)
    model = load_inference_model(args.weights, accelerator.device, args.model_config, args.overrides)
    with accelerator.split_between_processes(jobs) as share:
        records = evaluate_pairs(model, share, protocols, args, accelerator)
    records = accelerator.gather_for_metrics(records, use_gather_object=True)
    if accelerator.is_main_process:
        write_results(records, list(sets), protocols, args)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_main(main)
