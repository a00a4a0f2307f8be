"""Load M2Restore for inference, whole in every process (all experts local, ep_size 1), from any weights
format, and set up the Accelerate process world that `m2r.evaluate` and `m2r.restore` share.

    <dir>                a DeepSpeed checkpoint of any topology (its `latest` tag, or one tag directory):
                         merged in memory as `python -m m2r.export` would; the config is the run's
    <file>.safetensors   an exported file; its config is `<file>.yaml` beside it (`m2r.export`)
    <file>.ckpt/.pth/.pt an official M2Restore checkpoint (Lightning or bare state dict), via the
                         converter; needs --model-config (e.g. m2r:model/m2restore.yaml, a shipped config)
`--model-config` replaces the stored model config and `overrides` (key=value, e.g.
clip.weights=/data/daclip_ViT-B-32.pt) adjust it, since a file's CLIP path is the training machine's.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

from m2r import dist, failure_watch
from m2r.config import ConfigError, load_config
from m2r.models.config import MIN_SIZE, OFFICIAL_SUFFIXES, SIZE_MULTIPLE

ACCELERATE_PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # --precision -> Accelerate's mixed_precision


def non_negative_int(text: str) -> int:
    """argparse type; argparse reports the message as `argument --x: <message>`."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def tile_side(text: str) -> int:
    value = non_negative_int(text)
    if value % SIZE_MULTIPLE or 0 < value < MIN_SIZE:
        raise argparse.ArgumentTypeError(f"{text} is not 0 (whole images) or a multiple of {SIZE_MULTIPLE} of at "
                                         f"least {MIN_SIZE}")
    return value


def require_output_folder(out: str) -> Path:
    """--out, the folder outputs go to (created when missing): refused before any work when it is a file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file: name a folder (it is created when missing)")
    return path


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `m2r.evaluate` and `m2r.restore`: weights, tiling, precision, model config."""
    parser.add_argument("--weights", required=True,
                        help="checkpoint dir, .safetensors export or official .ckpt/.pth/.pt")
    parser.add_argument("--tile", type=tile_side, default=0,
                        help=f"tile side for large images (a multiple of {SIZE_MULTIPLE}, at least {MIN_SIZE}; "
                             "0 = whole)")
    parser.add_argument("--overlap", type=non_negative_int, default=32,
                        help="tile overlap in pixels (below --tile)")
    parser.add_argument("--precision", default=None, choices=tuple(ACCELERATE_PRECISIONS),
                        help="autocast dtype (default: `accelerate launch --mixed_precision`, else fp32); "
                             "fp16 is a GPU-only autocast, bf16 autocasts on CPU too")
    parser.add_argument("--model-config", default=None,
                        help="model YAML, e.g. m2r:model/m2restore.yaml (required for official checkpoints)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, e.g. clip.weights=/data/daclip_ViT-B-32.pt")


def parse_inference_arguments(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.tile and args.overlap >= args.tile:
        parser.error(f"--overlap {args.overlap} must be below --tile {args.tile}")
    return args


def make_accelerator(precision: Optional[str], cpu: bool = False) -> Accelerator:
    """This process's place in an `accelerate launch` world (a plain run is a world of one). Without CUDA
    the processes are CPU ones: Accelerate forms a multi-process CPU world (gloo) only when told cpu=True.
    In a world of several, a process that fails ends the others (m2r.failure_watch, as in training): they
    would wait for it in their next gather, on NCCL until its timeout, where no launcher's agent ends them."""
    on_cpu = cpu or not torch.cuda.is_available()
    if precision == "fp16" and on_cpu:   # Accelerate would compute in fp32 and call it fp16
        raise ConfigError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    accelerator = Accelerator(cpu=on_cpu,
                              mixed_precision=None if precision is None else ACCELERATE_PRECISIONS[precision])
    if dist.is_multi_rank():
        failure_watch.start()
    return accelerator


def precision_name(accelerator: Accelerator) -> str:
    """The --precision name of the accelerator's autocast (Accelerate calls fp32 'no')."""
    names = {mixed: name for name, mixed in ACCELERATE_PRECISIONS.items()}
    return names.get(accelerator.mixed_precision, accelerator.mixed_precision)


def _stored_weights(path: Path, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(state dict with experts by global id, stored model config or None); `use_ema`: a checkpoint's EMA."""
    from m2r.engine.checkpoint import META_FILE, checkpoint_at
    from m2r.export import export_state_dict, stored_model_config
    from m2r.models.convert import official_to_m2r, read_checkpoint

    if not path.exists():
        raise FileNotFoundError(f"--weights {path}: no such file or directory")
    if path.is_file() and (path.parent / META_FILE).is_file():   # DeepSpeed's files hold parts of the network
        raise ConfigError(f"--weights {path} is one file of an m2r checkpoint: pass its directory, {path.parent}")
    if path.is_dir():
        state, config = export_state_dict(checkpoint_at(str(path), "--weights"), use_ema)
        return state, config["model"]
    if use_ema:   # an export holds one set of weights, which `m2r.export --ema` chose
        raise ConfigError(f"--weights {path}: the EMA weights are read from a checkpoint directory, not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"--weights {path}: file not found")
        return load_file(str(path)), stored_model_config(path)
    if path.suffix in OFFICIAL_SUFFIXES:
        return official_to_m2r(read_checkpoint(path)), None
    raise ConfigError(f"--weights {path}: expected a checkpoint directory, a .safetensors file or an official "
                      f"checkpoint ({', '.join(OFFICIAL_SUFFIXES)})")


def inference_model_config(stored: Optional[dict], model_config: Optional[str],
                           overrides: Sequence[str], source: str) -> DictConfig:
    from m2r.models.config import ModelConfig, check_model_settings

    if model_config is None and stored is None:
        raise ConfigError(f"{source} carries no model config: pass --model-config m2r:model/<name>.yaml "
                          "(a shipped network: m2restore, m2restore-plus, tiny) or a file of your own")
    every_expert_local = [*overrides, "moe.ep_size=1"]
    model = load_config(ModelConfig, model_config, every_expert_local, base=None if model_config else stored)
    check_model_settings(model, prefix="")   # --set takes the model keys bare
    return model


def load_inference_model(weights: str, device: torch.device, model_config: Optional[str] = None,
                         overrides: Sequence[str] = (), use_ema: bool = False):
    """M2Restore in eval mode on `device` with every expert local; strict load, mismatches named.
    `use_ema`: a checkpoint directory's EMA weights instead of its trained ones."""
    from m2r.models.convert import check_fits
    from m2r.models.m2restore import build_model

    path = Path(weights)
    state, stored = _stored_weights(path, use_ema)
    model = build_model(inference_model_config(stored, model_config, overrides, str(path)))
    check_fits(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
