"""Synthetic degradations of RGB images in [0, 1].

The degradations work on planar float32 images (3, H, W). Channel-first is for speed: per-pixel maps
(H, W) and per-channel constants (3, 1, 1) then broadcast along contiguous rows, where numpy is
about 10x slower broadcasting against a trailing axis of 3. The training stream stays planar from
crop to batch. `haze`, `rain`, ... (the registered names) take and return ordinary (H, W, 3) images;
`DEGRADATIONS` maps each name to its planar implementation.

A new degradation: a planar function decorated with `@degradation` and its name in `PHYSICAL_ORDER`
(steps of a type are applied in that order).

Every degradation is `fn(img, rng, **fixed) -> (degraded, params)`: parameters not fixed by the
caller are drawn from `rng` within the documented ranges, and `params` records every value used
(JSON-serialisable), so a sample can be reproduced and its metadata stored in shards. Outputs may
leave [0, 1]; `apply_steps` clips once at the end. Lengths are given for a 256-pixel short side
and scale with the image.
"""
from __future__ import annotations

import functools
import math
from statistics import NormalDist
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

DEGRADATIONS: Dict[str, Callable] = {}   # name -> planar implementation
# Physical order of image formation: the atmosphere attenuates the scene (haze), particles fall in
# front of it (rain, snow), drops sit on the lens, the camera moves (blur), the sensor integrates
# little light (low light) and adds read noise. A new degradation takes its place here.
PHYSICAL_ORDER: Tuple[str, ...] = ("haze", "rain_fog", "rain", "snow", "raindrop", "motion_blur", "low_light",
                                   "noise")


def degradation(planar: Callable) -> Callable:
    """Register a planar degradation under its name; return its (H, W, 3) form."""
    if planar.__name__ not in PHYSICAL_ORDER:   # else every preset using it fails, naming nothing
        raise ValueError(f"degradation {planar.__name__!r} has no place in PHYSICAL_ORDER "
                         f"(m2r/data/degradations.py): add it where it happens in image formation")
    DEGRADATIONS[planar.__name__] = planar

    @functools.wraps(planar)
    def on_hwc(img: np.ndarray, rng: np.random.Generator, **fixed):
        out, params = planar(to_planes(img), rng, **fixed)
        return from_planes(out), params
    return on_hwc


