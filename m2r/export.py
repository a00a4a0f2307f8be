"""Merge a sharded DeepSpeed MoE checkpoint into one safetensors file for single-process inference.

    python -m m2r.export runs/demo/checkpoints runs/demo/model.safetensors        # `latest` tag
    python -m m2r.export runs/m2restore/checkpoints/step00002000 runs/m2restore/ema.safetensors --ema   # a tag

DeepSpeed's `zero_to_fp32.py` cannot read MoE checkpoints, so the merge is ours:
- dense weights come from `mp_rank_00_model_states.pt`, each expert from its
  `layer_<L>_expert_<E>_...` file (already keyed by global expert id);
- in bf16/fp16 runs those files hold rounded copies; the fp32 master weights live only in the ZeRO
  optimizer shards, whose per-rank fragments are stitched back together (rank order within each
  parameter's data-parallel group) and replace them;
- `--ema` writes the EMA weights instead (merged from the tag's `ema_rank<R>.pt` files).
The resolved config is written beside the weights, suffix `.yaml` (model.safetensors -> model.yaml), from which
`m2r.eval.loading.load_inference_model(path, device)` rebuilds the network with ep_size 1.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from m2r.atomic import atomic_paths, default_file_mode
from m2r.cli import run_main
from m2r.config import ConfigError
from m2r.engine.checkpoint import (DENSE_FILE, EXPERT_FILE, CheckpointRef, checkpoint_at, load_ema_states,
                                   missing_experts_problem)
from m2r.engine.zero_state import MASTER, stitched_zero_state
from m2r.models.convert import CheckpointMismatch, read_checkpoint


def _load(path: Path):
    # DeepSpeed pickles its config objects beside the tensors: weights_only=True cannot read them.
    return read_checkpoint(path, weights_only=False)


def merged_module_state(ref: CheckpointRef) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Dense + every expert file, as saved (the module's dtype); also returns the run's resolved config
    (its config.yaml)."""
    dense = _load(ref.path / DENSE_FILE)
    state = dict(dense["module"])
    expert_files = {tuple(map(int, match.groups())): path for path in ref.path.iterdir()
                    if (match := EXPERT_FILE.match(path.name))}
    _require_every_expert(ref, expert_files, dense["num_experts"])
    for _, path in sorted(expert_files.items()):
        state.update(_load(path))
    return state, ref.saved_config()


def _require_every_expert(ref: CheckpointRef, expert_files: Dict[Tuple[int, int], Path],
                          experts_per_layer: List[int]) -> None:
    """`experts_per_layer`: DeepSpeed's record of each MoE layer's expert count, in the dense file."""
    missing = [f"layer {layer} expert {expert}" for layer, count in enumerate(experts_per_layer)
               for expert in range(count) if (layer, expert) not in expert_files]
    if missing:
        raise CheckpointMismatch(f"{missing_experts_problem(ref, missing)}; export an older one")


def fp32_master_weights(ref: CheckpointRef, ep_size: int, num_experts: int) -> Dict[str, torch.Tensor]:
    """Flat fp32 parameters stitched from the ZeRO 1/2 shards, keyed by global name (shape not restored)."""
    return {name: state[MASTER] for name, state in stitched_zero_state(ref, ep_size, num_experts).items()}


def export_state_dict(ref: CheckpointRef, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The full fp32 state dict (experts by global id) and the run's resolved config."""
    state, config = merged_module_state(ref)
    if use_ema:
        replacements = load_ema_states(ref)
        if not replacements:
            raise FileNotFoundError(f"--ema: {ref.path} holds no ema_rank*.pt files (train.ema_decay was 0)")
    else:
        replacements = fp32_master_weights(ref, ref.topology().ep_size, config["model"]["moe"]["num_experts"])
    exported = {}
    for name, tensor in state.items():
        if name in replacements:
            master = replacements[name]
            if master.numel() != tensor.numel():
                raise ValueError(f"{ref.path}: {name} has {master.numel()} fp32 values, expected {tensor.numel()}")
            tensor = master.view(tensor.shape)
        exported[name] = tensor.float().contiguous().clone() if tensor.is_floating_point() else tensor.clone()
    return exported, config


def config_path_for(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".yaml")


def stored_model_config(weights_path: Path) -> Optional[dict]:
    """The `model` section of the config written beside exported weights; None when there is none
    (weights from elsewhere)."""
    config_file = config_path_for(weights_path)
    stored = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else None
    return stored.get("model") if isinstance(stored, dict) else None


def export(checkpoint: str, out: str, use_ema: bool = False, companions: Optional[Dict[Path, str]] = None) -> Path:
    """The checkpoint's weights as `out` (safetensors) with their network config beside it (and
    `companions`, more text files by path, e.g. finetuning's best_<metric>.json), written together."""
    from safetensors.torch import save_file

    if not out.endswith(".safetensors"):
        raise ConfigError(f"out {out!r}: the export is a safetensors file; name it <name>.safetensors")
    ref = checkpoint_at(checkpoint, "checkpoint")
    state, config = export_state_dict(ref, use_ema)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # A failed write (a full disk) leaves the earlier pair, not new weights beside an old network config.
    extra_files = list((companions or {}).items())   # (path, text) pairs, in a fixed order
    with atomic_paths(out_path, config_path_for(out_path), *(path for path, _ in extra_files)) as (
            tmp, config_tmp, *extra_tmps):
        save_file(state, str(tmp), metadata={"source": str(ref.path), "weights": "ema" if use_ema else "fp32"})
        os.chmod(tmp, default_file_mode())   # safetensors writes 0600 files, unreadable to teammates
        config_tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config), resolve=True))
        for extra_tmp, (_, text) in zip(extra_tmps, extra_files):
            extra_tmp.write_text(text)
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2r.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory (its `latest` tag) or one tag directory")
    parser.add_argument("out", help="output .safetensors file; the config goes beside it with suffix .yaml")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out, args.ema)
    print(f"wrote {out} and {config_path_for(out)}")
    return 0


if __name__ == "__main__":
    run_main(main)
