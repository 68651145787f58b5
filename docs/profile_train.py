"""Where a fast training step's time goes: MegEngine's profiler around one step (batch 8 of
128x128 raw crops by default, on the trainer's inline CPU device), kernel time summed per
operator, largest first, with the wall time of the step and the share the kernels cover.

    python docs/profile_train.py [--crop 128] [--top 25]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import megengine as mge  # noqa: E402

from megfb import native  # noqa: E402
from megfb.bench import _train_fn, kernel_totals, use_path  # noqa: E402
from megfb.model import build_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crop", type=int, default=128, help="raw crop side")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top", type=int, default=25, help="operators listed")
    args = p.parse_args()
    native.load()
    side = args.crop // 2
    rng = np.random.default_rng(0)
    with native.default_device(native.INLINE_DEVICE):
        model = build_model({"name": "fbrestormer", "fast": True})
        model.train()
        use_path(model, True)
        noisy, clean = (mge.tensor(rng.random((args.batch, 4, side, side), dtype=np.float32)) for _ in range(2))
        step = _train_fn(model, noisy, clean)
        for _ in range(2):
            step()
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t
        totals, counts = kernel_totals(step)
    whole = sum(totals.values()) / 1e6
    print(f"step {wall:.3f} s unprofiled; kernels {whole:.3f} s in the profiled step ({whole / wall:.0%})")
    for name, us in totals.most_common(args.top):
        print(f"{us / 1e3:9.1f} ms {us / 1e6 / whole:6.1%} {counts[name]:5d}  {name}")


if __name__ == "__main__":
    main()
