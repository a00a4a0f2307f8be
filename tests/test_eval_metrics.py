"""Metric protocols: rgb and y against scikit-image on real photos, official against a by-hand derivation."""
import math

import numpy as np
import pytest
import skimage.color
import skimage.data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
import torch

from m2r.config import ConfigError
from m2r.eval.metrics import batch_ssim, image_metrics, official_luma, parse_protocols, psnr_ssim_official

PHOTOS = ("astronaut", "coffee", "chelsea")


def photo_pair(name: str, seed: int):
    """A 96x128 crop of a sample photo in [0, 1] (H, W, 3) and a noisy, slightly out-of-range copy."""
    clean = getattr(skimage.data, name)()[:96, :128, :3].astype(np.float64) / 255.0
    rng = np.random.default_rng(seed)
    noisy = clean + rng.normal(0.0, 0.05, clean.shape) + 0.02
    return clean, noisy


def chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def saved_8bit(image: np.ndarray) -> np.ndarray:
    """What writing the prediction to a PNG and reading it back gives, in [0, 1]."""
    return np.round(image.clip(0, 1) * 255) / 255


@pytest.mark.parametrize("name", PHOTOS)
def test_rgb_protocol_matches_scikit_image_on_the_saved_8bit_output(name):
    clean, noisy = photo_pair(name, seed=1)
    clamped = saved_8bit(noisy)
    ours = image_metrics(chw(noisy), chw(clean), ["rgb"])
    assert ours["psnr_rgb"] == pytest.approx(peak_signal_noise_ratio(clean, clamped, data_range=1), abs=1e-6)
    reference = structural_similarity(clean, clamped, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=1, channel_axis=-1)
    assert ours["ssim_rgb"] == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("name", PHOTOS)
def test_y_protocol_is_bt601_luma_of_rgb_images(name):
    clean, noisy = photo_pair(name, seed=2)
    clamped = saved_8bit(noisy)
    y_clean = skimage.color.rgb2ycbcr(clean)[..., 0] / 255.0     # RGB input, Y in [16, 235]
    y_noisy = skimage.color.rgb2ycbcr(clamped)[..., 0] / 255.0
    ours = image_metrics(chw(noisy), chw(clean), ["y"])
    assert ours["psnr_y"] == pytest.approx(peak_signal_noise_ratio(y_clean, y_noisy, data_range=1), abs=1e-6)
    reference = structural_similarity(y_clean, y_noisy, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1)
    assert ours["ssim_y"] == pytest.approx(reference, abs=1e-6)


def test_rgb_and_y_protocols_measure_the_prediction_rounded_to_8_bits():
    target = torch.from_numpy(saved_8bit(photo_pair("coffee", seed=6)[0])).permute(2, 0, 1)
    signs = torch.randn(target.shape, generator=torch.Generator().manual_seed(0)).sign()
    within_half_a_level = target + 0.4 / 255 * signs
    exact = image_metrics(target, target, ["rgb", "y"])
    assert image_metrics(within_half_a_level, target, ["rgb", "y"]) == exact
    assert image_metrics(target + 0.6 / 255, target, ["rgb"])["psnr_rgb"] < exact["psnr_rgb"]


def test_rgb_and_y_protocols_score_exactly_the_png_that_evaluate_saves(tmp_path):
    from PIL import Image

    from m2r.eval.image_io import save_png

    target = torch.from_numpy(saved_8bit(photo_pair("chelsea", seed=7)[0])).permute(2, 0, 1).float()
    # float32 values near the midpoints between 8-bit levels, where float32 and float64 rounding part
    jitter = 1e-6 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    prediction = (target * 255 + 0.5 + jitter) / 255
    save_png(prediction, tmp_path / "restored.png")
    saved = torch.from_numpy(np.array(Image.open(tmp_path / "restored.png"))).permute(2, 0, 1).double() / 255
    assert image_metrics(prediction, target, ["rgb", "y"]) == image_metrics(saved, target, ["rgb", "y"])


def test_y_protocol_reads_channels_as_rgb_not_bgr():
    red = torch.zeros(3, 16, 16)
    red[0] = 1.0
    blue = red.flip(0)
    assert image_metrics(red, blue, ["y"])["psnr_y"] == pytest.approx(
        10 * math.log10(1 / ((65.481 - 24.966) / 255) ** 2), abs=1e-6)


# ----------------------------------------------------------------------------- the official metric

def scrambled_luma_by_hand(image: np.ndarray) -> np.ndarray:
    """Element (i, j, k) of `chw.view(H, W, 3)` is flat element (i * W + j) * 3 + k of the C-order (3, H, W)."""
    _, h, w = image.shape
    flat = [image[c, y, x] for c in range(3) for y in range(h) for x in range(w)]
    luma = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            b, g, r = (flat[(i * w + j) * 3 + k] for k in range(3))  # OpenCV reads the triplet as B, G, R
            luma[i, j] = 0.114 * b + 0.587 * g + 0.299 * r
    return luma


