"""Procedural scenes: deterministic, linear RGB on [0, 1], and each kind what it claims to be."""
import numpy as np
import pytest

from megfb import scenes


@pytest.mark.parametrize("kind", scenes.KINDS)
def test_scene_is_deterministic_linear_rgb(kind):
    a = scenes.procedural_scene(np.random.default_rng([3, 1]), kind)
    b = scenes.procedural_scene(np.random.default_rng([3, 1]), kind)
    c = scenes.procedural_scene(np.random.default_rng([3, 2]), kind)
    assert a.shape == (256, 256, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


def _scenes(kind, n=12):
    return [scenes.procedural_scene(np.random.default_rng([7, i]), kind) for i in range(n)]


def test_gratings_reach_fine_periods():
    # power above a quarter of the sampling rate: the range where a Bayer mosaic aliases
    fine = []
    for img in _scenes("gratings"):
        spec = np.abs(np.fft.fft2(img.mean(2) - img.mean())) ** 2
        f = np.abs(np.fft.fftfreq(256))
        high = (f[:, None] > 0.25) | (f[None, :] > 0.25)
        fine.append(spec[high].sum() / spec.sum())
    assert max(fine) > 0.3 and min(fine) < 0.05  # both fine and coarse textures occur


def test_strokes_have_sharp_edges_and_highlights_are_bright_spots():
    steps = [np.abs(np.diff(img.mean(2), axis=1)).max() for img in _scenes("strokes")]
    assert np.median(steps) > 0.2
    for img in _scenes("highlights", 6):
        assert img.max() > 0.6 and np.mean(img) < 0.35
        assert (img.max(2) > 0.5).mean() < 0.05  # small sources on a dim scene


def _saturated_share():
    rgb = scenes.random_colours(np.random.default_rng(0), 4000)
    srgb = np.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * rgb ** (1 / 2.4) - 0.055)
    sat = (srgb.max(1) - srgb.min(1)) / np.maximum(srgb.max(1), 1e-6)
    return (sat > 0.85).mean()


def test_some_colours_are_saturated(monkeypatch):
    with_pure_hues = _saturated_share()
    monkeypatch.setattr(scenes, "SATURATED_SHARE", 0.0)
    uniform = _saturated_share()
    # a 30% share of pure hues on top of uniform sRGB colours
    assert with_pure_hues - uniform == pytest.approx(0.3 * (1 - uniform), abs=0.04)
