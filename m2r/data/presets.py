"""Degradation presets (the task mixtures of the benchmarks) and the per-sample type sampler.

A preset is an ordered list of degradation types; a type's id is its index in that list, so ids
are stable per preset. Each type is one or more steps of `degradations.DEGRADATIONS`, applied in
physical order whatever order they are listed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np

from m2r.config import config_error
from m2r.data.config import PRESET_NAMES
from m2r.data.degradations import Step, apply_planar_steps, from_planes, in_physical_order, to_float, to_uint8


@dataclass(frozen=True)
class DegradationType:
    name: str
    steps: Tuple[Step, ...]


def _type(name: str, *steps) -> DegradationType:
    normalised = [(s, {}) if isinstance(s, str) else s for s in steps]
    return DegradationType(name, in_physical_order(normalised))


# A new preset: add it here and its name to PRESET_NAMES (m2r/data/config.py, the config's choices); the
# shard builder, the training stream, validation per type and the gallery then know it.
PRESETS: Dict[str, Tuple[DegradationType, ...]] = {
    # CDD-11 (OneRestore): low light, haze, rain, snow and their physically plausible composites.
    "cdd11": (
        _type("low", "low_light"), _type("haze", "haze"), _type("rain", "rain"), _type("snow", "snow"),
        _type("low_haze", "low_light", "haze"), _type("low_rain", "low_light", "rain"),
        _type("low_snow", "low_light", "snow"), _type("haze_rain", "haze", "rain"),
        _type("haze_snow", "haze", "snow"), _type("low_haze_rain", "low_light", "haze", "rain"),
        _type("low_haze_snow", "low_light", "haze", "snow"),
    ),
    # AllWeather: Outdoor-Rain (rain + fog), Snow100K, RainDrop.
    "allweather": (_type("rain_fog", "rain_fog"), _type("snow", "snow"), _type("raindrop", "raindrop")),
    # Five-task all-in-one (AdaIR): denoising at three levels, deraining, dehazing, deblurring, low light.
    "five-task": (
        _type("noise_15", ("noise", {"sigma": 15})), _type("noise_25", ("noise", {"sigma": 25})),
        _type("noise_50", ("noise", {"sigma": 50})), _type("rain", "rain"), _type("haze", "haze"),
        _type("blur", "motion_blur"), _type("low", "low_light"),
    ),
}


if tuple(PRESETS) != PRESET_NAMES:   # the shard builder takes any of PRESETS, training only the config's choices
    raise ImportError(f"m2r/data/config.py's PRESET_NAMES {PRESET_NAMES} (data.preset's choices) must list the "
                      f"presets of m2r/data/presets.py, in their order (the first is the default): {tuple(PRESETS)}")


def preset_types(preset: str) -> Tuple[DegradationType, ...]:
    if preset not in PRESETS:
        raise config_error("data.preset", f"'{preset}' is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def type_names(preset: str) -> List[str]:
    return [t.name for t in preset_types(preset)]


def mixture_probabilities(preset: str, weights: Mapping[str, float]) -> np.ndarray:
    """Sampling probability per type id; empty `weights` = uniform, listed types default to 0."""
    names = type_names(preset)
    if not weights:
        return np.full(len(names), 1.0 / len(names))
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise config_error("data.weights", f"types {unknown} are not in preset '{preset}' ({names})")
    # OmegaConf lets a list into this mapping of floats (`data.weights.rain=[1]`)
    not_numbers = sorted(name for name, value in weights.items() if not isinstance(value, (int, float)))
    if not_numbers:
        raise config_error("data.weights", f"types {not_numbers} must each have one number as weight: {dict(weights)}")
    raw = np.array([float(weights.get(n, 0.0)) for n in names])
    if (raw < 0).any() or raw.sum() <= 0:
        raise config_error("data.weights", f"value {dict(weights)} must be >= 0 with a positive sum")
    return raw / raw.sum()


class Degrader:
    """Draws a type from the preset's mixture and degrades a clean uint8 image with it."""

    def __init__(self, preset: str, weights: Mapping[str, float] = ()):
        self.types = preset_types(preset)
        self.probabilities = mixture_probabilities(preset, dict(weights))

    def __call__(self, clean: np.ndarray, rng: np.random.Generator):
        """(H, W, 3) `clean` -> (lq uint8 (H, W, 3), type_id, params list)."""
        return self.degrade(clean, self.sample_type(rng), rng)

    def sample_type(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.types), p=self.probabilities))

    def degrade(self, clean: np.ndarray, type_id: int, rng: np.random.Generator):
        """(H, W, 3) `clean` -> (lq uint8 (H, W, 3), type_id, params list)."""
        lq, params = self.degrade_planes(clean.transpose(2, 0, 1), type_id, rng)
        return from_planes(lq), type_id, params

    def degrade_planes(self, clean: np.ndarray, type_id: int, rng: np.random.Generator):
        """uint8 (3, H, W) `clean`, any strides -> (lq uint8 (3, H, W), params list)."""
        degraded, params = apply_planar_steps(to_float(clean), rng, self.types[type_id].steps)
        return to_uint8(degraded), params
