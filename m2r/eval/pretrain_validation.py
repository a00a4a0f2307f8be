"""A pretraining run's validation recomputed from one of its checkpoints (`m2r.evaluate --pretrain-val`).

The checkpoint's config.yaml rebuilds the run's validation set with the function the run used
(`m2r.data.build_val_set`: the same photos or validation shards, crops, degradation seeds and batches),
scored by the run's own `validation_metrics`, on the weights the run validated: its EMA when
train.ema_decay > 0, else the trained weights (the fp32 masters), in train.precision as the DeepSpeed
engine held them (`as_the_engine_holds`: the frozen CLIP prior stays fp32), with the inputs cast alike, in
channels_last when the run trained so, under its TF32 setting. The numbers are the run's `val_*` record at
the checkpoint's step (metrics.jsonl), bf16 runs' included, up to the order the ranks' float64 sums add in,
on the same kind of device; another device (CPU for a GPU run) rounds differently.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from m2r.config import ConfigError, load_config
from m2r.engine.checkpoint import (CONFIG_FILE, DENSE_FILE, LATEST_FILE, PRETRAIN_KIND, RUN_CHECKPOINTS_DIR,
                                   CheckpointRef, checkpoint_at, checkpoint_kind, tags_in)
from m2r.engine.monitor import metric_value

METRICS_FILE = "metrics.jsonl"
DATA_PREFIX = "data."   # a --set key of the run's data section, not of the network's config
MODEL_PREFIX = "model."   # the network's keys as the run's config.yaml writes them (model.clip.weights)


def pretraining_checkpoint(location: str) -> CheckpointRef:
    """The checkpoint `location` names: a pretraining run directory (the newest checkpoint under its
    checkpoints/), a checkpoint directory or one tag directory; a finetuning checkpoint is refused."""
    path = Path(location)
    if not path.is_dir():
        raise FileNotFoundError(f"--weights {location}: --pretrain-val takes a pretraining run directory, "
                                "checkpoint directory or tag directory (exported weights carry no run config)")
    holds_checkpoints = (path / LATEST_FILE).is_file() or tags_in(path) or (path / DENSE_FILE).is_file()
    if not holds_checkpoints and (path / RUN_CHECKPOINTS_DIR).is_dir():
        path = path / RUN_CHECKPOINTS_DIR
    ref = checkpoint_at(str(path), "--weights")
    kind = checkpoint_kind(ref.meta(), ref.saved_config())
    if kind != PRETRAIN_KIND:
        raise ConfigError(f"--weights {location}: {ref.path} is a {kind} checkpoint; --pretrain-val recomputes a "
                          "pretraining run's validation (evaluate a finetuned model with --dataset and --root)")
    return ref


def logged_validation(ref: CheckpointRef, step: int) -> Optional[Dict[str, float]]:
    """The run's `val_*` record of `step` in the metrics.jsonl beside its checkpoint directory; None when
    the run logged none there (no validation at that step, or the checkpoint moved away from its run)."""
    metrics_path = ref.root.parent / METRICS_FILE
    if ref.root.name != RUN_CHECKPOINTS_DIR or not metrics_path.is_file():
        return None
    found = None
    with open(metrics_path) as handle:   # streamed: a long run's file holds tens of MB
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:   # a line a crash cut off
                continue
            if isinstance(record, dict) and record.get("step") == step and "val_psnr" in record:
                found = {name: metric_value(value) for name, value in record.items() if name.startswith("val_")}
    return found


def recompute_validation(ref: CheckpointRef, device: torch.device, overrides=()) -> dict:
    """The run's validation metrics at the checkpoint (keys as metrics.jsonl writes them: val_psnr, ...),
    with what was scored and what the run logged at that step. Call it on every process of a world: the
    batches are split between them and the sums reduced, as in training."""
    from m2r.data import build_val_set
    from m2r.data.presets import type_names
    from m2r.engine.config import PretrainConfig
    from m2r.engine.run import PRECISION_DTYPES, set_math_flags
    from m2r.engine.validate import validation_metrics
    from m2r.eval.loading import load_inference_model

    # data.* overrides move the validation set (data.val_shards copied elsewhere), the others (model.* as the run's
    # config.yaml names them, or bare as an export's) the network's config
    data_overrides = [override for override in overrides if override.startswith(DATA_PREFIX)]
    overrides = [override.removeprefix(MODEL_PREFIX) for override in overrides if not override.startswith(DATA_PREFIX)]
    cfg = load_config(PretrainConfig, ref.path / CONFIG_FILE, data_overrides)
    precision, use_ema = cfg.train.precision, cfg.train.ema_decay > 0   # TrainingRun._validation_weights
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"{ref.path} validated in fp16 (train.precision), which needs a CUDA GPU")
    set_math_flags(cfg.train)
    model = load_inference_model(str(ref.path), device, overrides=overrides, use_ema=use_ema)
    if cfg.train.channels_last:
        model.use_channels_last()
    dtype = PRECISION_DTYPES[precision]
    val_set = build_val_set(cfg.data, cfg.train.crop)
    metrics = validation_metrics(as_the_engine_holds(model, dtype), val_set, device, dtype, type_names(cfg.data.preset))
    step = ref.meta()["step"]
    return {"checkpoint": str(ref.path), "step": step, "validated_weights": "ema" if use_ema else "trained",
            "precision": precision, "val": {f"val_{name}": value for name, value in metrics.items()},
            "logged": logged_validation(ref, step)}


def as_the_engine_holds(model, dtype: torch.dtype):
    """`model` as the training engine holds it: the parameters of its module tree in `dtype`, buffers as loaded, the
    frozen CLIP prior (outside that tree) in fp32 (`TrainingRun._start_engine`). `model.to(dtype)` would cast the
    prior too (M2Restore._apply), and its bf16 degradation scores move the expert gates (in the tiny test run
    1e-4 dB of PSNR, 1e-3 dB on one type)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def report_lines(result: dict) -> str:
    """The recomputed metrics beside the run's record of the step, one line each."""
    logged = result["logged"] or {}
    lines = [f"pretraining validation of {result['checkpoint']} (step {result['step']}, "
             f"{'EMA' if result['validated_weights'] == 'ema' else 'trained'} weights, {result['precision']})"]
    for name, value in result["val"].items():
        recorded = f"   run logged {logged[name]:.6f}" if name in logged else ""
        lines.append(f"  {name:<24} {value:.6f}{recorded}")
    if not logged:
        lines.append(f"  (no val_* record of step {result['step']} in the run's {METRICS_FILE} to compare with)")
    return "\n".join(lines) + "\n"
