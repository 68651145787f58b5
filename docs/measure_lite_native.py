"""The Lite inference runner (megfb/lite.py) with and without megfb's operators in its graph
(the gates and GELU, the depthwise convs, the polyphase split/merge, the LayerNorm's
standardisation; ops.native_in_graph),
side by side in one process: one network per core, each fed by its own thread, on random
256x256 patches of the untrained model. The two runners take turns, round after round; per
runner the median round, in seconds per patch, with the cores kept busy, and the largest
difference between the two runners' outputs.

    python docs/measure_lite_native.py [--patches 16] [--rounds 5]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megfb import lite, native  # noqa: E402
from megfb.model import build_model  # noqa: E402


def timed_round(runner, patches):
    """Seconds per patch and cores busy for one pass over `patches` on every network."""
    wall, cpu = time.perf_counter(), time.process_time()
    with runner.pool() as pool:
        list(pool.map(runner, patches))
    wall = time.perf_counter() - wall
    return wall / len(patches), (time.process_time() - cpu) / wall


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patches", type=int, default=16, help="256x256 patches per round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per runner")
    args = p.parse_args()
    if not native.load():
        sys.exit(f"megfb's operators are not available here: {native.reason()}")
    model = build_model({"name": "fbrestormer", "fast": True})
    model.eval()
    shape = (1, 4, 128, 128)
    rng = np.random.default_rng(0)
    patches = [rng.random(shape, dtype=np.float32) for _ in range(args.patches)]
    runners = {"MegEngine's operators only": lite.LiteRunner(model, shape, native_ops=False),
               "with megfb's operators": lite.LiteRunner(model, shape, native_ops=True)}
    outs = [r(patches[0]) for r in runners.values()]
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            times[name].append(timed_round(runner, patches))
    print(f"{len(patches)} patches of 256x256 per round, {lite.default_workers()} networks, "
          f"median of {args.rounds} rounds")
    medians = {}
    for name, rounds in times.items():
        per_patch = float(np.median([t for t, _ in rounds]))
        busy = float(np.median([b for _, b in rounds]))
        medians[name] = per_patch
        print(f"{name:28s} {per_patch:.4f} s/patch, {busy:.2f} cores busy")
    plain, fast = medians.values()
    print(f"with megfb's operators: x{plain / fast:.2f}; outputs differ by at most "
          f"{float(np.abs(outs[0] - outs[1]).max()):.2e}")


if __name__ == "__main__":
    main()
