"""`python -m m2r.shards build ...` / `python -m m2r.shards inspect DIR`.

`build --recipe shards/recipes/NAME.yaml` reads the options from a recipe (keys are the long option
names with underscores); options given on the command line win over the recipe, and a mode given
there (`--clean-only` or `--degradations`) replaces the recipe's mode.
"""
from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from m2r.shards.build import BuildOptions, build
from m2r.shards.inspect import inspect_shards, print_report

BUILD_DEFAULTS = dict(src=None, out=None, clean_only=False, degradations=None, workers=1,
                      samples_per_shard=256, encoding="zstd", max_side=0, seed=0)
MODE_KEYS = ("clean_only", "degradations")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m m2r.shards", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="write WebDataset shards from image folders")
    b.add_argument("--recipe", help="YAML file with default options")
    b.add_argument("--src", action="append", help="image folder (repeatable), searched recursively")
    b.add_argument("--out", help="output shard directory")
    mode = b.add_mutually_exclusive_group()
    mode.add_argument("--clean-only", action="store_true", default=None,
                      help="store targets only (degraded on the fly)")
    mode.add_argument("--degradations", metavar="PRESET", help="store pre-degraded pairs drawn from this preset")
    b.add_argument("--workers", type=int)
    b.add_argument("--samples-per-shard", type=int)
    b.add_argument("--encoding", choices=["zstd", "png"])
    b.add_argument("--max-side", type=int, help="downscale images whose long side exceeds this")
    b.add_argument("--seed", type=int)
    i = commands.add_parser("inspect", help="print counts and verify checksums")
    i.add_argument("dir")
    return parser


def _read_recipe(path: str) -> dict:
    recipe = OmegaConf.to_container(OmegaConf.load(path))
    unknown = sorted(set(recipe) - set(BUILD_DEFAULTS))
    if unknown:
        raise SystemExit(f"{path}: unknown keys {unknown}; allowed {sorted(BUILD_DEFAULTS)}")
    return recipe


def _build_options(args: argparse.Namespace) -> BuildOptions:
    recipe = _read_recipe(args.recipe) if args.recipe else {}
    given = {k: v for k, v in vars(args).items() if k in BUILD_DEFAULTS and v is not None}
    if any(k in given for k in MODE_KEYS):    # a mode on the command line replaces the recipe's
        recipe = {k: v for k, v in recipe.items() if k not in MODE_KEYS}
    merged = {**BUILD_DEFAULTS, **recipe, **given}
    if isinstance(merged["src"], str):
        merged["src"] = [merged["src"]]
    if not merged["src"] or not merged["out"]:
        raise SystemExit("build needs --src and --out (or a recipe giving them)")
    if merged["clean_only"] and merged["degradations"]:
        raise SystemExit("--clean-only and --degradations exclude each other")
    return BuildOptions(src=list(merged["src"]), out=merged["out"], preset=merged["degradations"],
                        workers=merged["workers"], samples_per_shard=merged["samples_per_shard"],
                        encoding=merged["encoding"], max_side=merged["max_side"], seed=merged["seed"])


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        opts = _build_options(args)
        manifest = build(opts)
        print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards, "
              f"{len(manifest['skipped'])} undecodable file(s) skipped -> {opts.out}")
        for entry in manifest["skipped"]:
            print(f"  skipped {entry['path']}: {entry['error']}")
        return 0
    report = inspect_shards(args.dir)
    print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
