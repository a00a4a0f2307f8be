"""Validation on a fixed held-out set, run by every rank.

Every rank must run every forward: the MoE all-to-all needs all ranks. The batches are split
round-robin; ranks short of a batch run a padding forward whose result is not counted, so all
ranks do the same number of forwards. Metrics are RGB PSNR / SSIM on clamped [0, 1] images.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from m2r import dist


def to_unit_float(images_uint8: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 batches travel to the device, the /255 happens there."""
    return images_uint8.to(device, non_blocking=True).to(dtype) / 255.0


MIN_MSE = 1e-10   # PSNR's cap, the same in every protocol: identical images score 100 dB, not infinity


def psnr(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image RGB PSNR in dB for [0, 1] images (B,3,H,W)."""
    mse = (restored.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(MIN_MSE))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), channel mean."""
    x, y = restored.clamp(0, 1).double(), target.double()
    channels = x.shape[1]
    size = min(11, x.shape[-2], x.shape[-1])
    window = _gaussian_window(size).to(x.device).expand(channels, 1, size, size)

    def blur(t):
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()


@torch.no_grad()
def evaluate(model, val_batches: Sequence[Dict[str, torch.Tensor]], device: torch.device,
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
        image_psnr, image_ssim = psnr(restored, target).double().cpu(), ssim(restored, target).double().cpu()
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
