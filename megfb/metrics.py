"""The contest score and PSNR, on uint16 values taken as float.

`contest_score` is the organisers' six-line formula (megcup2022.md), per patch over all
non-batch axes, in float64. The only addition is chunking over patches, so a 1 GB memmap is
scored without converting it to float64 in one piece (the per-patch terms are identical).
"""
import numpy as np

from .errors import MegfbError

CHUNK = 128  # patches per float64 block: 128 x 256 x 256 x 8 B = 64 MB


def weighted_l1_per_patch(pred, gt):
    """The score's per-patch term: mean |pred - gt| times (1 / mean(gt)) ** 0.5."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    axes = tuple(range(1, gt.ndim))
    means = gt.mean(axis=axes)
    weight = (1 / means) ** 0.5
    return np.abs(pred - gt).mean(axis=axes) * weight


def contest_score(pred, gt):
    """5 * log10(100 / mean over patches of the weighted L1); higher is better."""
    diff = np.concatenate([weighted_l1_per_patch(pred[i:i + CHUNK], gt[i:i + CHUNK])
                           for i in range(0, len(gt), CHUNK)])
    return float(5 * np.log10(100 / diff.mean()))


def psnr(pred, gt, peak=65535.0):
    """Mean over patches of 10 * log10(peak^2 / MSE), in dB."""
    values = []
    for i in range(0, len(gt), CHUNK):
        p = np.asarray(pred[i:i + CHUNK], dtype=np.float64)
        g = np.asarray(gt[i:i + CHUNK], dtype=np.float64)
        mse = ((p - g) ** 2).mean(axis=tuple(range(1, g.ndim)))
        with np.errstate(divide="ignore"):
            values.append(10 * np.log10(peak ** 2 / mse))
    return float(np.concatenate(values).mean())


def cmd_score(args):
    """`megfb score PRED.bin GT.bin`: contest score and PSNR of a prediction file."""
    from .io import read_bin

    pred, gt = read_bin(args.pred), read_bin(args.gt)
    if len(pred) != len(gt):
        raise MegfbError(
            f"{args.pred} holds {len(pred)} patches but {args.gt} holds {len(gt)}; "
            "a prediction must cover every ground-truth patch"
        )
    print(f"score {contest_score(pred, gt):.5f}  PSNR {psnr(pred, gt):.2f} dB  ({len(gt)} patches)")
