"""Physical properties of the synthetic degradations, composition order and determinism."""
import math

import numpy as np
import pytest
from scipy import ndimage

from m2r.config import ConfigError
from m2r.data import degradations as D
from m2r.data.builtin import load_photo
from m2r.data.presets import PRESETS, Degrader, mixture_probabilities


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def photo():
    return D.to_float(load_photo("astronaut")[100:356, 150:406])


def test_haze_lowers_contrast_and_lifts_dark_pixels_toward_airlight(photo):
    hazy, p = D.haze(photo, rng(), beta=2.0, airlight=0.9)
    assert hazy.std() < 0.7 * photo.std()
    dark = photo.mean(axis=2) < 0.1
    assert dark.sum() > 100 and hazy[dark].mean() > photo[dark].mean() + 0.2
    airlight = np.asarray(p["airlight"])
    assert np.all(np.abs(hazy - airlight) <= np.abs(photo - airlight) + 1e-6)


def test_haze_follows_a_given_depth_map(photo):
    depth = np.zeros(photo.shape[:2], np.float32)
    depth[:, 128:] = 1.0   # right half far
    hazy, p = D.haze(photo, rng(), beta=1.5, airlight=1.0, depth=depth)
    assert p["depth"] == "given"
    assert np.allclose(hazy[:, :128], photo[:, :128], atol=1e-6)       # t = 1 at depth 0
    transmission = math.exp(-1.5)
    assert np.allclose(hazy[:, 128:], photo[:, 128:] * transmission + np.asarray(p["airlight"]) * (1 - transmission),
                       atol=1e-5)


def test_pseudo_depth_is_smooth_in_unit_range_and_far_at_the_top():
    depth = D.pseudo_depth(128, 160, rng(3))
    assert depth.min() == 0.0 and depth.max() == pytest.approx(1.0)
    assert np.abs(np.diff(depth, axis=0)).max() < 0.05 and np.abs(np.diff(depth, axis=1)).max() < 0.05
    assert depth[:16].mean() > depth[-16:].mean()


def test_low_light_darkens_and_its_noise_grows_with_signal():
    flat = np.concatenate([np.full((64, 64, 3), 0.2, np.float32), np.full((64, 64, 3), 0.9, np.float32)], axis=1)
    dark, _ = D.low_light(flat, rng(), exposure=0.4, gamma=1.0, shot=0.01, read=0.003)
    assert dark.mean() < 0.5 * flat.mean()
    dim_var, bright_var = dark[:, :64].var(), dark[:, 64:].var()
    assert bright_var > 2.0 * dim_var
    # Poisson-Gaussian: var = shot * signal + read^2 (cast gains stay within 10%)
    assert bright_var == pytest.approx(0.01 * 0.36 + 0.003 ** 2, rel=0.25)


