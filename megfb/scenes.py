"""Procedural clean scenes for the synthetic default set: what a handful of photographs lacks.

Each generator returns one linear-RGB scene (size, size, 3) float32 on [0, 1], a pure
function of the generator `rng` it is given:

- dead_leaves  occluding discs with a power-law radius distribution (the scale-invariant
               statistics of natural images), random colours, mild shading;
- gratings     periodic textures: sine, square and chirped gratings at any orientation, up
               to the mosaic's Nyquist frequency (where a Bayer sensor aliases), checkerboards;
- strokes      sharp edges and text-like strokes: random characters in OpenCV's Hershey
               fonts, lines and box outlines, anti-aliased or not, over flat or graded ground;
- gradients    smooth linear and radial gradients and flat areas split by straight edges;
- highlights   a dim scene with small bright light sources, so that exposure puts them near
               the sensor's clipping point.
Colours are drawn in sRGB and linearised; a share of them are saturated (pure hues).
"""
import string

import cv2
import numpy as np

KINDS = ("dead_leaves", "gratings", "strokes", "gradients", "highlights")
SATURATED_SHARE = 0.3  # of the random colours in every generator
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX,
          cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX_SMALL,
          cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, cv2.FONT_HERSHEY_SCRIPT_COMPLEX)
_GLYPHS = string.ascii_letters + string.digits + "#%&@$?!+=<>/()[]"


def inverse_srgb(x):
    """sRGB-encoded [0, 1] -> linear light."""
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def random_colours(rng, n):
    """n linear-RGB colours (n, 3) float32: uniform sRGB, or a saturated hue (SATURATED_SHARE)."""
    srgb = rng.uniform(0, 1, (n, 3))
    saturated = rng.uniform(size=n) < SATURATED_SHARE
    if saturated.any():
        k = int(saturated.sum())
        hsv = np.stack([rng.uniform(0, 180, k), rng.uniform(220, 255, k), rng.uniform(128, 255, k)], 1)
        rgb = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0] / 255.0
        srgb[saturated] = rgb
    return inverse_srgb(srgb).astype(np.float32)


def _grid(size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _blend(t, c0, c1):
    """Per-pixel mix of two colours by t in [0, 1]: (size, size, 3)."""
    return c0 + t[..., None] * (c1 - c0)


def dead_leaves(rng, size=256):
    img = np.empty((size, size, 3), np.float32)
    img[:] = random_colours(rng, 1)[0]
    rmin, rmax = 3.0, 90.0
    n = int(rng.integers(60, 160))
    u = rng.uniform(size=n)
    radii = (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5  # density ~ r^-3
    centres = rng.uniform(-10, size + 10, size=(n, 2))
    colours = random_colours(rng, n)
    slopes = rng.normal(0, 0.3, (n, 2)) / radii[:, None]
    for r, (cy, cx), c, (gy, gx) in zip(radii, centres, colours, slopes):
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, size)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - cy, xx - cx
        inside = dy * dy + dx * dx <= r * r
        shade = np.clip(1 + gy * dy + gx * dx, 0.2, 1.8)[..., None]
        img[y0:y1, x0:x1] = np.where(inside[..., None], c * shade, img[y0:y1, x0:x1])
    # a little optical blur: real lenses do not produce perfectly sharp one-pixel edges
    return cv2.GaussianBlur(np.clip(img, 0, 1), (0, 0), 0.7)


def gratings(rng, size=256):
    """1-3 overlaid periodic patterns; frequencies in cycles per pixel up to 0.5."""
    yy, xx = _grid(size)
    t = np.zeros((size, size), np.float32)
    layers = int(rng.integers(1, 4))
    for _ in range(layers):
        theta = rng.uniform(0, np.pi)
        u = np.cos(theta) * xx + np.sin(theta) * yy
        freq = float(np.exp(rng.uniform(np.log(0.01), np.log(0.5))))
        kind = rng.integers(4)
        if kind == 0:  # sine
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi))
        elif kind == 1:  # square (sharp-edged stripes)
            wave = (np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)
        elif kind == 2:  # chirp: the frequency sweeps across the patch
            f1 = float(np.exp(rng.uniform(np.log(0.01), np.log(0.5))))
            wave = 0.5 + 0.5 * np.cos(2 * np.pi * (freq * u + (f1 - freq) * u * u / (2.8 * size)))
        else:  # checkerboard
            v = -np.sin(theta) * xx + np.cos(theta) * yy
            wave = ((np.floor(freq * u) + np.floor(freq * v)) % 2).astype(np.float32)
        t += wave.astype(np.float32) / layers
    c0, c1 = random_colours(rng, 2)
    return np.clip(_blend(t, c0, c1), 0, 1).astype(np.float32)