def column_ssim_by_hand(x: np.ndarray, y: np.ndarray, window: int = 7) -> float:
    """Mean over columns of the mean over every full 7-sample window of SSIM with sample (n-1) variances."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    per_column = []
    for j in range(x.shape[1]):
        values = []
        for top in range(x.shape[0] - window + 1):
            a, b = x[top:top + window, j], y[top:top + window, j]
            va, vb = a.var(ddof=1), b.var(ddof=1)
            cov = ((a - a.mean()) * (b - b.mean())).sum() / (window - 1)
            values.append(((2 * a.mean() * b.mean() + c1) * (2 * cov + c2))
                          / ((a.mean() ** 2 + b.mean() ** 2 + c1) * (va + vb + c2)))
        per_column.append(np.mean(values))
    return float(np.mean(per_column))


def test_official_luma_is_the_reshaped_not_permuted_image():
    image = torch.rand(3, 9, 5, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(official_luma(image).numpy(), scrambled_luma_by_hand(image.numpy()), atol=1e-6)


def test_official_psnr_and_ssim_match_a_derivation_by_hand():
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(3, 10, 6, generator=gen)
    restored = target + 0.1 * torch.randn(3, 10, 6, generator=gen)  # outside [0, 1]: not clamped
    y_restored = scrambled_luma_by_hand(restored.numpy().astype(np.float64))
    y_target = scrambled_luma_by_hand(target.numpy().astype(np.float64))
    psnr, ssim = psnr_ssim_official(restored, target)
    assert psnr == pytest.approx(10 * math.log10(1 / np.mean((y_restored - y_target) ** 2)), abs=1e-4)
    assert ssim == pytest.approx(column_ssim_by_hand(y_restored, y_target), abs=1e-5)


def test_official_ssim_is_scikit_images_channel_axis_call_on_the_luma():
    clean, noisy = photo_pair("astronaut", seed=4)
    restored, target = chw(noisy).float(), chw(clean).float()
    luma_r, luma_t = official_luma(restored).numpy(), official_luma(target).numpy()
    _, ssim = psnr_ssim_official(restored, target)
    assert ssim == pytest.approx(structural_similarity(luma_t, luma_r, data_range=1, channel_axis=-1), abs=1e-5)


def test_official_protocol_differs_from_the_standard_ones_on_a_real_photo():
    clean, noisy = photo_pair("coffee", seed=5)
    metrics = image_metrics(chw(noisy), chw(clean))
    assert set(metrics) == {f"{m}_{p}" for m in ("psnr", "ssim") for p in ("rgb", "y", "official")}
    assert abs(metrics["psnr_official"] - metrics["psnr_y"]) > 0.05


def test_unknown_protocol_names_are_refused():
    assert parse_protocols("rgb, official") == ("rgb", "official")
    with pytest.raises(ValueError, match="rgb,y,official"):
        parse_protocols("rgb,lpips")


def test_ssim_of_images_smaller_than_its_window_takes_a_window_of_their_size():
    """An 8 x 6 image (a thin crop, a small validation image) is scored, not refused."""
    image = torch.rand(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(batch_ssim(image, image), torch.ones(2), atol=1e-6)
    assert (batch_ssim((image + 0.2).clamp(0, 1), image) < 0.99).all()


def test_ssim_clamps_the_prediction_to_the_image_range_as_psnr_does():
    target = torch.ones(1, 3, 16, 16)
    assert float(batch_ssim(target * 1.5, target)) == pytest.approx(1.0, abs=1e-6)
    assert float(batch_ssim(-target, torch.zeros(1, 3, 16, 16))) == pytest.approx(1.0, abs=1e-6)


def test_official_ssim_takes_an_image_exactly_its_window_high():
    """7 rows hold one full 7-sample window per column: scikit-image scores it, so do we."""
    target = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(1))
    assert psnr_ssim_official(target, target)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 7 rows"):
        psnr_ssim_official(target[:, :6], target[:, :6])


@pytest.mark.parametrize("text", ["", " , ", ","])
def test_an_empty_protocol_list_is_refused(text):
    with pytest.raises(ConfigError, match="rgb,y,official"):
        parse_protocols(text)


def test_rgb_and_y_protocols_round_only_the_prediction_not_a_16_bit_target():
    """The prediction is measured as its saved 8-bit image; the target as loaded (16-bit PNGs keep
    their precision): a prediction equal to a target 0.3 levels above 0 rounds to 0 and scores finite."""
    target = torch.full((3, 16, 16), 0.3 / 255)
    metrics = image_metrics(target, target, ["rgb", "y"])
    assert metrics["psnr_rgb"] == pytest.approx(20 * math.log10(255 / 0.3), abs=1e-6)
    assert metrics["psnr_y"] < 100


def test_the_prediction_is_rounded_to_8_bits_in_float32_as_basicsrs_tensor2img_does():
    """Near a midpoint float32 and float64 rounding part (about one value in 10^5): 0x1.9c9c9cp-1 * 255
    is 205.5 in float32 arithmetic (-> 206) and just below it in float64 (-> 205). The saved PNG and the
    metrics follow BasicSR, i.e. float32."""
    import numpy as np

    from m2r.eval.metrics import as_saved_uint8

    values = torch.tensor([float.fromhex("0x1.9c9c9cp-1"), float.fromhex("0x1.f3f3f4p-2")], dtype=torch.float32)
    basicsr = np.round(values.numpy().clip(0, 1) * 255.0)          # tensor2img: float32 numpy
    assert as_saved_uint8(values).tolist() == basicsr.tolist() == [206, 124]
    prediction, target = torch.full((3, 16, 16), values[0].item()), torch.full((3, 16, 16), 206 / 255)
    assert image_metrics(prediction, target, ["rgb"])["psnr_rgb"] == pytest.approx(100.0)
