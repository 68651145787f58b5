"""Inference: the one prediction path of the project, contest .bin in/out, self-ensemble.

The trainer's validation, `megfb eval`, `predict` and `submit` all run patches through
`predict_mosaics` (uint16 mosaics in and out, the submission rule applied) or its packed
core `predict_packed`. The self-ensemble (TTA) averages the model over 8 flips/rotations,
each output mapped back first: "cfa", the 8 that keep the Bayer phase
(megfb.data.dihedral_packed), or "mosaic", the 8 flips/transposes of the mosaic itself (the
2nd place's, whose network saw the same flips in training). `tta=True` takes the model's own
(its `ensemble` attribute, "cfa" when it has none). Each model also names its own output
conversion (`output_rounding`, see io.packed_to_mosaic).

Batching is device-aware. On a CPU one patch per forward is fastest: every op already
streams one patch's maps, and a batch only makes them outgrow the caches (measured with
FBRestormer, MegEngine 1.13, 2 cores: 4 patches in one forward took 0.46 s each and 11.7 GB,
one at a time 0.17 s each and 1.6 GB). On a GPU a batch stays a batch.

Engines. "mge": the model's eager forward, one batch after the other (MegEngine's CPU device
uses one core). "lite", the default on CPU: the model's dumped eval graph in one MegEngine
Lite network per core, each running on the thread that feeds it (megfb/lite.py), so every
core works on its own patch; same outputs within float rounding. Both give the same
predictions wherever they run (the trainer's validation and `megfb eval` use the same engine).
"""
import collections
import concurrent.futures

import megengine as mge
import numpy as np
from tqdm import tqdm

from .errors import MegfbError
from .io import load_bin, mosaic_to_packed, packed_to_mosaic, read_bin, write_bin

GPU_BATCH = 8
ENGINES = ("mge", "lite")


def on_gpu():
    """True when MegEngine's default device is a GPU (also "xpux" on a machine with CUDA)."""
    device = mge.get_default_device()
    return device.startswith("gpu") or (device.startswith("xpu") and mge.is_cuda_available())


def default_batch_size():
    """Patches per forward when the caller does not say: 1 on CPU, GPU_BATCH on a GPU."""
    return GPU_BATCH if on_gpu() else 1


def default_engine():
    """"lite" on CPU (when MegEngine Lite imports), "mge" on a GPU."""
    from . import lite

    return "mge" if on_gpu() or not lite.available() else "lite"


def _pad(model, x):
    m = getattr(model, "size_multiple", 1)
    h, w = x.shape[-2:]
    ph, pw = -h % m, -w % m
    if ph or pw:  # edge padding, cropped away after: only down-sampling models need it
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    return x


def _forward(model, x):
    """One batch (b,4,h,w) float32 numpy -> numpy, padded up to the model's size multiple.

    Ends in .numpy(), so at most one batch is in flight; MegEngine's dispatch stays
    asynchronous within it (Python queues the next ops while the kernels run, ~1.8x faster
    than synchronous dispatch on 2 cores)."""
    h, w = x.shape[-2:]
    y = model(mge.tensor(_pad(model, x))).numpy()
    return y[..., :h, :w]


ENSEMBLES = ("cfa", "mosaic")


def ensemble_of(model, tta):
    """The ensemble a `tta` argument asks for: None (off), "cfa" or "mosaic"; True = the model's own."""
    if not tta:
        return None
    kind = getattr(model, "ensemble", "cfa") if tta is True else tta
    if kind not in ENSEMBLES:
        raise MegfbError(f"unknown test-time ensemble {kind!r}; expected one of {', '.join(ENSEMBLES)}")
    return kind


def _ensemble_transforms(kind):
    from .data import (dihedral_mosaic_packed, dihedral_mosaic_packed_inverse, dihedral_packed,
                       dihedral_packed_inverse)

    if kind == "mosaic":
        return dihedral_mosaic_packed, dihedral_mosaic_packed_inverse
    return dihedral_packed, dihedral_packed_inverse


def _jobs(x, batch_size, transform):
    """(start, view k or None, input batch) for every forward, in order; transform: the
    ensemble's forward map (None: no ensemble)."""
    for i in range(0, len(x), batch_size):
        xb = np.asarray(x[i:i + batch_size], dtype=np.float32)
        for k in (range(8) if transform is not None else [None]):
            yield i, k, (xb if k is None else transform(xb, k))


