"""Where a fast training step runs, side by side in one process, the ways taking turns: on the
default device (cpu0's worker thread; each of megfb's operators waits for it), on MegEngine's
inline CPU device (the trainer's one-device step), and split over the inline device and cpu1
(megfb/split.py) for each home weight asked (the home replica's share of the batch against 1
for cpu1's). Batch 8 of 128x128 raw crops by default, medians of the timed rounds after one
warm-up round; ratios are to the one-device inline step.

    python docs/measure_devices.py [--crop 128] [--repeats 4] [--weights 1 1.5 3]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import megengine as mge  # noqa: E402

from megfb import native  # noqa: E402
from megfb.bench import _split_train_fn, _train_fn  # noqa: E402
from megfb.model import build_model  # noqa: E402
from megfb.split import shares  # noqa: E402

FAST = {"name": "fbrestormer", "fast": True}


def step_on(device, noisy, clean):
    """The bench's fast training step (forward, backward, Adam) with everything on `device`."""
    with native.default_device(device):
        mge.random.seed(0)
        model = build_model(FAST)
        model.train()
        run = _train_fn(model, mge.tensor(noisy), mge.tensor(clean))
    return lambda: _run_on(device, run)


def split_on(devices, weight, noisy, clean):
    """The bench's split step with this home weight, home on devices[0]."""
    with native.default_device(devices[0]):
        mge.random.seed(0)
        model = build_model(FAST)
        run = _split_train_fn(model, noisy, clean, devices, FAST, home_weight=weight)
    return lambda: _run_on(devices[0], run)


def _run_on(device, run):
    with native.default_device(device):
        return run()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crop", type=int, default=128, help="raw crop side")
    p.add_argument("--repeats", type=int, default=4, help="timed rounds")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 1.5, 3.0],
                   help="home weights of the split step")
    args = p.parse_args()
    print(f"megfb's operators: {'on' if native.load() else 'off (' + str(native.reason()) + ')'}")
    rng = np.random.default_rng(0)
    side = args.crop // 2
    noisy, clean = (rng.random((8, 4, side, side), dtype=np.float32) for _ in range(2))
    ways = {"default device (cpu0's worker)": step_on("xpux", noisy, clean),
            f"inline device {native.INLINE_DEVICE}": step_on(native.INLINE_DEVICE, noisy, clean)}
    for w in args.weights:
        sizes = shares(8, 2, w)
        ways[f"split, home weight {w:g} ({sizes[0]}+{sizes[1]} of 8)"] = split_on(
            [native.INLINE_DEVICE, "cpu1"], w, noisy, clean)
    times = {name: [] for name in ways}
    for r in range(args.repeats + 1):
        order = list(ways) if r % 2 == 0 else list(ways)[::-1]
        for name in order:
            t = time.perf_counter()
            ways[name]()
            if r:  # the first round is the warm-up
                times[name].append(time.perf_counter() - t)
        print(f"round {r}/{args.repeats} done", file=sys.stderr, flush=True)
    base = float(np.median(times[f"inline device {native.INLINE_DEVICE}"]))
    print(f"fast training step, batch 8 of {args.crop}x{args.crop} raw crops, median of {args.repeats} rounds:")
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"  {name:<40} {med:7.3f} s  x{med / base:.2f} the inline step's time")


if __name__ == "__main__":
    main()
