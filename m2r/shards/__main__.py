"""`python -m m2r.shards build ...` / `python -m m2r.shards inspect DIR`.

`build --recipe shards/recipes/NAME.yaml` reads the options from a recipe (keys are the long option
names with underscores); options given on the command line win over the recipe, and a mode given
there (`--clean-only` or `--degradations`) replaces the recipe's mode.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Callable

import yaml
from omegaconf import OmegaConf

from m2r.cli import run_main
from m2r.config import ConfigError
from m2r.data.presets import PRESETS
from m2r.data.shard_format import IMAGE_EXTENSIONS, MAX_SIDE
from m2r.shards.build import DEFAULT_SAMPLES_PER_SHARD, BuildOptions, build
from m2r.shards.inspect import inspect_shards, print_report

# BuildOptions' own defaults, and the command's keys that are not options (`preset` is --degradations there)
BUILD_DEFAULTS = dict(src=None, out=None, clean_only=False, degradations=None,
                      **{f.name: f.default for f in fields(BuildOptions)
                         if f.default is not MISSING and f.name != "preset"})
MODE_KEYS = ("clean_only", "degradations")
ENCODINGS = tuple(IMAGE_EXTENSIONS)
LEAST_VALUES = dict(workers=1, samples_per_shard=1, max_side=0, seed=0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m m2r.shards", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="write WebDataset shards from image folders")
    b.add_argument("--recipe", help="YAML file with default options")
    b.add_argument("--src", action="append", help="image folder (repeatable), searched recursively")
    b.add_argument("--out", help="output shard directory")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--clean-only", action="store_true", default=None,
                      help="store targets only, degraded on the fly by the run's data.preset (the default mode)")
    mode.add_argument("--degradations", metavar="PRESET",
                      help=f"store pre-degraded pairs drawn from this preset: {', '.join(PRESETS)}")
    b.add_argument("--workers", type=int, help=f"build processes (default: {BUILD_DEFAULTS['workers']})")
    b.add_argument("--samples-per-shard", type=int,
                   help=f"images per shard (default: {DEFAULT_SAMPLES_PER_SHARD}); each data worker "
                        "fills its shuffle buffer with whole shards")
    b.add_argument("--encoding", choices=ENCODINGS,
                   help=f"lossless image encoding (default: {BUILD_DEFAULTS['encoding']})")
    b.add_argument("--max-side", type=int,
                   help=f"downscale images whose long side exceeds this (default: {BUILD_DEFAULTS['max_side']}: every "
                        "image kept at its size)")
    b.add_argument("--seed", type=int, help=f"seed of the pre-degraded inputs (default: {BUILD_DEFAULTS['seed']})")
    i = commands.add_parser("inspect", help="print counts and verify checksums")
    i.add_argument("dir")
    return parser


def _read_recipe(path: str) -> dict:
    try:
        recipe = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"recipe {path}: cannot read it: {error}") from error
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of options, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(BUILD_DEFAULTS))
    if unknown:
        raise ConfigError(f"recipe {path}: unknown keys {unknown}; allowed {sorted(BUILD_DEFAULTS)}")
    return recipe


def _build_options(args: argparse.Namespace) -> BuildOptions:
    recipe = _read_recipe(args.recipe) if args.recipe else {}
    given = {k: v for k, v in vars(args).items() if k in BUILD_DEFAULTS and v is not None}
    if any(k in given for k in MODE_KEYS):    # a mode on the command line replaces the recipe's
        recipe = {k: v for k, v in recipe.items() if k not in MODE_KEYS}
    merged = {**BUILD_DEFAULTS, **recipe, **given}
    if isinstance(merged["src"], str):
        merged["src"] = [merged["src"]]

    def origin(key: str) -> str:
        """Where a value came from, as errors name it: the recipe file and key, or the option."""
        return f"recipe {args.recipe}: {key}" if key in recipe and key not in given else f"--{key.replace('_', '-')}"

    _check_values(merged, origin)
    return BuildOptions(src=list(merged["src"]), out=merged["out"], preset=merged["degradations"],
                        workers=merged["workers"], samples_per_shard=merged["samples_per_shard"],
                        encoding=merged["encoding"], max_side=merged["max_side"], seed=merged["seed"])


def _check_values(merged: dict, origin: Callable[[str], str]) -> None:
    """Refuse bad values before any work, naming the option or the recipe key that gave them."""
    if not merged["src"] or not merged["out"]:
        raise ConfigError("build needs --src and --out (or a recipe giving them)")
    if merged["clean_only"] and merged["degradations"]:
        raise ConfigError(f"{origin('clean_only')} and {origin('degradations')} exclude each other")
    if merged["degradations"] is not None and merged["degradations"] not in PRESETS:
        raise ConfigError(f"{origin('degradations')} {merged['degradations']!r}: unknown preset; "
                          f"choose one of {', '.join(PRESETS)}")
    if merged["encoding"] not in ENCODINGS:
        raise ConfigError(f"{origin('encoding')} {merged['encoding']!r}: choose one of {', '.join(ENCODINGS)}")
    for key, least in LEAST_VALUES.items():
        value = merged[key]
        if type(value) is not int or value < least:
            raise ConfigError(f"{origin(key)} {value!r}: expected an integer >= {least}")
    if merged["max_side"] > MAX_SIDE:   # every image it would leave larger would be skipped
        raise ConfigError(f"{origin('max_side')} {merged['max_side']}: the shard format holds at most {MAX_SIDE} px "
                          f"per side; choose {MAX_SIDE} or less (0 keeps every image at its size)")
    for src in merged["src"]:
        if not Path(src).is_dir():
            raise ConfigError(f"{origin('src')} {src}: not a directory")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        opts = _build_options(args)
        manifest = build(opts)
        shards = len(manifest["shards"])
        print(f"{manifest['samples']} samples in {shards} shards, "
              f"{len(manifest['skipped'])} undecodable file(s) skipped -> {opts.out}")
        for entry in manifest["skipped"]:
            print(f"  skipped {entry['path']}: {entry['error']}")
        return 0
    report = inspect_shards(args.dir)
    print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    run_main(main)
