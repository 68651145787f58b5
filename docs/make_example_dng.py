"""Write a synthetic noisy camera DNG to try `megfb denoise` on (no download, no camera).

A colour photograph that ships inside scikit-image is linearised, resized to the requested
size, mosaicked to a Bayer pattern with daylight-like white-balance gains undone, exposed
and given Poisson-Gaussian sensor noise of variance a*x + b on the [0, 1] scale (default: the
phone calibration the default training set uses, at ISO 3200), then written as an
uncompressed 14-bit DNG (black 512, white 16383) with a colour matrix for linear sRGB, the as-shot
white balance and the NoiseProfile tag - the DNG that LibRaw/rawpy reads back.

    python docs/make_example_dng.py example.dng                      # 2000 x 1500
    python docs/make_example_dng.py big.dng --width 4000 --height 3000   # 12 MP
"""
import argparse
import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megfb.raw import PATTERNS, write_dng  # noqa: E402
from megfb.synth import RGB2XYZ, load_photo, profile_from_iso  # noqa: E402

BLACK, WHITE = 512, 16383
GAINS = {"R": 1 / 2.0, "G": 1.0, "B": 1 / 1.6}  # a daylight raw: red and blue weaker than green


def example_mosaic(width, height, pattern="RGGB", photo="coffee", a=None, b=None, exposure=0.12, seed=0):
    """(clean, noisy) float / uint16 mosaics of the photo at width x height."""
    if a is None or b is None:
        a, b = profile_from_iso(3200)
    rgb = load_photo(photo)
    rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC if width > rgb.shape[1] else cv2.INTER_AREA)
    rgb = np.clip(rgb, 0, 1) * (exposure / max(float(rgb.mean()), 1e-6))
    colour = {"R": 0, "G": 1, "B": 2}
    cell = [(colour[c], GAINS[c]) for c in pattern]
    x = np.empty((height, width), np.float32)
    for i, (c, g) in enumerate(cell):
        dy, dx = divmod(i, 2)
        x[dy::2, dx::2] = rgb[dy::2, dx::2, c] * g
    x = np.clip(x, 0, 1)
    rng = np.random.default_rng(seed)
    noisy = rng.poisson(x / a).astype(np.float32) * np.float32(a)
    noisy += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(np.sqrt(b))
    to_dn = lambda v: BLACK + v * (WHITE - BLACK)  # noqa: E731
    return to_dn(x), np.clip(np.rint(to_dn(noisy)), 0, WHITE).astype(np.uint16)


def dng_extra(a, b):
    # ColorMatrix1 maps XYZ to the camera's RGB; this "camera" sees linear sRGB, so XYZ -> sRGB
    xyz_to_srgb = np.linalg.inv(RGB2XYZ).ravel()
    neutral = [GAINS["R"], 1.0, GAINS["B"]]
    return [
        (271, "s", 0, "megfb", True),
        (272, "s", 0, "synthetic example", True),
        (50708, "s", 0, "megfb synthetic example", True),
        (50721, "2i", 9, tuple(v for m in xyz_to_srgb for v in (int(round(m * 10000)), 10000)), True),  # ColorMatrix1
        (50778, "H", 1, (21,), True),  # CalibrationIlluminant1: D65
        (50728, "2I", 3, tuple(v for n in neutral for v in (int(n * 10000), 10000)), True),  # AsShotNeutral
        (51041, "d", 2, (float(a), float(b)), True),  # NoiseProfile
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="DNG to write")
    p.add_argument("--width", type=int, default=2000)
    p.add_argument("--height", type=int, default=1500)
    p.add_argument("--pattern", choices=PATTERNS, default="RGGB")
    p.add_argument("--photo", default="coffee", help="a scikit-image sample photo")
    p.add_argument("--iso", type=float, default=3200, help="phone calibration ISO for the noise")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    a, b = profile_from_iso(args.iso)
    _, noisy = example_mosaic(args.width, args.height, args.pattern, args.photo, a, b, seed=args.seed)
    write_dng(args.out, noisy, args.pattern, np.full(4, BLACK), WHITE, dng_extra(a, b))
    print(f"wrote {args.out}: {args.width}x{args.height} {args.pattern}, black {BLACK}, white {WHITE}, "
          f"noise a={a:.3g} b={b:.3g} (phone calibration at ISO {args.iso:g})")


if __name__ == "__main__":
    main()
