"""The DeepSpeed config dict, generated from the typed `train` section so the two cannot disagree.

No optimizer or scheduler entry: the engine passes a torch AdamW (a named DeepSpeed optimizer
becomes FusedAdam, which JIT-compiles for minutes on CPU) and sets the learning rate itself.

bf16 at ZeRO 1/2 accumulates and reduces gradients in fp32 (`data_types.grad_accum_dtype`; at stage 1
DeepSpeed then uses its BF16_Optimizer): left to DeepSpeed's default, bf16 gradients are summed over
micro-batches and ranks in bf16, whose 8-bit mantissa loses the small terms. DeepSpeed has no fp32
accumulation without ZeRO, so bf16 at stage 0 keeps bf16 gradients.
"""
from typing import Any, Dict

from m2r.config import ConfigError


def gradient_accumulation_dtype(train) -> str:
    if train.precision == "bf16" and train.zero_stage == 0:
        return "bf16"
    return "fp16" if train.precision == "fp16" else "fp32"


def build_deepspeed_config(train, world_size: int) -> Dict[str, Any]:
    if train.zero_stage == 3:
        raise ConfigError("config error: key 'train.zero_stage': value 3 is not supported: DeepSpeed's native "
                          "MoE layers refuse ZeRO stage 3; use 1 or 2 (optimizer state or gradients sharded)")
    if train.zero_stage not in (0, 1, 2):
        raise ConfigError(f"config error: key 'train.zero_stage': value {train.zero_stage!r} must be 0, 1 or 2")
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world_size,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 2**31 - 1,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
        if train.zero_stage > 0:
            config["data_types"] = {"grad_accum_dtype": gradient_accumulation_dtype(train)}
    elif train.precision == "fp16":
        # initial_scale_power 16 and a window of 1000 steps are DeepSpeed's usual dynamic scaling.
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    elif train.precision != "fp32":
        raise ConfigError(f"config error: key 'train.precision': value {train.precision!r} "
                          "must be fp32, bf16 or fp16")
    return config
