"""How much neighbouring tiles disagree where they overlap, next to how much noise the model
removes (megfb.denoise.seam_report), for a checkpoint on a raw file with the default tiling.

    python docs/measure_seams.py --ckpt CKPT FILE.dng [--tile 256 --overlap 32 --crop 768]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megfb.checkpoint import model_from_checkpoint  # noqa: E402
from megfb.denoise import DENOISE_OVERLAP, DENOISE_TILE, model_domain, seam_report  # noqa: E402
from megfb.io import pack_bayer  # noqa: E402
from megfb.raw import read_mosaic, to_model_domain, to_rggb  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--config")
    p.add_argument("--tile", type=int, default=DENOISE_TILE)
    p.add_argument("--overlap", type=int, default=DENOISE_OVERLAP)
    p.add_argument("--crop", type=int, default=768, help="centre crop side in mosaic pixels (0: whole frame)")
    args = p.parse_args()
    model, info = model_from_checkpoint(args.ckpt, args.config)
    m = read_mosaic(args.file)
    x, _ = to_rggb(to_model_domain(m, *model_domain(info)), m.pattern)
    if args.crop:
        h, w = x.shape
        y0, x0 = (h - args.crop) // 4 * 2, (w - args.crop) // 4 * 2  # even: the phase stays RGGB
        x = x[max(y0, 0):max(y0, 0) + args.crop, max(x0, 0):max(x0, 0) + args.crop]
    r = seam_report(model, pack_bayer(x), args.tile // 2, args.overlap // 2)
    print(f"{args.file}: {r['pairs']} overlapping tile pairs, mean |difference| in the overlaps "
          f"{r['disagreement'] * 65535:.2f} DN16, mean |removed| {r['removed'] * 65535:.2f} DN16, "
          f"ratio {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
