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
"""
import megengine as mge
import numpy as np
from tqdm import tqdm

from .errors import MegfbError
from .io import load_bin, mosaic_to_packed, packed_to_mosaic, read_bin, write_bin

GPU_BATCH = 8


def on_gpu():
    """True when MegEngine's default device is a GPU (also "xpux" on a machine with CUDA)."""
    device = mge.get_default_device()
    return device.startswith("gpu") or (device.startswith("xpu") and mge.is_cuda_available())


def default_batch_size():
    """Patches per forward when the caller does not say: 1 on CPU, GPU_BATCH on a GPU."""
    return GPU_BATCH if on_gpu() else 1


def _forward(model, x):
    """One batch (b,4,h,w) float32 numpy -> numpy, padded up to the model's size multiple.

    Ends in .numpy(), so at most one batch is in flight; MegEngine's dispatch stays
    asynchronous within it (Python queues the next ops while the kernels run, ~1.8x faster
    than synchronous dispatch on 2 cores)."""
    m = getattr(model, "size_multiple", 1)
    h, w = x.shape[-2:]
    ph, pw = -h % m, -w % m
    if ph or pw:  # edge padding, cropped away after: only down-sampling models need it
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    y = model(mge.tensor(x)).numpy()
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


def predict_packed(model, x, batch_size=None, tta=False, progress=True, stop=None):
    """x: (N,4,h,w) on [0,1] (any array, e.g. a memmap view) -> float32 (N,4,h,w) predictions.

    tta: False, True (the model's own ensemble), "cfa" or "mosaic" (see ensemble_of).
    batch_size: patches per forward (None: default_batch_size()). stop: a callable checked
    before every forward; when it returns True the prediction ends at once with
    KeyboardInterrupt (the trainer's Ctrl-C during validation). The model is run in eval mode
    and left in the mode it came in.
    """
    kind = ensemble_of(model, tta)
    batch_size = default_batch_size() if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise MegfbError(f"batch size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    out = np.empty(x.shape, dtype=np.float32)
    if kind is not None:
        forward, inverse = _ensemble_transforms(kind)
    bar = tqdm(total=len(x), unit="patch", desc="predict" + (f" (TTA x8, {kind})" if kind else ""),
               disable=not progress, leave=False)
    try:
        for i in range(0, len(x), batch_size):
            if stop is not None and stop():
                raise KeyboardInterrupt
            xb = np.asarray(x[i:i + batch_size], dtype=np.float32)
            if kind is not None:
                yb = sum(inverse(_forward(model, forward(xb, k)), k) for k in range(8))
                out[i:i + len(xb)] = yb / np.float32(8)
            else:
                out[i:i + len(xb)] = _forward(model, xb)
            bar.update(len(xb))
    finally:
        bar.close()
        model.train(was_training)
    return out


def predict_mosaics(model, noisy, batch_size=None, tta=False, progress=True, stop=None):
    """uint16 mosaics (N,H,W) -> uint16 predictions, exactly as a submission stores them
    (x65535, clipped, rounded - or truncated for a model whose output_rounding is "floor")."""
    pred = predict_packed(model, mosaic_to_packed(noisy), batch_size, tta, progress, stop)
    return packed_to_mosaic(pred, getattr(model, "output_rounding", "round"))


def predict_bin(model, input_path, output_path, batch_size=None, tta=False, progress=True):
    """Contest .bin in -> contest .bin out (uint16, rounded, clipped), written atomically."""
    noisy = load_bin(input_path)  # read once, not memory-mapped: no SIGBUS if it changes later
    write_bin(output_path, predict_mosaics(model, noisy, batch_size, tta, progress))
    return len(noisy)


def cmd_predict(args):
    from .atomic import check_output
    from .checkpoint import model_from_checkpoint

    read_bin(args.input)  # validate the input and the output place before loading a model
    check_output(args.output, inputs=(args.input, args.ckpt, args.config), force=getattr(args, "force", False), what="--output")
    model, info = model_from_checkpoint(args.ckpt, args.config)
    n = predict_bin(model, args.input, args.output, args.batch_size, args.tta)
    kind = ensemble_of(model, args.tta)
    print(f"wrote {args.output}: {n} patches ({info['kind']} {args.ckpt}, {info['weights']} weights"
          f"{f', TTA x8 ({kind})' if kind else ''})")
