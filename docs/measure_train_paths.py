"""Whole fast training steps (batch 8, the trainer's inline CPU device) with each of megfb's
training paths switched back to the one it replaced, taking turns in one process after a
warm-up of each (a drift of the machine touches all alike): the 1x1 convs as timed convs or as
batched matmuls, the depthwise convs as megfb's operator or MegEngine's convs, megfb's operators
on every core or on one thread.

    python docs/measure_train_paths.py [--crop 128] [--rounds 5]
"""
import argparse
import contextlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import megengine as mge  # noqa: E402

from megfb import native, ops  # noqa: E402
from megfb.bench import _train_fn, use_path  # noqa: E402
from megfb.model import build_model  # noqa: E402

PATHS = {  # training_paths() arguments, and "threads": MEGFB_THREADS for megfb's operators
    "default (1x1 as convs, megfb's depthwise)": {},
    "megfb's operators on one thread": {"threads": 1},
    "1x1 as batched matmuls": {"pointwise": "matmul"},
    "MegEngine's depthwise convs": {"depthwise": "megengine"},
    "all three as before": {"pointwise": "matmul", "depthwise": "megengine", "threads": 1},
}


@contextlib.contextmanager
def threads(n):
    previous = os.environ.get("MEGFB_THREADS")
    if n:
        os.environ["MEGFB_THREADS"] = str(n)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MEGFB_THREADS", None)
        else:
            os.environ["MEGFB_THREADS"] = previous


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crop", type=int, default=128, help="raw crop side")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per path")
    args = p.parse_args()
    if not native.load():
        sys.exit(f"megfb's operators are not available here: {native.reason()}")
    rng = np.random.default_rng(0)
    side = args.crop // 2
    times = {name: [] for name in PATHS}
    with native.default_device(native.INLINE_DEVICE):
        model = build_model({"name": "fbrestormer", "fast": True})
        model.train()
        use_path(model, True)
        noisy, clean = (mge.tensor(rng.random((8, 4, side, side), dtype=np.float32)) for _ in range(2))
        step = _train_fn(model, noisy, clean)
        for r in range(args.rounds + 1):
            for name, paths in PATHS.items():
                paths = dict(paths)
                with threads(paths.pop("threads", None)), ops.training_paths(**paths):
                    t = time.perf_counter()
                    step()
                    if r:  # the first round is the warm-up (and times new kernels' shapes)
                        times[name].append(time.perf_counter() - t)
    base = float(np.median(times[next(iter(PATHS))]))
    print(f"batch 8 of {args.crop}x{args.crop} raw crops, median of {args.rounds} steps per path, taking turns; "
          f"megfb's operators on {native.threads_available()} threads by default")
    for name in PATHS:
        med = float(np.median(times[name]))
        print(f"{name:45s} {med:.3f} s/step  x{med / base:.2f} the default's time")


if __name__ == "__main__":
    main()