def predict_packed(model, x, batch_size=None, tta=False, progress=True, stop=None, engine=None):
    """x: (N,4,h,w) on [0,1] (any array, e.g. a memmap view) -> float32 (N,4,h,w) predictions.

    tta: False, True (the model's own ensemble), "cfa" or "mosaic" (see ensemble_of).
    batch_size: patches per forward (None: default_batch_size()). stop: a callable checked
    before every forward; when it returns True the prediction ends at once with
    KeyboardInterrupt (the trainer's Ctrl-C during validation). engine: "mge" or "lite"
    (None: default_engine()). The model is run in eval mode and left in the mode it came in.
    """
    kind = ensemble_of(model, tta)
    transform, inverse = _ensemble_transforms(kind) if kind is not None else (None, None)
    batch_size = default_batch_size() if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise MegfbError(f"batch size must be at least 1, got {batch_size}")
    engine = default_engine() if engine is None else engine
    if engine not in ENGINES:
        raise MegfbError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    was_training = model.training
    model.eval()
    out = np.zeros(x.shape, dtype=np.float32)
    bar = tqdm(total=len(x), unit="patch", desc="predict" + (f" (TTA x8, {kind})" if kind else ""),
               disable=not progress, leave=False)

    def store(i, k, y):
        if k is None:
            out[i:i + len(y)] = y
            bar.update(len(y))
            return
        out[i:i + len(y)] += inverse(y, k)
        if k == 7:
            out[i:i + len(y)] /= np.float32(8)  # the same sum, in the same order, as one by one
            bar.update(len(y))

    try:
        if engine == "mge":
            for i, k, xb in _jobs(x, batch_size, transform):
                if stop is not None and stop():
                    raise KeyboardInterrupt
                store(i, k, _forward(model, xb))
        else:
            _predict_concurrently(model, _jobs(x, batch_size, transform), store, stop)
    finally:
        bar.close()
        model.train(was_training)
    return out


def _predict_concurrently(model, jobs, store, stop):
    """Lite engine: every core's network busy with its own forward; results stored in order, at
    most two forwards per network in flight (bounded memory)."""
    from .lite import default_workers, runner_for

    runners, pending = {}, collections.deque()
    workers = default_workers()

    def forward(runner, x, h, w):
        return runner(x)[..., :h, :w]

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="megfb-lite") as pool:
        try:
            for i, k, xb in jobs:
                if stop is not None and stop():
                    raise KeyboardInterrupt
                xp = _pad(model, xb)
                if xp.shape not in runners:  # built here, in order: the first forward times kernels
                    runners[xp.shape] = runner_for(model, xp.shape, workers)
                pending.append((i, k, pool.submit(forward, runners[xp.shape], xp, *xb.shape[-2:])))
                while len(pending) > 2 * workers or (pending and pending[0][2].done()):
                    i0, k0, fut = pending.popleft()
                    store(i0, k0, fut.result())
            while pending:
                i0, k0, fut = pending.popleft()
                store(i0, k0, fut.result())
        finally:
            for _, _, fut in pending:
                fut.cancel()


def predict_mosaics(model, noisy, batch_size=None, tta=False, progress=True, stop=None, engine=None):
    """uint16 mosaics (N,H,W) -> uint16 predictions, exactly as a submission stores them
    (x65535, clipped, rounded - or truncated for a model whose output_rounding is "floor")."""
    pred = predict_packed(model, mosaic_to_packed(noisy), batch_size, tta, progress, stop, engine)
    return packed_to_mosaic(pred, getattr(model, "output_rounding", "round"))


def predict_bin(model, input_path, output_path, batch_size=None, tta=False, progress=True, engine=None):
    """Contest .bin in -> contest .bin out (uint16, rounded, clipped), written atomically."""
    noisy = load_bin(input_path)  # read once, not memory-mapped: no SIGBUS if it changes later
    write_bin(output_path, predict_mosaics(model, noisy, batch_size, tta, progress, engine=engine))
    return len(noisy)


def cmd_predict(args):
    from .atomic import check_output
    from .checkpoint import model_from_checkpoint

    read_bin(args.input)  # validate the input and the output place before loading a model
    check_output(args.output, inputs=(args.input, args.ckpt, args.config), force=getattr(args, "force", False), what="--output")
    model, info = model_from_checkpoint(args.ckpt, args.config)
    n = predict_bin(model, args.input, args.output, args.batch_size, args.tta, engine=getattr(args, "engine", None))
    kind = ensemble_of(model, args.tta)
    print(f"wrote {args.output}: {n} patches ({info['kind']} {args.ckpt}, {info['weights']} weights"
          f"{f', TTA x8 ({kind})' if kind else ''})")
