"""Training objective: pixel loss + weight x MoE balance loss (the official recipe is L1 + 0.01 x cv^2 terms)."""
from dataclasses import dataclass

import torch

from m2r.engine.config import PIXEL_LOSSES


@dataclass
class LossTerms:
    total: torch.Tensor
    pixel: torch.Tensor
    balance: torch.Tensor

    NAMES = ("loss", "pixel_loss", "balance_loss")   # as logged, in the order of `stacked`

    def stacked(self) -> torch.Tensor:
        """The three terms as one detached fp32 tensor, for a single copy or all-reduce."""
        return torch.stack([self.total, self.pixel, self.balance]).detach().float()


def pixel_loss(restored: torch.Tensor, target: torch.Tensor, kind: str, charbonnier_eps: float) -> torch.Tensor:
    diff = restored.float() - target.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "charbonnier":
        return torch.sqrt(diff * diff + charbonnier_eps ** 2).mean()
    raise ValueError(f"train.loss={kind!r}: expected one of {PIXEL_LOSSES}")


def restoration_loss(output, target: torch.Tensor, train, balance_weight: float) -> LossTerms:
    """`output` is the network's RestorationOutput; `target` the clean image in [0, 1]."""
    pixel = pixel_loss(output.restored, target, train.loss, train.charbonnier_eps)
    balance = output.balance_loss.float()
    return LossTerms(total=pixel + balance_weight * balance, pixel=pixel, balance=balance)
