"""Parameter counts of an M2Restore config, without CLIP weights and without allocating memory.

    python -m m2r.models.summary --config configs/model/m2restore.yaml [key=value ...]
    python -m m2r.models.summary --config configs/pretrain/m2restore-xl.yaml   # a training config's network

Prints the trainable and frozen parameters of every top-level module, the frozen CLIP prior counted
separately (built on the meta device, so no weights file is needed; experts are counted over the
whole expert-parallel group), and as its last line
`trainable_params: N` (46830041 for the faithful config).
"""
import argparse
from typing import Dict, List, Tuple

import open_clip
import torch
from omegaconf import DictConfig, OmegaConf

from m2r.cli import run_main
from m2r.config import config_path, load_config, read_merged_yaml
from m2r.models.clip_prior import build_daclip, clip_architecture
from m2r.models.config import ModelConfig, check_model_settings
from m2r.models.m2restore import build_model


def module_parameter_counts(model: torch.nn.Module) -> List[Tuple[str, int, int]]:
    """(top-level module name, trainable, frozen) for every direct child, in definition order."""
    rows = []
    for name, child in model.named_children():
        trainable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in child.parameters() if not p.requires_grad)
        rows.append((name, trainable, frozen))
    return rows


def clip_prior_parameter_count(clip_cfg) -> int:
    """Parameters of the frozen CLIP backbone that `clip_cfg` describes, counted on the meta device."""
    architecture = clip_architecture(clip_cfg)
    with torch.device("meta"):
        backbone = (open_clip.CLIP(**architecture) if clip_cfg.kind == "openclip"
                    else build_daclip(architecture))
    return sum(p.numel() for p in backbone.parameters())


def summarize(cfg) -> Dict[str, object]:
    """Counts over all experts: the network is built as if ep_size were 1 (no process group needed)."""
    cfg = OmegaConf.merge(cfg, {"moe": {"ep_size": 1}})
    with torch.device("meta"):
        model = build_model(cfg, with_clip_prior=False)
    rows = module_parameter_counts(model)
    never_trained = set(model.unused_parameter_names())
    return {"rows": rows,
            "trainable": sum(row[1] for row in rows),
            "frozen": sum(row[2] for row in rows),
            "never_trained": sum(p.numel() for name, p in model.named_parameters() if name in never_trained)}


def format_summary(summary: Dict[str, object], clip_line: str) -> str:
    width = max(len(name) for name, _, _ in summary["rows"])
    lines = [f"{'module':<{width}}  {'trainable':>12}  {'frozen':>12}"]
    lines += [f"{name:<{width}}  {trainable:>12,}  {frozen:>12,}"
              for name, trainable, frozen in summary["rows"]]
    lines += [f"{'total':<{width}}  {summary['trainable']:>12,}  {summary['frozen']:>12,}",
              f"of which never trained (unused AFLB layers): {summary['never_trained']:,}",
              clip_line,
              f"trainable_params: {summary['trainable']}"]
    return "\n".join(lines)


TRAINING_SECTIONS = ("model", "data", "train", "run", "init")   # top-level keys of a training config


def _training_schema(raw: DictConfig):
    """FinetuneConfig when the file sets a key only finetuning has (`init`, `train.epochs`, `data.root`...),
    else PretrainConfig."""
    from m2r.engine.config import FinetuneConfig, PretrainConfig

    finetune, pretrain = OmegaConf.structured(FinetuneConfig), OmegaConf.structured(PretrainConfig)
    for section, values in raw.items():
        if section not in finetune:
            continue
        if section not in pretrain:
            return FinetuneConfig
        if isinstance(values, DictConfig) and any(key in finetune[section] and key not in pretrain[section]
                                                  for key in values):
            return FinetuneConfig
    return PretrainConfig


def network_config(path: str, overrides: List[str]):
    """The model config in `path`: a model config file, or the `model` section of a training config (one
    with a `model`, `data`, `train`, `run` or `init` section; finetune configs are told by their own keys)."""
    raw = read_merged_yaml(path) if config_path(path).is_file() else OmegaConf.create()
    if not any(section in raw for section in TRAINING_SECTIONS):
        return load_config(ModelConfig, path, overrides)
    schema = _training_schema(raw)
    return load_config(schema, path, [f"model.{override}" for override in overrides]).model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True,
                        help="model config YAML (configs/model/*.yaml, shipped as m2r:model/*.yaml), "
                             "or a pretrain/finetune config (its model)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the model config (moe.top_k=2, or model.moe.top_k=2)")
    args = parser.parse_args(argv)
    bare = [key[len("model."):] if key.startswith("model.") else key for key in args.overrides]
    cfg = network_config(args.config, bare)
    check_model_settings(cfg, prefix="")   # the overrides name the model keys bare
    try:
        name = cfg.clip.kind if cfg.clip.kind == "tiny" else f"{cfg.clip.kind} {cfg.clip.arch}"
        clip_line = (f"frozen CLIP prior ({name}, not in the network's parameters): "
                     f"{clip_prior_parameter_count(cfg.clip):,}")
    except (ValueError, TypeError) as exc:  # an architecture open_clip cannot build from its config
        clip_line = f"frozen CLIP prior: not countable ({exc})"
    print(format_summary(summarize(cfg), clip_line))
    return 0


if __name__ == "__main__":
    run_main(main)
