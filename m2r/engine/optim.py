"""AdamW with DeepSpeed MoE parameter groups, the per-iteration learning-rate schedule, and EMA weights."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Tuple

import torch
from torch import nn

from m2r import dist
from m2r.engine.experts import EXPERT_INFIX, global_expert_names
from m2r.models.convert import CheckpointMismatch


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
    optimizer steps; finetuning converts its epochs). Past `steps` (a finetune with train.schedule_epochs
    below its epochs) the closed-form cosine goes on, rising again, as the official schedule does for its
    last 20 of 200 epochs (to about 6e-6): held at 0 instead, those epochs would change nothing."""
    lr: float
    min_lr: float
    warmup_steps: int
    steps: int

    @classmethod
    def of_steps(cls, train) -> "LRSchedule":
        """Pretraining's: the `train` section counts in steps."""
        return cls(train.lr, train.min_lr, train.warmup_steps, train.steps)

    def describe(self, total_steps: int) -> str:
        """The schedule over a run of `total_steps` optimizer steps, counted from 1 as the console counts them:
        step `steps` + 1 is the first at min_lr, so the cosine ends after step `steps`."""
        text = f"warmup {self.warmup_steps}, cosine to min_lr after step {self.steps}"
        if self.steps + 1 < total_steps:
            text += f", then rising again to {learning_rate(total_steps - 1, self):.2e} at the last step"
        return text


