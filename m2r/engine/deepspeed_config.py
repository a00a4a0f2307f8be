"""The DeepSpeed config dict, generated from the typed `train` section so the two cannot disagree.

No optimizer or scheduler entry: the engine passes a torch AdamW (a named DeepSpeed optimizer
becomes FusedAdam, which JIT-compiles for minutes on CPU) and sets the learning rate itself.

bf16 gradients are summed over ranks in fp32 (`communication_data_type`) and, at ZeRO 2, over
micro-batches too (`data_types.grad_accum_dtype`); DeepSpeed's defaults sum both in bf16, whose 8-bit
mantissa loses the small terms. At ZeRO 1 the micro-batch sum stays bf16: asking for fp32 there makes
DeepSpeed switch to its BF16_Optimizer, which trains our MoE network differently from fp32 training
(DeepSpeed 0.19.8, tiny model, 2 ranks, ep_size 2, 2 micro-batches, same weights and batches, no
clipping: first-step gradient norm 18% above fp32's and the third step's loss 1% off, where ZeRO 1 and 2
as set here are within 0.1% and 0.01%). bf16 without ZeRO is refused for the same reason (3% and 2%).
tests/test_engine_dist.py checks both settings against an fp32 run.
"""
from typing import Any, Dict, List

from m2r.config import config_error


def gradient_accumulation_dtype(train) -> str:
    """What gradients are summed in over the micro-batches of a step."""
    if train.precision == "bf16":
        return "fp32" if train.zero_stage == 2 else "bf16"
    return train.precision


def gradient_reduction_dtype(train) -> str:
    """What gradients are summed in over the ranks."""
    return "fp32" if train.precision == "bf16" else train.precision


def precision_notes(train) -> List[str]:
    """The reasons for what this module decides and a user would see without one, for the start-up summary."""
    notes = []
    if train.precision == "bf16" and train.zero_stage == 1:
        notes.append("micro-batch sums stay bf16 at ZeRO 1: fp32 ones would switch DeepSpeed to its BF16_Optimizer, "
                     "which trains otherwise than fp32 (ZeRO 2 sums in fp32)")
    if train.precision == "fp32" and train.zero_stage == 0:
        notes.append("no grad norm in the step lines (grad n/a) nor metrics.jsonl: DeepSpeed keeps none at ZeRO 0 in "
                     "fp32 (it clips without storing it); ZeRO 1 or 2 reports it")
    return notes


def images_per_step(train, world_size: int) -> int:
    """The global batch (DeepSpeed's train_batch_size): images per optimizer step over all ranks."""
    return train.micro_batch * train.grad_accum * world_size


def build_deepspeed_config(train, world_size: int) -> Dict[str, Any]:
    if train.zero_stage == 3:
        raise config_error("train.zero_stage", "value 3 is not supported: DeepSpeed's native "
                           "MoE layers refuse ZeRO stage 3; use 1 or 2 (optimizer state or gradients sharded)")
    if train.zero_stage not in (0, 1, 2):
        raise config_error("train.zero_stage", f"value {train.zero_stage!r} must be 0, 1 or 2")
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": images_per_step(train, world_size),
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 2**31 - 1,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        if train.zero_stage == 0:
            raise config_error("train.zero_stage", "value 0 with train.precision=bf16: DeepSpeed's "
                               "bf16 without ZeRO computes other gradients than fp32 training; use stage 1 or 2")
        config["bf16"] = {"enabled": True}
        config["communication_data_type"] = gradient_reduction_dtype(train)
        if train.zero_stage == 2:
            config["data_types"] = {"grad_accum_dtype": gradient_accumulation_dtype(train)}
    elif train.precision == "fp16":
        # initial_scale_power 16 and a window of 1000 steps are DeepSpeed's usual dynamic scaling.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    elif train.precision != "fp32":
        raise config_error("train.precision", f"value {train.precision!r} "
                           "must be fp32, bf16 or fp16")
    return config
