"""How often a repeated backward gives a different gradient: the same tiny FBRestormer training
forward and backward (8 features, 3 blocks, a 2x4x16x16 input) run N times, every backward's
gradients compared bit for bit with the first's, for each way of adding the convs' biases:

  add_bias    megfb's fast path as it is (ops.add_bias: the bias gradient summed by megfb)
  mge_add     the fast path with the bias added by MegEngine's own `y + bias` (before add_bias)
  plain       the plain definition (fast: false, MegEngine's own Conv2d with its bias)

on MegEngine's default device "xpux" (a worker thread) and on the trainer's inline device
"cpu:default". Prints, per case, how many backwards differed and the parameters they hit.
With --time: what add_bias costs instead, the bench's fast training step (FBRestormer, batch 8
of 128x128 raw crops, Adam) on the trainer's device with the two bias adds taking turns;
medians of the rounds after a warm-up.

    python docs/measure_bias_grads.py [--backwards 1000] [--cases add_bias mge_add plain]
    python docs/measure_bias_grads.py --time [--rounds 12]
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
from megfb.model import build_model  # noqa: E402

FIXED = ops.add_bias


def megengine_add(y, bias):
    return y if bias is None else y + bias


def count(case, device, backwards):
    ops.add_bias = megengine_add if case == "mge_add" else FIXED
    try:
        with native.default_device(device):
            mge.random.seed(0)
            model = build_model({"name": "fbrestormer", "num_feats": 8, "num_blocks": 3,
                                 "fast": case != "plain"})
            model.train()
            x = mge.tensor(np.random.default_rng(0).random((2, 4, 16, 16), dtype=np.float32))
            gm = GradManager().attach(model.parameters())
            first, bad, hit = None, 0, {}
            for _ in range(backwards):
                with gm:
                    gm.backward(sum(o.mean() for o in model(x)))
                grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
                for p in model.parameters():
                    p.grad = None
                if first is None:
                    first = grads
                    continue
                differ = [n for n, g in grads.items() if not np.array_equal(g, first[n])]
                bad += bool(differ)
                for n in differ:
                    hit[n] = hit.get(n, 0) + 1
            return bad, hit
    finally:
        ops.add_bias = FIXED


def time_steps(rounds):
    from megfb.bench import _train_fn

    rng = np.random.default_rng(0)
    with native.default_device(native.INLINE_DEVICE):
        model = build_model({"name": "fbrestormer"})
        model.train()
        noisy, clean = (mge.tensor(rng.random((8, 4, 64, 64), dtype=np.float32)) for _ in range(2))
        run = _train_fn(model, noisy, clean)
        for _ in range(3):
            run()
        times = {"add_bias": [], "mge_add": []}
        for r in range(rounds):
            order = ("add_bias", "mge_add") if r % 2 else ("mge_add", "add_bias")
            for case in order:
                ops.add_bias = megengine_add if case == "mge_add" else FIXED
                try:
                    start = time.perf_counter()
                    run()
                    times[case].append(time.perf_counter() - start)
                finally:
                    ops.add_bias = FIXED
    for case, t in times.items():
        print(f"train step, {case:9s} median {np.median(t):.4f} s over {rounds}")
    print(f"add_bias / mge_add: x{np.median(times['add_bias']) / np.median(times['mge_add']):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backwards", type=int, default=1000)
    parser.add_argument("--cases", nargs="+", default=["add_bias", "mge_add", "plain"],
                        choices=["add_bias", "mge_add", "plain"])
    parser.add_argument("--devices", nargs="+", default=["xpux", native.INLINE_DEVICE])
    parser.add_argument("--time", action="store_true", help="time training steps instead")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    if args.time:
        return time_steps(args.rounds)
    print(f"MegEngine {mge.__version__}; {args.backwards} backwards per case, "
          "each compared with the first")
    for device in args.devices:
        for case in args.cases:
            start = time.time()
            bad, hit = count(case, device, args.backwards)
            where = ", ".join(f"{n} x{k}" for n, k in sorted(hit.items())) or "-"
            print(f"{device:12s} {case:9s} {bad:4d} of {args.backwards - 1} differ"
                  f"  ({time.time() - start:.0f} s)  {where}", flush=True)


if __name__ == "__main__":
    main()