def learning_rate(step: int, schedule: LRSchedule) -> float:
    """LR of optimizer step `step` (0-based): linear warmup from 0, then cosine from lr to min_lr."""
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    decay_steps = max(1, schedule.steps - schedule.warmup_steps)
    progress = (step - schedule.warmup_steps) / decay_steps   # above 1 only past `steps`
    return schedule.min_lr + 0.5 * (schedule.lr - schedule.min_lr) * (1.0 + math.cos(math.pi * progress))


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, train) -> None:
    """This run's AdamW settings in every group (loading an optimizer state restores the saved ones)."""
    for group in optimizer.param_groups:
        group.update(betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """fp32 exponential moving average of the trainable weights, following what the optimizer updates.

    Under DeepSpeed's ZeRO 1/2 the fp32 master of each weight is partitioned over the parameter's
    data-parallel ranks and the module holds bf16/fp16 copies: each rank averages the master fragments
    its partition holds (no communication per step), and the full weights are assembled, one all-reduce
    per process group, only to apply or save them. Otherwise (fp32 without ZeRO, or fp16 at ZeRO 0,
    whose masters DeepSpeed does not map to the module) the average follows the module's weights.

    Keys are topology independent (experts by global id), so the parts the ranks save (see
    `state_dict`) merge for export and reload at another world size or ep_size.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self._params = trainable_by_global_name(model)
        self.shadow = {name: _master_of(param).clone() for name, param in self._params.items()}

    def follows(self) -> str:
        """What the average follows, and why, for the start-up summary (ZeRO links every trainable weight or none)."""
        if any(_is_partitioned(param) for param in self._params.values()):
            return "the fp32 master fragments ZeRO partitions (what AdamW updates; no communication per step)"
        return "the module weights (no ZeRO partition links them to fp32 masters)"

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (validation, image logging); the trained
        weights are copied back exactly afterwards, in their own dtype. Call it on every rank."""
        averaged = self._full_weights()
        trained = {name: param.detach().clone() for name, param in self._params.items()}
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(averaged[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self._params.items():
                    param.copy_(trained[name])

    @torch.no_grad()
    def update(self) -> None:
        """One multi-tensor lerp over every weight (about 850 tensors in M2Restore: a kernel each, one by one)."""
        masters = {name: _master_of(param) for name, param in self._params.items()}
        names = [name for name, master in masters.items() if master.numel()]
        torch._foreach_lerp_([self.shadow[name] for name in names], [masters[name] for name in names],
                             1.0 - self.decay)

    def state_dict(self, dense: bool = True, experts: bool = True) -> Dict[str, torch.Tensor]:
        """The averaged weights, or only the dense ones or only this rank's experts. Call it on every rank
        (partitioned weights are assembled across ranks)."""
        return {name: tensor.clone() for name, tensor in self._full_weights().items()
                if (experts if EXPERT_INFIX in name else dense)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "EMA state") -> None:
        """`state` (every weight by global name, e.g. `load_ema_states`) as the average; `source` names it in the
        error when it lacks weights. Call it on every rank."""
        _require_every_weight(self.shadow, state, source, "weights")
        for name, param in self._params.items():
            start, numel = _fragment_of(param)
            self.shadow[name].copy_(state[name].reshape(-1)[start:start + numel].view_as(self.shadow[name]))

    def _full_weights(self) -> Dict[str, torch.Tensor]:
        """Every averaged weight in full: partitioned ones summed over their group, where the other ranks
        contribute zeros outside their fragments."""
        full = {name: self.shadow[name] for name, param in self._params.items() if not _is_partitioned(param)}
        by_group: Dict[int, list] = {}
        for name, param in self._params.items():
            if _is_partitioned(param):
                by_group.setdefault(id(param._dp_group), []).append(name)
        for names in by_group.values():   # in parameter order, the same on every rank
            params = [self._params[name] for name in names]
            flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
            pieces = flat.split([p.numel() for p in params])
            for name, param, piece in zip(names, params, pieces):
                start, numel = _fragment_of(param)
                piece[start:start + numel] = self.shadow[name]
            dist.all_reduce_in_group_(flat, params[0]._dp_group)
            full.update({name: piece.view(param.shape) for name, param, piece in zip(names, params, pieces)})
        return {name: full[name] for name in self._params}


@torch.no_grad()
def load_trainable_weights(engine, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Full weights keyed by global name (an EMA's: `load_ema_states`) into the engine's trainable weights: the
    module's, in their dtype, and the fp32 masters the optimizer updates, which DeepSpeed keeps apart from the
    module. Those are refreshed from the module, as DeepSpeed's own weights-only load does, then set to the exact
    values where ZeRO or bf16 links this rank's fragment of them. Call it on every rank."""
    params = trainable_by_global_name(engine.module)
    _require_every_weight(params, state, source, "trainable weights")
    for name, param in params.items():
        param.copy_(state[name].view_as(param))
    if hasattr(engine.optimizer, "refresh_fp32_params"):   # its fp32 masters, e.g. fp16 at ZeRO 0's
        engine.optimizer.refresh_fp32_params()
    for name, param in params.items():
        if _is_partitioned(param):
            start, numel = _fragment_of(param)
            _master_of(param).copy_(state[name].reshape(-1)[start:start + numel])


def trainable_by_global_name(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The trainable weights keyed as checkpoints and EMAs key them (experts by global id)."""
    names = global_expert_names(model)
    return {names[name]: param for name, param in model.named_parameters() if param.requires_grad}


def _require_every_weight(needed: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str, what: str
                          ) -> None:
    """A CheckpointMismatch (a user's error: one line per rank, no traceback) naming how many of `needed`'s keys
    `state` lacks, and a few of them, before any is copied; on every rank when any rank lacks some (each needs its
    own experts): call it on every rank."""
    missing = sorted(set(needed) - set(state))
    problem = dist.problem_of_any_rank(f"{source} lacks {len(missing)} {what}, e.g. {missing[:3]}" if missing else None)
    if problem:
        raise CheckpointMismatch(problem)


def _is_partitioned(param: torch.Tensor) -> bool:
    """DeepSpeed links each parameter of a ZeRO 1/2 or bf16 optimizer to its fp32 master fragment."""
    return hasattr(param, "_hp_mapping")


def _fragment_of(param: torch.Tensor) -> Tuple[int, int]:
    """(start, numel) of the part of the flattened parameter whose master this rank holds."""
    if not _is_partitioned(param):
        return 0, param.numel()
    mapping = param._hp_mapping   # None where this rank's partition holds none of the parameter
    return (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel) if mapping else (0, 0)


def _master_of(param: torch.Tensor) -> torch.Tensor:
    """The fp32 values the optimizer updates for the part of `param` this rank holds. Read anew each
    time: loading a checkpoint re-links DeepSpeed's fragments."""
    if not _is_partitioned(param):
        return param.detach().float()   # a no-op for fp32
    mapping = param._hp_mapping
    return mapping.hp_fragment.detach() if mapping else param.new_zeros(0, dtype=torch.float32)
