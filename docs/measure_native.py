"""megfb's native operators against MegEngine's kernels, side by side in one process: the
depthwise weight gradient on FBRestormer's training shapes (batch 8 of 128x128 raw crops), the
LayerNorm forward + backward, the FFN's gate gelu(x1) * x2 forward + backward, and one whole
fast training step at batch 8 (each the median of
repeats after a warm-up; the whole step's two ways take turns).

    python docs/measure_native.py [--crop 128] [--repeats 3]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import megengine as mge  # noqa: E402
from megengine.autodiff import GradManager  # noqa: E402

from megfb import native, ops  # noqa: E402
from megfb.bench import _train_fn  # noqa: E402
from megfb.model import build_model  # noqa: E402


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def both_ways(make_fn, repeats):
    """(native seconds, MegEngine seconds): medians of make_fn()'s runs, the two ways taking
    turns after a warm-up of each (so a drift of the machine touches both alike)."""
    run = make_fn()
    times = {True: [], False: []}
    for r in range(repeats + 1):
        for on in (True, False):
            previous = ops.use_native(on)
            try:
                t = time.perf_counter()
                run()
                if r:  # the first round is the warm-up
                    times[on].append(time.perf_counter() - t)
            finally:
                ops.use_native(previous)
    return float(np.median(times[True])), float(np.median(times[False]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crop", type=int, default=128, help="raw crop side of the training shapes")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per case")
    args = p.parse_args()
    if not native.load():
        sys.exit(f"megfb's operators are not available here: {native.reason()}")
    rng = np.random.default_rng(0)
    side = args.crop // 2  # packed side
    print(f"megfb native operators vs MegEngine's kernels, batch 8 of {args.crop}x{args.crop} raw crops")

    # FBRestormer's depthwise convs in training: qkv 3x3 on 96 channels, the FFN's 5x5 dilated
    # conv as a 5x5 on the 2x2 polyphase sub-images (4 x 76 channels at half the side)
    for c, s, k in ((96, side, 3), (304, side // 2, 5)):
        x, dy = (mge.tensor(rng.standard_normal((8, c, s, s), dtype=np.float32)) for _ in range(2))
        xt = x.transpose(1, 0, 2, 3).reshape(1, c * 8, s, s)
        dyt = dy.transpose(1, 0, 2, 3).reshape(c, 1, 8, s, s)
        pad = (k - 1) // 2
        t_native = median_time(lambda: native.depthwise_wgrad(x, dy, k, pad).numpy(), args.repeats)
        t_mge = median_time(lambda: ops.conv(xt, dyt, pad, c).numpy(), args.repeats)
        print(f"depthwise weight gradient {k}x{k}, 8x{c}x{s}x{s}: {t_native * 1e3:8.2f} ms vs "
              f"{t_mge * 1e3:8.2f} ms (x{t_mge / t_native:.2f})")

    x0 = rng.standard_normal((8, 32, side, side), dtype=np.float32)
    w0 = np.ones((1, 32, 1, 1), dtype=np.float32)

    def norm_step():
        x, w, b = mge.Parameter(x0), mge.Parameter(w0), mge.Parameter(w0 * 0)
        gm = GradManager().attach([x, w, b])

        def run():
            with gm:
                y = ops.channel_norm(x, w, b, training=True)
                gm.backward(y.sum())
            return x.grad.numpy()
        return run

    t_native, t_mge = both_ways(norm_step, args.repeats)
    print(f"LayerNorm forward + backward, 8x32x{side}x{side}: {t_native * 1e3:8.2f} ms vs "
          f"{t_mge * 1e3:8.2f} ms (x{t_mge / t_native:.2f})")

    g0 = rng.standard_normal((8, 76, side, side), dtype=np.float32)  # the FFN's 2 x 38 channels

    def gate_step():
        x = mge.Parameter(g0)
        gm = GradManager().attach([x])

        def run():
            with gm:
                gm.backward(ops.gated_gelu(x).sum())
            return x.grad.numpy()
        return run

    t_native, t_mge = both_ways(gate_step, args.repeats)
    print(f"FFN gate gelu(x1) * x2 forward + backward, 8x76x{side}x{side}: {t_native * 1e3:8.2f} ms vs "
          f"{t_mge * 1e3:8.2f} ms (x{t_mge / t_native:.2f})")

    model = build_model({"name": "fbrestormer"})
    model.train()
    noisy, clean = (mge.tensor(rng.random((8, 4, side, side), dtype=np.float32)) for _ in range(2))
    t_native, t_mge = both_ways(lambda: _train_fn(model, noisy, clean), args.repeats)
    print(f"fast training step (forward, backward, Adam): {t_native:8.3f} s vs {t_mge:8.3f} s "
          f"(x{t_mge / t_native:.2f})")


if __name__ == "__main__":
    main()