def test_low_light_without_noise_is_exposure_times_cast_times_the_image_to_the_gamma():
    ramp = np.linspace(0.0, 1.0, 64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
    dark, p = D.low_light(ramp, rng(), exposure=0.3, gamma=2.0, shot=0.0, read=0.0)
    np.testing.assert_allclose(dark, 0.3 * np.asarray(p["cast"], np.float32) * ramp ** 2, atol=1e-6)


def _streak_angle(residual: np.ndarray, lag: float = 8.0) -> float:
    """Direction (deg from vertical) along which the residual best correlates with itself `lag`
    pixels away: streaks are long along their own direction only."""
    centred = residual - residual.mean()

    def correlation(angle):
        theta = math.radians(angle)
        moved = ndimage.shift(centred, (lag * math.cos(theta), lag * math.sin(theta)), order=1)
        return (centred * moved).mean()

    return max(np.arange(-45.0, 45.5, 1.0), key=correlation)


@pytest.mark.parametrize("angle", [-20.0, 0.0, 25.0])
def test_rain_adds_oriented_energy_at_the_configured_angle(angle):
    background = np.full((256, 256, 3), 0.3, np.float32)
    rainy, p = D.rain(background, rng(1), angle=angle, density=0.004, length=30, width=1)
    assert p["angle"] == angle
    residual = (rainy - background).mean(axis=2)
    assert residual.min() >= 0 and residual.mean() > 0.005
    assert _streak_angle(residual) == pytest.approx(angle, abs=3.0)


@pytest.mark.parametrize("coverage", [0.05, 0.12])
def test_snow_coverage_matches_the_configured_value(coverage):
    black = np.zeros((256, 256, 3), np.float32)
    snowy, _ = D.snow(black, rng(2), coverage=coverage, brightness=1.0)
    measured = (snowy.mean(axis=2) > 0.5).mean()
    assert measured == pytest.approx(coverage, rel=0.25)


def test_sampled_snow_and_raindrop_coverage_stay_in_their_ranges(photo):
    black = np.zeros((256, 256, 3), np.float32)
    for seed in range(4):
        snowy, p = D.snow(black, rng(seed), brightness=1.0)
        assert 0.03 <= p["coverage"] <= 0.15
        assert 0.03 * 0.75 <= (snowy.mean(axis=2) > 0.5).mean() <= 0.15 * 1.25
        dropped, p = D.raindrop(photo, rng(seed))
        assert 0.05 <= p["coverage"] <= 0.25
        assert 0.05 * 0.7 <= (np.abs(dropped - photo).max(axis=2) > 1e-6).mean() <= 0.25 * 1.25


@pytest.mark.parametrize("coverage", [0.08, 0.2])
def test_raindrops_cover_the_configured_fraction_with_bright_rims(coverage):
    texture = rng(5).uniform(0.2, 0.6, (256, 256, 3)).astype(np.float32)
    dropped, p = D.raindrop(texture, rng(6), coverage=coverage, rim=0.3)
    inside = np.abs(dropped - texture).max(axis=2) > 1e-6
    assert inside.mean() == pytest.approx(coverage, rel=0.25)
    assert dropped[inside].max() > texture.max() + 0.1     # rims brighter than anything in the scene


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_noise_residual_std_is_sigma(sigma):
    gray = np.full((256, 256, 3), 0.5, np.float32)
    noisy, _ = D.noise(gray, rng(sigma), sigma=sigma)
    assert (noisy - gray).std() * 255 == pytest.approx(sigma, rel=0.03)


def test_standard_normal_is_gaussian_and_reproducible():
    z = D.standard_normal(rng(4), (1000, 1000))
    assert z.dtype == np.float32 and z.shape == (1000, 1000)
    assert abs(z.mean()) < 0.005 and z.std() == pytest.approx(1.0, abs=0.005)
    assert (np.abs(z) > 2).mean() == pytest.approx(0.0455, rel=0.05)     # two-sided 2-sigma tail
    assert np.mean(z.astype(np.float64) ** 4) == pytest.approx(3.0, rel=0.02)   # Gaussian kurtosis
    assert np.array_equal(z, D.standard_normal(rng(4), (1000, 1000)))


def test_motion_blur_removes_high_frequencies_along_its_direction(photo):
    def detail(img):
        return np.abs(np.diff(img, axis=1)).mean()
    assert detail(D.motion_blur(photo, rng(), length=15, angle=0.0)[0]) < 0.6 * detail(photo)


@pytest.mark.parametrize("angle", [0.0, 37.0, 90.0])
def test_motion_blur_averages_so_a_flat_image_stays_as_bright(angle):
    flat = np.full((48, 64, 3), 0.6, np.float32)
    np.testing.assert_allclose(D.motion_blur(flat, rng(), length=9, angle=angle)[0], flat, atol=1e-6)


def test_lengths_scale_with_the_short_side_of_the_image():
    """Ranges are given for a 256-pixel short side: a 128 x 512 image halves them (motion blur: [5, 21] px)."""
    strip = np.zeros((128, 512, 3), np.float32)
    lengths = [D.motion_blur(strip, rng(seed))[1]["length"] for seed in range(20)]
    assert 2.5 <= min(lengths) and max(lengths) <= 10.5


def test_overlapping_snowflakes_never_make_a_pixel_brighter_than_the_snow():
    """Flake opacities add up but saturate at 1: the image moves toward the snow's brightness, never past it."""
    black = np.zeros((64, 64, 3), np.float32)
    snowy, _ = D.snow(black, rng(2), coverage=0.6, brightness=0.9, motion=0.0)
    assert snowy.max() <= 0.9 + 1e-6 and (snowy > 0.89).mean() > 0.3


def test_composites_apply_in_physical_order_whatever_the_listing(photo):
    listed = [("noise", {"sigma": 15}), ("low_light", {}), ("haze", {})]
    assert [name for name, _ in D.in_physical_order(listed)] == ["haze", "low_light", "noise"]
    out, params = D.apply_steps(photo, rng(7), listed)
    assert [p["name"] for p in params] == ["haze", "low_light", "noise"]
    # the same chain by hand: each step gets a child generator drawn from the parent in order
    parent = rng(7)
    manual = photo
    for fn, fixed in ((D.haze, {}), (D.low_light, {}), (D.noise, {"sigma": 15})):
        manual, _ = fn(manual, np.random.default_rng(int(parent.integers(2 ** 63))), **fixed)
    assert np.array_equal(out, np.clip(manual, 0, 1))


def test_a_degradation_without_a_place_in_the_physical_order_is_refused_where_it_is_registered():
    """Else the first preset using it fails at import with Python's 'tuple.index(x): x not in tuple'."""
    def jpeg(img, rng):
        return img, {}

    with pytest.raises(ValueError, match="'jpeg' has no place in PHYSICAL_ORDER"):
        D.degradation(jpeg)
    assert "jpeg" not in D.DEGRADATIONS


def test_the_configs_preset_choices_are_the_presets_defined():
    from m2r.data.config import PRESET_NAMES

    assert PRESET_NAMES == tuple(PRESETS)


def test_cdd11_composite_types_are_built_from_their_parts():
    steps = {t.name: [name for name, _ in t.steps] for t in PRESETS["cdd11"]}
    assert steps["low_haze_rain"] == ["haze", "rain", "low_light"]
    assert steps["low_haze_snow"] == ["haze", "snow", "low_light"]
    assert len(PRESETS["cdd11"]) == 11 and len(PRESETS["allweather"]) == 3 and len(PRESETS["five-task"]) == 7


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_same_seed_gives_the_same_bytes(preset):
    clean = load_photo("coffee")[:64, :96]
    degrader = Degrader(preset)
    for type_id in range(len(degrader.types)):
        first = degrader.degrade(clean, type_id, rng(11))[0]
        again = degrader.degrade(clean, type_id, rng(11))[0]
        other = degrader.degrade(clean, type_id, rng(12))[0]
        assert first.dtype == np.uint8 and first.shape == clean.shape
        assert first.tobytes() == again.tobytes()
        assert first.tobytes() != other.tobytes()


def test_mixture_weights_select_types_and_reject_unknown_names():
    probs = mixture_probabilities("allweather", {"snow": 3.0, "raindrop": 1.0})
    assert probs.tolist() == [0.0, 0.75, 0.25]
    degrader = Degrader("allweather", {"snow": 1.0})
    clean = np.zeros((16, 16, 3), np.uint8)
    assert {degrader(clean, rng(s))[1] for s in range(10)} == {1}
    with pytest.raises(ValueError, match="fog"):
        mixture_probabilities("allweather", {"fog": 1.0})


def test_float_images_round_to_the_nearest_8_bit_level():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    assert np.array_equal(D.to_uint8(D.to_float(levels)), levels)
    assert (D.to_uint8(np.full((3, 2, 2), 0.6 / 255, np.float32)) == 1).all()


def test_noise_sigma_is_on_the_255_scale():
    image = np.full((3, 512, 512), 0.5, np.float32)
    noisy, _ = D.DEGRADATIONS["noise"](image, np.random.default_rng(0), sigma=20)
    assert float((noisy - image).std()) == pytest.approx(20 / 255, rel=2e-3)


@pytest.mark.parametrize("weights", [{"snow": 0.0}, {"snow": 0.0, "raindrop": 0.0, "rain_fog": 0.0},
                                     {"snow": -1.0, "raindrop": 2.0}])
def test_mixture_weights_that_select_nothing_or_are_negative_are_refused(weights):
    """All-zero weights would give NaN probabilities (numpy: 'probabilities contain NaN' at the first draw)."""
    from m2r.data.presets import mixture_probabilities

    with pytest.raises(ConfigError, match=r"key 'data\.weights'.*must be >= 0 with a positive sum"):
        mixture_probabilities("allweather", weights)