def gradients(rng, size=256):
    """Linear or radial gradients, in up to four flat-or-graded areas split by straight edges."""
    yy, xx = _grid(size)
    img = np.empty((size, size, 3), np.float32)
    region = np.zeros((size, size), np.int64)
    for bit in range(int(rng.integers(0, 3))):  # straight edges through the patch
        theta, offset = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.8) * size
        side = np.cos(theta) * (xx - size / 2) + np.sin(theta) * (yy - size / 2) + size / 2 > offset
        region += side.astype(np.int64) << bit
    for r in np.unique(region):
        c0, c1 = random_colours(rng, 2)
        style = rng.integers(3)
        if style == 0:  # flat
            fill = np.broadcast_to(c0, (size, size, 3))
        elif style == 1:  # linear
            theta = rng.uniform(0, 2 * np.pi)
            t = (np.cos(theta) * xx + np.sin(theta) * yy) / (size * 1.42) + 0.5
            fill = _blend(np.clip(t, 0, 1), c0, c1)
        else:  # radial
            cy, cx = rng.uniform(0, size, 2)
            t = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (size * rng.uniform(0.3, 1.2))
            fill = _blend(np.clip(t, 0, 1), c0, c1)
        mask = region == r
        img[mask] = fill[mask]
    return cv2.GaussianBlur(img, (0, 0), 0.5)


def strokes(rng, size=256):
    """Characters, lines and box outlines in sharp or anti-aliased strokes."""
    ground = gradients(rng, size) if rng.uniform() < 0.5 else np.broadcast_to(
        random_colours(rng, 1)[0], (size, size, 3)).copy()
    ink = np.zeros((size, size), np.float32)
    colours = random_colours(rng, 4)
    layer = np.zeros((size, size, 3), np.float32)
    for i in range(int(rng.integers(4, 14))):
        canvas = np.zeros((size, size), np.uint8)
        aa = cv2.LINE_AA if rng.uniform() < 0.6 else cv2.LINE_8
        thick = int(rng.integers(1, 4))
        if rng.uniform() < 0.7:  # a run of characters
            text = "".join(rng.choice(list(_GLYPHS), size=int(rng.integers(1, 9))))
            org = (int(rng.integers(-20, size - 20)), int(rng.integers(10, size + 10)))
            cv2.putText(canvas, text, org, _FONTS[int(rng.integers(len(_FONTS)))],
                        float(rng.uniform(0.4, 3.0)), 255, thick, aa)
        elif rng.uniform() < 0.5:
            p0, p1 = rng.integers(-20, size + 20, (2, 2))
            cv2.line(canvas, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 255, thick, aa)
        else:
            p0 = rng.integers(0, size, 2)
            p1 = p0 + rng.integers(8, size // 2, 2)
            cv2.rectangle(canvas, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 255, thick, aa)
        alpha = canvas.astype(np.float32) / 255
        layer = layer * (1 - alpha[..., None]) + colours[i % 4] * alpha[..., None]
        ink = np.maximum(ink, alpha)
    return np.clip(ground * (1 - ink[..., None]) + layer, 0, 1).astype(np.float32)


def highlights(rng, size=256):
    """A dim scene (another generator's, x0.03-0.3) with 1-5 small bright sources near white."""
    base = GENERATORS[KINDS[int(rng.integers(0, 4))]](rng, size) * rng.uniform(0.03, 0.3)
    yy, xx = _grid(size)
    light = np.zeros((size, size, 3), np.float32)
    for _ in range(int(rng.integers(1, 6))):
        cy, cx = rng.uniform(0, size, 2)
        sigma = float(np.exp(rng.uniform(np.log(1.5), np.log(12))))
        spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma))
        tint = 0.7 + 0.3 * random_colours(rng, 1)[0]  # near-white light
        light += spot[..., None] * tint
    return np.clip(base + light, 0, 1).astype(np.float32)


GENERATORS = {"dead_leaves": dead_leaves, "gratings": gratings, "strokes": strokes,
              "gradients": gradients, "highlights": highlights}


def procedural_scene(rng, kind, size=256):
    """One scene of the given kind (one of KINDS)."""
    return GENERATORS[kind](rng, size)
