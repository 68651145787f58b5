"""curves.png: training-loss and validation-score curves plus a few validation crops, drawn
with OpenCV alone (no matplotlib in the dependency set).

Raw crops are shown through a deliberately simple ISP - black-level subtraction, OpenCV's
bilinear demosaic (the data is RGGB), grey-world white balance, exposure to a mid-grey mean
and a 1/2.2 gamma - with the gains and exposure taken from the clean crop and applied to all
three panels, so noisy | output | clean differ only by what the network did.
"""
import math

import cv2
import numpy as np

from .atomic import atomic_output
from .io import unpack_bayer

BLACK_LEVEL = 4096 / 65535  # 64 DN at 10 bits scaled to 16 bits (synthetic data; see synth.py)
WHITE = (255, 255, 255)
GREY = (150, 150, 150)
BLUE = (200, 90, 30)
ORANGE = (30, 140, 240)
GREEN = (60, 160, 60)


def demosaic(packed, black_level=BLACK_LEVEL):
    """Packed RGGB planes on [0,1] -> linear RGB float32 (H, W, 3), black level removed."""
    mosaic = np.clip((unpack_bayer(np.asarray(packed, np.float32)) - black_level) / (1 - black_level), 0, 1)
    # OpenCV names Bayer patterns from the second row/column: RGGB data is its "BG" code.
    bgr = cv2.cvtColor(np.round(mosaic * 65535).astype(np.uint16), cv2.COLOR_BayerBG2BGR)
    return bgr[..., ::-1].astype(np.float32) / 65535


def isp_params(rgb):
    """Grey-world gains and an exposure that brings the mean to 0.18 (before gamma)."""
    means = rgb.reshape(-1, 3).mean(0) + 1e-8
    gains = means[1] / means
    exposure = 0.18 / max(float((rgb * gains).mean()), 1e-8)
    return gains * exposure


def render(rgb, gains):
    return (np.clip(rgb * gains, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)[..., ::-1]  # -> BGR


def render_triplet(noisy, output, clean, black_level=BLACK_LEVEL):
    """One row noisy | output | clean (uint8 BGR), all packed (4, h, w) on [0,1]."""
    rgbs = [demosaic(x, black_level) for x in (noisy, output, clean)]
    gains = isp_params(rgbs[2])
    gap = np.zeros((rgbs[0].shape[0], 4, 3), np.uint8)
    return np.concatenate([render(rgbs[0], gains), gap, render(rgbs[1], gains), gap, render(rgbs[2], gains)], 1)


def _nice_ticks(lo, hi, n=4):
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def plot(series, title, size=(480, 300), log_y=False, hline=None):
    """Line plot of {label: ([x], [y], colour)} with axes and tick labels, as a BGR image."""
    w, h = size
    img = np.full((h, w, 3), 30, np.uint8)
    left, right, top, bottom = 64, 12, 26, 30
    cv2.putText(img, title, (left, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, WHITE, 1, cv2.LINE_AA)
    pts = [(x, y) for xs, ys, _ in series.values() for x, y in zip(xs, ys) if np.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        cv2.putText(img, "no data yet", (left, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, GREY, 1, cv2.LINE_AA)
        return img
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs_all = [p[0] for p in pts]
    ys_all = [fy(p[1]) for p in pts] + ([fy(hline[0])] if hline else [])
    x0, x1 = min(xs_all), max(max(xs_all), min(xs_all) + 1)
    y0, y1 = min(ys_all), max(ys_all)
    pad = (y1 - y0) * 0.08 or 0.5
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x, y):
        return (int(left + (x - x0) / (x1 - x0) * (w - left - right)),
                int(h - bottom - (fy(y) - y0) / (y1 - y0) * (h - top - bottom)))

    cv2.rectangle(img, (left, top), (w - right, h - bottom), GREY, 1)
    for t in _nice_ticks(y0, y1):
        py = int(h - bottom - (t - y0) / (y1 - y0) * (h - top - bottom))
        label = f"{10 ** t:.2g}" if log_y else f"{t:.4g}"
        cv2.putText(img, label, (4, py + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, GREY, 1, cv2.LINE_AA)
        cv2.line(img, (left - 3, py), (left, py), GREY, 1)
    for t in _nice_ticks(x0, x1):
        px = int(left + (t - x0) / (x1 - x0) * (w - left - right))
        cv2.putText(img, f"{t:g}", (px - 10, h - bottom + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.35, GREY, 1,
                    cv2.LINE_AA)
    if hline:
        _, label, colour = hline
        py = to_px(x0, hline[0])[1]
        for px in range(left, w - right, 10):
            cv2.line(img, (px, py), (min(px + 5, w - right), py), colour, 1)
        cv2.putText(img, label, (left + 4, py - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1, cv2.LINE_AA)
    legend_y = top + 14
    for label, (xs, ys, colour) in series.items():
        keep = [(x, y) for x, y in zip(xs, ys) if np.isfinite(y) and (y > 0 or not log_y)]
        if keep:
            poly = np.array([to_px(x, y) for x, y in keep], np.int32)
            cv2.polylines(img, [poly], False, colour, 1, cv2.LINE_AA)
            if len(keep) < 30:
                for p in poly:
                    cv2.circle(img, tuple(int(v) for v in p), 2, colour, -1)
        cv2.putText(img, label, (w - right - 175, legend_y), cv2.FONT_HERSHEY_SIMPLEX, 0.38, colour, 1, cv2.LINE_AA)
        legend_y += 14
    return img


def curves_image(records, identity_score=None, crops=(), black_level=BLACK_LEVEL):
    """records: the run's log.jsonl entries; crops: (noisy, output, clean) packed triplets."""
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_score" in r]
    loss_plot = plot({"train loss": ([r["iteration"] for r in train], [r["loss"] for r in train], BLUE)},
                     "training loss (log scale)", log_y=True)
    series = {"val score": ([r["iteration"] for r in val], [r["val_score"] for r in val], ORANGE)}
    if any("val_score_raw" in r for r in val):
        raw = [r for r in val if "val_score_raw" in r]
        series["val score (raw weights)"] = ([r["iteration"] for r in raw], [r["val_score_raw"] for r in raw], GREEN)
    hline = (identity_score, f"identity {identity_score:.3f}", GREY) if identity_score is not None else None
    score_plot = plot(series, "validation contest score", hline=hline)
    img = np.concatenate([loss_plot, score_plot], 1)
    rows = [render_triplet(*c, black_level=black_level) for c in crops]
    if rows:
        width = img.shape[1]
        header = np.full((20, width, 3), 30, np.uint8)
        cv2.putText(header, "validation crops: noisy | output | clean (simple ISP)", (8, 14),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, WHITE, 1, cv2.LINE_AA)
        blocks = [img, header]
        for row in rows:
            scale = width / row.shape[1]
            row = cv2.resize(row, (width, max(1, int(round(row.shape[0] * scale)))), interpolation=cv2.INTER_AREA
                             if scale < 1 else cv2.INTER_NEAREST)
            blocks += [row, np.full((4, width, 3), 30, np.uint8)]
        img = np.concatenate(blocks, 0)
    return img


def write_png(path, img):
    # cv2.imwrite picks the format from the file name, and atomic_output's temporary name
    # ends in .tmp, so encode in memory and write the bytes.
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.tobytes())
