"""The fast training step with and without megfb's FFN-gate and polyphase operators (the other
native operators on in both), taking turns in one process: what those two add.

    python docs/measure_gate_phases.py [--crop 128] [--repeats 3]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import megengine as mge  # noqa: E402

from megfb import native, ops  # noqa: E402
from megfb.bench import _train_fn  # noqa: E402
from megfb.model import build_model  # noqa: E402

ORIGINAL = {name: getattr(ops, name) for name in ("gated_gelu", "space_to_phases", "phases_to_space")}


def without_gate_and_phases():
    """ops' gate and polyphase functions as they are without those operators (megfb/ops.py's
    MegEngine paths); the by_conv pixel moves of eval stay as they are."""
    def split(x, d, by_conv=False):
        return ORIGINAL["space_to_phases"](x, d, by_conv) if by_conv else ops.relayout_to_phases(x, d)

    def merge(x, d, by_conv=False):
        return ORIGINAL["phases_to_space"](x, d, by_conv) if by_conv else ops.relayout_to_space(x, d)
    return {"gated_gelu": lambda x, swap=False: ops.gate_by_megengine(x, swap),
            "space_to_phases": split, "phases_to_space": merge}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not native.load():
        sys.exit(f"megfb's operators are not available here: {native.reason()}")
    side = args.crop // 2
    rng = np.random.default_rng(0)
    old = without_gate_and_phases()
    with native.default_device(native.INLINE_DEVICE):  # the trainer's device
        model = build_model({"name": "fbrestormer"})
        model.train()
        noisy, clean = (mge.tensor(rng.random((8, 4, side, side), dtype=np.float32)) for _ in range(2))
        run = _train_fn(model, noisy, clean)
        times = {True: [], False: []}
        for r in range(args.repeats + 1):
            for new in (True, False):
                for name, fn in (ORIGINAL if new else old).items():
                    setattr(ops, name, fn)
                t = time.perf_counter()
                run()
                if r:
                    times[new].append(time.perf_counter() - t)
        for name, fn in ORIGINAL.items():
            setattr(ops, name, fn)
    t_new, t_old = float(np.median(times[True])), float(np.median(times[False]))
    print(f"fast training step, batch 8 of {args.crop}x{args.crop} crops: with the gate and polyphase "
          f"operators {t_new:.3f} s, without {t_old:.3f} s (x{t_old / t_new:.2f})")


if __name__ == "__main__":
    main()
