"""Small real raw files for the tests, made here (no downloads): synthetic Bayer scenes with
sensor-like noise, written as DNG (tifffile with DNG tags, read back by LibRaw through rawpy),
16-bit TIFF/PNG and .npy mosaics; and a tiny random-initialised FBRestormer."""
import numpy as np

from megfb.model import build_model
from megfb.raw import write_dng

TINY = {"num_feats": 8, "heads": 2, "num_blocks": 3, "num_steps": 2}
TINY_YAML = "model: {name: fbrestormer, num_feats: 8, heads: 2, num_blocks: 3, num_steps: 2}\n"
COLOUR_GAIN = {"R": 0.55, "G": 1.0, "B": 0.7}  # a daylight-ish raw: green strongest


def tiny_model(seed=0):
    """The same weights for the same seed (the initialisers draw from both generators)."""
    import megengine as mge

    mge.random.seed(seed)
    np.random.seed(seed)
    model = build_model(TINY)
    rng = np.random.RandomState(seed)
    model.load_state_dict({
        k: v if k in ("mean", "std") else v + rng.randn(*v.shape).astype(np.float32) * 0.1
        for k, v in model.state_dict().items()})
    model.eval()
    return model


def scene(h, w, seed=0):
    """A smooth grey scene on [0, 1]: a gradient, discs and a soft stripe pattern."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    s = 0.15 + 0.35 * xx / max(w - 1, 1) + 0.1 * yy / max(h - 1, 1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.25) * min(h, w)
        s = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, rng.uniform(0.1, 0.9), s)
    s += 0.05 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    return np.clip(s, 0, 1)


def bayer_scene(h, w, pattern="RGGB", black=512, white=16383, noise=0.02, seed=0):
    """(clean float, noisy uint16) mosaics of `pattern` with the given levels.

    noise: standard deviation of Gaussian noise on the [0, 1] signal scale (plus shot noise of
    the same order at full signal)."""
    rng = np.random.default_rng(seed)
    black = np.broadcast_to(np.asarray(black, np.float64).reshape(-1), (4,)).reshape(2, 2)
    gains = np.array([COLOUR_GAIN[c] for c in pattern]).reshape(2, 2)
    site = np.tile(gains, ((h + 1) // 2, (w + 1) // 2))[:h, :w]
    blk = np.tile(black, ((h + 1) // 2, (w + 1) // 2))[:h, :w]
    signal = scene(h, w, seed) * site
    sd = np.sqrt(noise ** 2 + noise ** 2 * signal)
    noisy = signal + rng.standard_normal((h, w)) * sd
    span = white - blk
    clean = blk + signal * span
    noisy = np.clip(np.rint(blk + noisy * span), 0, white).astype(np.uint16)
    return clean, noisy


def dng_extra(noise_profile=None, neutral=(0.55, 1.0, 0.7)):
    """Colour tags of a plausible camera (identity-ish matrix, daylight as-shot neutral), an
    optional NoiseProfile (pairs per CFA plane, or one pair), Make and Model."""
    m = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    tags = [
        (271, "s", 0, "megfb", True),
        (272, "s", 0, "synthetic test camera", True),
        (50708, "s", 0, "megfb synthetic", True),
        (50721, "2i", 9, tuple(v for x in m for v in (int(x * 10000), 10000)), True),  # ColorMatrix1
        (50778, "H", 1, (21,), True),  # CalibrationIlluminant1: D65
        (50728, "2I", 3, tuple(v for x in neutral for v in (int(x * 10000), 10000)), True),  # AsShotNeutral
    ]
    if noise_profile is not None:
        values = tuple(float(v) for v in np.ravel(noise_profile))
        tags.append((51041, "d", len(values), values, True))
    return tags


def make_dng(path, h=96, w=128, pattern="RGGB", black=512, white=16383, noise=0.02, seed=0, noise_profile=None):
    """Write a noisy synthetic DNG; returns (clean, noisy) as bayer_scene."""
    clean, noisy = bayer_scene(h, w, pattern, black, white, noise, seed)
    write_dng(path, noisy, pattern, np.broadcast_to(np.asarray(black, np.float64).reshape(-1), (4,)), white,
              dng_extra(noise_profile))
    return clean, noisy
