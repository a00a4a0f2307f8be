"""AdamW with DeepSpeed MoE parameter groups, the per-iteration learning-rate schedule, and EMA weights."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, Mapping

import torch
from torch import nn

from m2r.engine.experts import EXPERT_INFIX, global_expert_names


def build_optimizer(model: nn.Module, train) -> torch.optim.Optimizer:
    """Torch AdamW; expert parameters get their own groups, as DeepSpeed's MoE gradient reduction needs."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": trainable, "name": "parameters", "lr": train.lr, "weight_decay": train.weight_decay})
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                             weight_decay=train.weight_decay)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup over `warmup_steps`, then a cosine from `lr` that reaches `min_lr` at `steps` (in
    optimizer steps; finetuning converts its epochs) and stays there."""
    lr: float
    min_lr: float
    warmup_steps: int
    steps: int

    @classmethod
    def of_steps(cls, train) -> "LRSchedule":
        """Pretraining's: the `train` section counts in steps."""
        return cls(train.lr, train.min_lr, train.warmup_steps, train.steps)


def learning_rate(step: int, schedule: LRSchedule) -> float:
    """LR of optimizer step `step` (0-based): linear warmup from 0, then cosine from lr to min_lr."""
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    decay_steps = max(1, schedule.steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / decay_steps)
    return schedule.min_lr + 0.5 * (schedule.lr - schedule.min_lr) * (1.0 + math.cos(math.pi * progress))


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, train) -> None:
    """This run's AdamW settings in every group (loading an optimizer state restores the saved ones)."""
    for group in optimizer.param_groups:
        group.update(betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """fp32 exponential moving average of this rank's trainable weights (dense + local experts).

    Keys are topology independent (experts by global id), so the parts the ranks save (see
    `state_dict`) merge for export and reload at another world size or ep_size.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        names = global_expert_names(model)
        self._params = {names[name]: param for name, param in model.named_parameters() if param.requires_grad}
        self.shadow = {name: param.detach().float().clone() for name, param in self._params.items()}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (validation, image logging); the trained
        weights are copied back exactly afterwards, in their own dtype."""
        trained = {name: param.detach().clone() for name, param in self._params.items()}
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self._params.items():
                    param.copy_(trained[name])

    @torch.no_grad()
    def update(self) -> None:
        """One multi-tensor lerp over every weight (about 850 tensors in M2Restore: a kernel each, one by one)."""
        weights = [param.detach().float() for param in self._params.values()]   # .float(): a no-op for fp32
        torch._foreach_lerp_([self.shadow[name] for name in self._params], weights, 1.0 - self.decay)

    def state_dict(self, dense: bool = True, experts: bool = True) -> Dict[str, torch.Tensor]:
        """The averaged weights, or only the dense ones or only this rank's experts."""
        return {name: tensor.clone() for name, tensor in self.shadow.items()
                if (experts if EXPERT_INFIX in name else dense)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weights, e.g. {missing[:3]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
