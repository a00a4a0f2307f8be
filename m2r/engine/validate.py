"""Validation on a fixed held-out set, run by every rank.

Every rank must run every forward: the MoE all-to-all needs all ranks. The batches are split
round-robin; ranks short of a batch run a padding forward whose result is not counted, so all
ranks do the same number of forwards. Metrics are RGB PSNR / SSIM on clamped [0, 1] images.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from m2r import dist
from m2r.eval.image_io import to_unit_float
from m2r.eval.metrics import batch_psnr, batch_ssim


@torch.no_grad()
def validation_metrics(model, val_batches: Sequence[Dict[str, torch.Tensor]], device: torch.device,
                       dtype: torch.dtype, type_names: Sequence[str]) -> Dict[str, float]:
    """Mean PSNR/SSIM over the whole set, plus PSNR per degradation type (`psnr_<type name>`, the
    batches' type_id indexing `type_names`); same on all ranks."""
    was_training = model.training
    model.eval()
    num_types = len(type_names)
    # sums: [psnr, ssim, count] overall, then psnr and count per type
    sums = torch.zeros(3 + 2 * num_types, dtype=torch.float64)
    rank, world = dist.rank(), dist.world_size()
    for round_start in range(0, len(val_batches), world):
        index = round_start + rank
        counted = index < len(val_batches)
        batch = val_batches[index if counted else 0]
        restored = model(to_unit_float(batch["lq"], device, dtype)).restored.float()
        if not counted:
            continue
        target = to_unit_float(batch["gt"], device, torch.float32)
        image_psnr = batch_psnr(restored, target).double().cpu()
        image_ssim = batch_ssim(restored, target).double().cpu()
        sums[0] += image_psnr.sum()
        sums[1] += image_ssim.sum()
        sums[2] += len(image_psnr)
        types = batch["type_id"].long()
        sums[3:3 + num_types].index_add_(0, types, image_psnr)
        sums[3 + num_types:].index_add_(0, types, torch.ones_like(image_psnr))
    sums = dist.all_reduce_sum(sums)
    model.train(was_training)
    metrics = {"psnr": float(sums[0] / sums[2]), "ssim": float(sums[1] / sums[2])}
    for type_id in range(num_types):
        count = float(sums[3 + num_types + type_id])
        if count > 0:
            metrics[f"psnr_{type_names[type_id]}"] = float(sums[3 + type_id]) / count
    return metrics


def image_grid(lq: torch.Tensor, restored: torch.Tensor, gt: torch.Tensor, max_images: int = 4) -> torch.Tensor:
    """One (3, rows*H, 3*W) image: each row is degraded | restored | clean, all in [0, 1]."""
    rows: List[torch.Tensor] = []
    for i in range(min(max_images, lq.shape[0])):
        rows.append(torch.cat([lq[i], restored[i].clamp(0, 1), gt[i]], dim=-1))
    return torch.cat(rows, dim=-2).float().cpu()