def to_planes(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> C-contiguous float32 (3, H, W)."""
    return np.ascontiguousarray(np.moveaxis(img, -1, 0), dtype=np.float32)


def from_planes(planes: np.ndarray) -> np.ndarray:
    """(3, H, W) -> C-contiguous (H, W, 3)."""
    return np.ascontiguousarray(np.moveaxis(planes, 0, -1))


def _draw(rng: np.random.Generator, given, low: float, high: float) -> float:
    return float(given) if given is not None else float(rng.uniform(low, high))


def _normal_quantiles(bits: int = 16) -> np.ndarray:
    inverse_cdf = NormalDist().inv_cdf   # the standard library's: the table equals scipy's ndtri one
    levels = np.array([inverse_cdf((index + 0.5) / 2 ** bits) for index in range(2 ** bits)])
    return (levels / levels.std()).astype(np.float32)


_NORMAL_TABLE = _normal_quantiles()


def standard_normal(rng: np.random.Generator, shape) -> np.ndarray:
    """float32 N(0, 1) samples from `rng` by inverse-transform sampling: 16 random bits pick one of
    the 2^16 normal quantiles (rescaled to unit variance). Tails stop at 4.3 sigma (p = 3e-5) and
    levels near 0 are 1e-4 sigma apart, far finer than 8-bit pixels; 2.5x faster than
    torch.randn and 10x numpy's float32 sampler."""
    size = math.prod(shape)
    bits = rng.bit_generator.random_raw((size + 3) // 4).view(np.uint16)[:size]
    return np.take(_NORMAL_TABLE, bits).reshape(shape)


def _scale_px(planes: np.ndarray, px: float) -> float:
    """Lengths are specified for a 256-pixel short side and scale with the image."""
    return px * min(planes.shape[1:]) / 256.0


# ----------------------------------------------------------------------------- rasterising helpers

def _splat(h: int, w: int, ys: np.ndarray, xs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float32 (h, w) sum of `weights` at integer pixel positions (ys, xs); positions off the image
    are dropped."""
    yi = np.rint(ys).astype(np.int32).ravel()
    xi = np.rint(xs).astype(np.int32).ravel()
    keep = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    flat = yi[keep] * w + xi[keep]
    weights = np.broadcast_to(weights, ys.shape).ravel()[keep]
    return np.bincount(flat, weights=weights, minlength=h * w).reshape(h, w).astype(np.float32)


def _soften(layer: np.ndarray) -> np.ndarray:
    """[1, 2, 1]/4 blur along both axes, edges replicated: anti-aliases rasterised lines at a
    fraction of a filter's cost."""
    padded = np.pad(layer, 1, mode="edge")
    rows = padded[:-2] + padded[2:] + 2 * padded[1:-1]
    return (rows[:, :-2] + rows[:, 2:] + 2 * rows[:, 1:-1]) * np.float32(1.0 / 16.0)


def _count_for_coverage(coverage: float, area_px: float, h: int, w: int) -> int:
    """Particles of `area_px` placed uniformly cover a fraction 1 - exp(-n a / HW) (Poisson overlap)."""
    return max(1, int(round(-math.log1p(-coverage) * h * w / max(area_px, 1.0))))


def _smooth_field(h: int, w: int, rng: np.random.Generator, grid: int = 4) -> np.ndarray:
    """Bilinear upsampling of a grid x grid uniform random field: smooth, in [0, 1]."""
    coarse = rng.uniform(0.0, 1.0, (grid, grid))
    ry = np.interp(np.linspace(0, grid - 1, h), np.arange(grid), np.arange(grid))
    rx = np.interp(np.linspace(0, grid - 1, w), np.arange(grid), np.arange(grid))
    wy = np.maximum(0.0, 1.0 - np.abs(ry[:, None] - np.arange(grid)[None, :]))
    wx = np.maximum(0.0, 1.0 - np.abs(rx[:, None] - np.arange(grid)[None, :]))
    return (wy @ coarse @ wx.T).astype(np.float32)


def _rescale_unit(values: np.ndarray) -> np.ndarray:
    """Min-max rescale to [0, 1] (a constant map becomes 0)."""
    return (values - values.min()) / max(float(values.max() - values.min()), 1e-6)


def pseudo_depth(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth stand-in for scene depth in [0, 1] (1 = far) when no depth map is given.

    Outdoor photos are usually farther at the top (sky, horizon) and nearer at the bottom, so depth
    is 0.6 x a top-to-bottom ramp plus 0.4 x a bilinear 4x4 random field, then rescaled to [0, 1].
    """
    ramp = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]
    depth = np.float32(0.6) * ramp + np.float32(0.4) * _smooth_field(h, w, rng)
    return _rescale_unit(depth)


def _channels(values) -> np.ndarray:
    """Per-channel constants shaped to broadcast over planes."""
    return np.asarray(values, np.float32)[:, None, None]


# ----------------------------------------------------------------------------- weather

def rain_layer(h: int, w: int, rng: np.random.Generator, *, angle: float, density: float,
               length: float, width: int, brightness: float) -> np.ndarray:
    """Rain-streak intensity (H, W) in [0, 1]: `density` streaks per pixel, `angle` degrees from
    vertical (positive leans right at the bottom), `length`/`width` in pixels."""
    count = max(1, int(density * h * w))
    theta = math.radians(angle)
    dx, dy = math.sin(theta), math.cos(theta)
    lengths = length * rng.uniform(0.6, 1.0, count)
    # Starts extend above and beside the frame so streaks also enter through the borders.
    y0 = rng.uniform(-length, h, count)
    x0 = rng.uniform(-length * abs(dx) - 1, w + length * abs(dx), count)
    strength = rng.uniform(0.5, 1.0, count)
    steps = np.arange(int(math.ceil(length)), dtype=np.float32)
    on_streak = steps[None, :] < lengths[:, None]
    ys = (y0[:, None] + steps * dy)[on_streak]
    xs = (x0[:, None] + steps * dx)[on_streak]
    weights = np.broadcast_to(strength[:, None], on_streak.shape)[on_streak]
    offsets = np.arange(int(width))[:, None]   # thick streaks: parallel lines one pixel apart
    layer = _splat(h, w, ys - offsets * dx, xs + offsets * dy, weights)
    return np.clip(_soften(layer) * np.float32(brightness), 0.0, 1.0)


def _screen(planes: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Light added in front of the scene, saturating instead of clipping: 1 - (1-I)(1-L)."""
    return 1.0 - (1.0 - planes) * (1.0 - layer)


@degradation
def rain(img, rng, *, angle=None, density=None, length=None, width=None, brightness=None):
    """Rain streaks (Rain100L/H style): angle [-30, 30] deg, density [0.002, 0.008] streaks/pixel,
    length [10, 40] px, width 1-2 px, brightness [0.5, 0.9] (lengths at a 256-pixel short side)."""
    _, h, w = img.shape
    p = dict(angle=_draw(rng, angle, -30, 30), density=_draw(rng, density, 0.002, 0.008),
             length=_draw(rng, length, _scale_px(img, 10), _scale_px(img, 40)),
             width=int(width) if width is not None else int(rng.integers(1, 3)),
             brightness=_draw(rng, brightness, 0.5, 0.9))
    return _screen(img, rain_layer(h, w, rng, **p)), p


@degradation
def haze(img, rng, *, beta=None, airlight=None, depth: Optional[np.ndarray] = None):
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-beta d). `depth` (H, W) is rescaled to
    [0, 1] (1 = far); without it `pseudo_depth` is used. beta [0.8, 2.8], A [0.7, 1.0] with a
    +-0.03 per-channel tint."""
    _, h, w = img.shape
    beta = _draw(rng, beta, 0.8, 2.8)
    a = _draw(rng, airlight, 0.7, 1.0)
    tint = rng.uniform(-0.03, 0.03, 3)
    airlight_rgb = _channels(np.clip(a + tint, 0.0, 1.0))
    if depth is None:
        d = pseudo_depth(h, w, rng)
    else:
        d = _rescale_unit(np.asarray(depth, np.float32))
    t = np.exp(np.float32(-beta) * d)
    out = (img - airlight_rgb) * t + airlight_rgb
    return out, dict(beta=beta, airlight=[float(v) for v in airlight_rgb.ravel()],
                     depth="given" if depth is not None else "pseudo")


@degradation
def rain_fog(img, rng, **fixed):
    """Heavy rain with fog (Outdoor-Rain, Li et al. 2019): I = T (J + S) + (1 - T) A, i.e. dense,
    long streaks under an atmospheric veil. `fixed` keys: rain_<name> / fog_<name>."""
    rain_fixed = {k[5:]: v for k, v in fixed.items() if k.startswith("rain_")}
    fog_fixed = {k[4:]: v for k, v in fixed.items() if k.startswith("fog_")}
    rain_fixed.setdefault("density", _draw(rng, None, 0.006, 0.015))
    rain_fixed.setdefault("length", _draw(rng, None, _scale_px(img, 25), _scale_px(img, 60)))
    rain_fixed.setdefault("width", int(rng.integers(1, 4)))
    fog_fixed.setdefault("beta", _draw(rng, None, 0.5, 1.8))
    streaked, rain_p = DEGRADATIONS["rain"](img, rng, **rain_fixed)
    fogged, fog_p = DEGRADATIONS["haze"](streaked, rng, **fog_fixed)
    return fogged, dict(rain=rain_p, fog=fog_p)


def _particle_stamp(radius: float, motion: float, angle: float) -> np.ndarray:
    """Soft disc of `radius` swept over `motion` pixels at `angle` (deg from vertical)."""
    half = int(math.ceil(radius + motion / 2 + 1))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    dx, dy = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    along = np.clip(xx * dx + yy * dy, -motion / 2, motion / 2)
    dist = np.hypot(xx - along * dx, yy - along * dy)
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


SNOW_SIZES = ((0.7, 1.3), (1.5, 2.5), (3.0, 4.5))   # particle radius ranges (px at a 256 short side)
SNOW_SHARE = (0.5, 0.3, 0.2)                        # share of the coverage per size class


@degradation
def snow(img, rng, *, coverage=None, angle=None, motion=None, brightness=None):
    """Snow (Snow100K style): small, medium and large flakes, each class motion-blurred along
    `angle` (deg from vertical, [-40, 40]) over `motion` px ([0, 6], larger flakes are nearer and
    smear more). `coverage` [0.03, 0.15] is the fraction of pixels with flake opacity > 0.5."""
    _, h, w = img.shape
    p = dict(coverage=_draw(rng, coverage, 0.03, 0.15), angle=_draw(rng, angle, -40, 40),
             motion=_draw(rng, motion, 0.0, _scale_px(img, 6)), brightness=_draw(rng, brightness, 0.85, 1.0))
    alpha = np.zeros((h, w), np.float32)
    for (r_lo, r_hi), share in zip(SNOW_SIZES, SNOW_SHARE):
        radius = rng.uniform(_scale_px(img, r_lo), _scale_px(img, r_hi))
        stamp = _particle_stamp(radius, p["motion"] * radius / _scale_px(img, SNOW_SIZES[-1][1]), p["angle"])
        class_coverage = 1.0 - (1.0 - p["coverage"]) ** share
        count = _count_for_coverage(class_coverage, float((stamp > 0.5).sum()), h, w)
        cy, cx = rng.uniform(0, h, count), rng.uniform(0, w, count)
        opacity = rng.uniform(0.8, 1.0, count)
        half = stamp.shape[0] // 2
        oy, ox = np.nonzero(stamp)
        weights = opacity[:, None] * stamp[oy, ox][None, :]
        alpha += _splat(h, w, cy[:, None] + (oy - half), cx[:, None] + (ox - half), weights)
    np.clip(alpha, 0.0, 1.0, out=alpha)
    return img + alpha * (np.float32(p["brightness"]) - img), p


def _box_average(planes: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks (the bottom and right remainders are dropped)."""
    _, h, w = planes.shape
    blocks = planes[:, : h // f * f, : w // f * f]
    cols = sum(blocks[:, :, i::f] for i in range(f))
    return sum(cols[:, i::f] for i in range(f)) * np.float32(1.0 / (f * f))


@degradation
def raindrop(img, rng, *, coverage=None, radius=None, magnification=None, rim=None):
    """Raindrops on the lens (RainDrop style). Each drop is a small inverted wide-angle lens: it
    shows a blurred view of the scene around it, mirrored through its centre and widened by
    `magnification` [1.5, 3]; a bright rim `rim` [0.1, 0.35] marks its edge, lower side brighter.
    `coverage` [0.05, 0.25] is the fraction of pixels inside a drop; mean `radius` [6, 16] px."""
    _, h, w = img.shape
    p = dict(coverage=_draw(rng, coverage, 0.05, 0.25),
             radius=_draw(rng, radius, max(2.0, _scale_px(img, 6)), max(3.0, _scale_px(img, 16))),
             magnification=_draw(rng, magnification, 1.5, 3.0), rim=_draw(rng, rim, 0.1, 0.35))
    # E[r^2] for r = radius * U(0.6, 1.4) is radius^2 * 1.0533
    count = _count_for_coverage(p["coverage"], math.pi * p["radius"] ** 2 * 1.0533, h, w)
    radii = p["radius"] * rng.uniform(0.6, 1.4, count)
    cy, cx = rng.uniform(0, h, count), rng.uniform(0, w, count)
    # A drop is out of focus: it refracts a 4x box-averaged copy of the scene.
    f = 4
    small = _box_average(img, f)
    half = int(math.ceil(radii.max()))
    oy, ox = (g.ravel() for g in np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32))
    dist = np.hypot(oy, ox)[None, :] / radii[:, None].astype(np.float32)   # (drops, offsets), 1 at the edge
    py = np.rint(cy[:, None] + oy).astype(np.int32)
    px = np.rint(cx[:, None] + ox).astype(np.int32)
    drop, k = np.nonzero((dist < 1.0) & (py >= 0) & (py < h) & (px >= 0) & (px < w))
    oy, ox, dist = oy[k], ox[k], dist[drop, k]
    sy = (np.clip(cy[drop] - oy * p["magnification"], 0, h - 1) // f).astype(np.int32)
    sx = (np.clip(cx[drop] - ox * p["magnification"], 0, w - 1) // f).astype(np.int32)
    np.minimum(sy, small.shape[1] - 1, out=sy)
    np.minimum(sx, small.shape[2] - 1, out=sx)
    rim_light = (np.float32(p["rim"]) * np.clip((dist - 0.75) / 0.25, 0.0, 1.0)
                 * np.where(oy > 0, np.float32(1.0), np.float32(0.6)))
    out = img.copy()
    # drops are drawn in order: where they overlap, the later one is in front
    out[:, py[drop, k], px[drop, k]] = small[:, sy, sx] + rim_light
    return out, p


# ----------------------------------------------------------------------------- camera

@degradation
def low_light(img, rng, *, exposure=None, gamma=None, shot=None, read=None):
    """Low light: J_low = exposure * cast * J**gamma, then Poisson-Gaussian sensor noise with
    variance shot * J_low + read**2. exposure [0.15, 0.45], gamma [1.2, 2.0], per-channel colour
    cast gains 1 +- 0.1, shot [0.002, 0.01], read [0.002, 0.01]."""
    p = dict(exposure=_draw(rng, exposure, 0.15, 0.45), gamma=_draw(rng, gamma, 1.2, 2.0),
             cast=[float(v) for v in rng.uniform(0.9, 1.1, 3)],
             shot=_draw(rng, shot, 0.002, 0.01), read=_draw(rng, read, 0.002, 0.01))
    # J**gamma as exp(gamma log J): numpy vectorises exp and log, not float32 power (5x faster)
    dark = np.log(np.maximum(img, np.float32(1e-12)))
    dark *= np.float32(p["gamma"])
    np.exp(dark, out=dark)
    dark *= _channels(p["cast"]) * np.float32(p["exposure"])
    std = np.sqrt(np.float32(p["shot"]) * dark + np.float32(p["read"] ** 2))
    noise_ = standard_normal(rng, img.shape)
    noise_ *= std
    dark += noise_
    return dark, p


@degradation
def noise(img, rng, *, sigma=None):
    """Additive white Gaussian noise; `sigma` on the 0-255 scale, [5, 50] when not fixed."""
    p = dict(sigma=_draw(rng, sigma, 5, 50))
    noisy = standard_normal(rng, img.shape)
    noisy *= np.float32(p["sigma"] / 255.0)
    noisy += img
    return noisy, p


@degradation
def motion_blur(img, rng, *, length=None, angle=None):
    """Linear motion blur: mean of the image shifted along a segment of `length` [5, 21] px at
    `angle` [0, 180) deg (from the x axis), edges replicated."""
    p = dict(length=_draw(rng, length, _scale_px(img, 5), _scale_px(img, 21)), angle=_draw(rng, angle, 0, 180))
    taps = max(2, int(round(p["length"])))
    t = np.linspace(-0.5, 0.5, taps) * p["length"]
    shift_y = np.rint(-t * math.sin(math.radians(p["angle"]))).astype(int)
    shift_x = np.rint(t * math.cos(math.radians(p["angle"]))).astype(int)
    pad = int(max(np.abs(shift_y).max(), np.abs(shift_x).max()))
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    _, h, w = img.shape
    out = np.zeros_like(img)
    for sy, sx in zip(shift_y, shift_x):
        out += padded[:, pad + sy: pad + sy + h, pad + sx: pad + sx + w]
    out *= np.float32(1.0 / taps)
    return out, p


# ----------------------------------------------------------------------------- composition

Step = Tuple[str, Dict[str, object]]


def in_physical_order(steps: Sequence[Step]) -> Tuple[Step, ...]:
    unknown = [name for name, _ in steps if name not in DEGRADATIONS]
    if unknown:
        raise ValueError(f"unknown degradation {unknown}; known: {sorted(DEGRADATIONS)}")
    return tuple(sorted(steps, key=lambda step: PHYSICAL_ORDER.index(step[0])))


def apply_planar_steps(planes: np.ndarray, rng: np.random.Generator, steps: Sequence[Step]):
    """Apply `steps` to float32 (3, H, W) planes in physical order, each with its own child
    generator drawn from `rng` (so one step's parameter count never shifts another's randomness);
    clip to [0, 1] at the end."""
    params = []
    for name, fixed in in_physical_order(steps):
        child = np.random.default_rng(int(rng.integers(2 ** 63)))
        planes, used = DEGRADATIONS[name](planes, child, **fixed)
        params.append({"name": name, **used})
    return np.clip(planes, 0.0, 1.0), params


def apply_steps(img: np.ndarray, rng: np.random.Generator, steps: Sequence[Step]):
    """`apply_planar_steps` on an (H, W, 3) image."""
    planes, params = apply_planar_steps(to_planes(img), rng, steps)
    return from_planes(planes), params


def to_float(img_u8: np.ndarray) -> np.ndarray:
    """uint8 -> C-contiguous float32 in [0, 1], whatever the strides of `img_u8`."""
    out = np.empty(img_u8.shape, np.float32)
    np.multiply(img_u8, np.float32(1.0 / 255.0), out=out)
    return out


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round to uint8 (any layout)."""
    scaled = img * np.float32(255.0)
    scaled += np.float32(0.5)
    np.clip(scaled, 0.0, 255.5, out=scaled)
    return scaled.astype(np.uint8)
