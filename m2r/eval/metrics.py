"""PSNR and SSIM under three protocols, for (3, H, W) float images whose target is in [0, 1].

- `rgb`: the standard one. Prediction clamped to [0, 1] and rounded to 8 bits, i.e. the image as it
  would be saved and as BasicSR's tensor2img + calculate_psnr/ssim measure it (the float prediction
  scores about 0.005 dB apart at 30 dB, 0.03 dB at 36 dB, 0.09 dB at 42 dB); data range 1, PSNR over
  all three channels, SSIM averaged over channels (Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, population
  covariance, border excluded): scikit-image's `structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)`.
- `y`: the same (8-bit prediction) on BT.601 luma of the RGB image (Y in [16, 235] / 255), as BasicSR's
  to_y_channel: Y stays a float (MATLAB's rgb2ycbcr on uint8 images rounds it, about 0.04 dB lower at 35 dB).
- `official`: the M2Restore / TransWeather metric (utils/val_utils.py), reproduced exactly (the official
  test also resizes RainDrop pairs to 720x480 first: `m2r.evaluate --official-sizes`). The
  (3, H, W) tensor is reinterpreted, not permuted, as (H, W, 3), so each "pixel" is three consecutive
  values of one colour plane; OpenCV's BGR->YCrCb luma (0.114, 0.587, 0.299 on those triplets) is
  taken; PSNR with data range 1; SSIM is scikit-image's with `channel_axis=-1` on that 2-D array,
  i.e. every one of the W columns is a separate 1-D signal (7-tap box window, sample covariance).
  No clamping: the official test runs on the raw network output.
Identical images score 100 dB in every protocol (MSE floored at 1e-10), not infinity.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from m2r.config import ConfigError

PROTOCOLS = ("rgb", "y", "official")
BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)   # R, G, B on [0, 1] inputs, result on the [0, 255] scale
OPENCV_LUMA_BGR = (0.114, 0.587, 0.299)       # cv2.COLOR_BGR2YCrCb on float images: B, G, R weights
OFFICIAL_SSIM_WINDOW = 7
K1, K2 = 0.01, 0.03
MIN_MSE = 1e-10   # PSNR's cap, the same in every protocol: identical images score 100 dB, not infinity


def batch_psnr(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images, prediction clamped to [0, 1]."""
    mse = (restored.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(MIN_MSE))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def batch_ssim(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images, prediction clamped to [0, 1] (Wang et al. 2004: 11x11
    Gaussian window, sigma 1.5, K1, K2), mean over channels."""
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
    c1, c2 = K1 ** 2, K2 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()


def _check_pair(restored: torch.Tensor, target: torch.Tensor) -> None:
    if restored.shape != target.shape or restored.dim() != 3 or restored.shape[0] != 3:
        raise ValueError(f"metrics expect two (3, H, W) images of one size, got {tuple(restored.shape)} "
                         f"and {tuple(target.shape)}")


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> (1, H, W) BT.601 luma in [16/255, 235/255]."""
    r, g, b = image.double()
    wr, wg, wb = BT601_Y_WEIGHTS
    return ((16.0 + wr * r + wg * g + wb * b) / 255.0).unsqueeze(0)


def as_saved_uint8(image: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] as the 8-bit file holds it: clamped, scaled and rounded in fp32, like
    BasicSR's tensor2img (rounding in float64 moves one value in ~10^5 by a level)."""
    return (image.float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def as_saved_8bit(image: torch.Tensor) -> torch.Tensor:
    """The prediction as its saved 8-bit image reads back, in float64 [0, 1]."""
    return as_saved_uint8(image).double() / 255.0


def psnr_ssim_rgb(restored: torch.Tensor, target: torch.Tensor) -> Tuple[float, float]:
    _check_pair(restored, target)
    x, y = as_saved_8bit(restored).unsqueeze(0), target.double().unsqueeze(0)
    return float(batch_psnr(x, y)), float(batch_ssim(x, y))


def psnr_ssim_y(restored: torch.Tensor, target: torch.Tensor) -> Tuple[float, float]:
    _check_pair(restored, target)
    x, y = rgb_to_y(as_saved_8bit(restored)).unsqueeze(0), rgb_to_y(target).unsqueeze(0)
    return float(batch_psnr(x, y)), float(batch_ssim(x, y))


def official_luma(image: torch.Tensor) -> torch.Tensor:
    """The official code's 'Y': `image.view(H, W, 3)` then OpenCV's BGR luma, in float32 as cv2 does."""
    _, h, w = image.shape
    scrambled = image.float().contiguous().view(h, w, 3)
    wb, wg, wr = OPENCV_LUMA_BGR
    return wb * scrambled[..., 0] + wg * scrambled[..., 1] + wr * scrambled[..., 2]


def _column_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """scikit-image SSIM of (H, W) arrays with channel_axis=-1: each column a 1-D signal, box window 7."""
    h = x.shape[0]
    if h < OFFICIAL_SSIM_WINDOW:
        raise ValueError(f"official SSIM needs at least {OFFICIAL_SSIM_WINDOW} rows, got {h}")
    # (W, 1, H): one 1-D signal per column; a valid box filter is scikit-image's filter + border crop.
    x, y = x.double().t().unsqueeze(1), y.double().t().unsqueeze(1)

    def box(t):
        return F.avg_pool1d(t, OFFICIAL_SSIM_WINDOW, stride=1)

    cov_norm = OFFICIAL_SSIM_WINDOW / (OFFICIAL_SSIM_WINDOW - 1)
    mu_x, mu_y = box(x), box(y)
    var_x = cov_norm * (box(x * x) - mu_x ** 2)
    var_y = cov_norm * (box(y * y) - mu_y ** 2)
    cov = cov_norm * (box(x * y) - mu_x * mu_y)
    c1, c2 = K1 ** 2, K2 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean(dim=(1, 2)).mean())


def psnr_ssim_official(restored: torch.Tensor, target: torch.Tensor) -> Tuple[float, float]:
    _check_pair(restored, target)
    x, y = official_luma(restored), official_luma(target)
    mse = (x.double() - y.double()).pow(2).mean()
    return float(10.0 * torch.log10(1.0 / mse.clamp_min(MIN_MSE))), _column_ssim(x, y)


_PROTOCOL_FUNCTIONS = {"rgb": psnr_ssim_rgb, "y": psnr_ssim_y, "official": psnr_ssim_official}


def parse_protocols(text: str) -> Tuple[str, ...]:
    """'rgb,y,official' -> ('rgb', 'y', 'official'); unknown names raise naming the valid ones."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown or not names:
        raise ConfigError(f"--metrics {text!r}: use a comma-separated subset of {','.join(PROTOCOLS)}")
    return names


def image_metrics(restored: torch.Tensor, target: torch.Tensor,
                  protocols: Sequence[str] = PROTOCOLS) -> Dict[str, float]:
    """{'psnr_<protocol>': dB, 'ssim_<protocol>': value} for one (3, H, W) image pair."""
    metrics = {}
    for protocol in protocols:
        psnr, ssim = _PROTOCOL_FUNCTIONS[protocol](restored, target)
        metrics[f"psnr_{protocol}"], metrics[f"ssim_{protocol}"] = psnr, ssim
    return metrics
