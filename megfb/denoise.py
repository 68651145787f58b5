"""`megfb denoise`: a checkpoint over raw photographs of any size, in overlapping tiles.

The network is fully convolutional, but its attention (MDTA) is global over whatever it is
given, and a whole 24 MP frame in one forward would need tens of GB. So a frame is cut into
tiles of DENOISE_TILE x DENOISE_TILE mosaic pixels (the contest's 256x256 patch: each tile looks
like what the model was trained on) overlapping by DENOISE_OVERLAP pixels. Every tile goes
through the project's one prediction path (megfb.infer.predict_packed); the predictions are
blended with a raised-cosine window over the overlap (weights sum-normalised), so neighbouring
tiles fade into each other instead of meeting at a seam. Memory stays bounded: the frame, its
accumulator and one row of tiles (plus one forward's activations) are all that is held.

The value mapping and the Bayer phase are megfb.raw's: the model sees RGGB in its own
[0, 1] range, and the output is in the input file's scale, black level and pixel grid.
"""
import os

import numpy as np

from .errors import MegfbError

DENOISE_TILE = 256  # mosaic pixels; the contest patch size
DENOISE_OVERLAP = 32  # mosaic pixels shared by neighbouring tiles


def tile_starts(size, tile, overlap):
    """Start offsets of tiles of length `tile` covering [0, size) with at least `overlap` shared;
    the last tile ends at `size` (its overlap with the previous one may be larger)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def ramp(length, overlap):
    """1-D blending weight: raised-cosine ramps of `overlap` samples at both ends, 1 between,
    strictly positive (a tile alone at the frame's edge still counts)."""
    w = np.ones(length, np.float32)
    n = min(overlap, length // 2)
    if n > 0:
        r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n, dtype=np.float64) + 0.5) / n)
        w[:n] = r
        w[length - n:] = r[::-1]
    return w


def tile_grid(h, w, tile, overlap):
    """[(y0, x0, th, tw)] of the tiles covering an h x w packed frame (row by row)."""
    th, tw = min(tile, h), min(tile, w)
    return [(y, x, th, tw) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]


def denoise_packed(model, x, tile=DENOISE_TILE // 2, overlap=DENOISE_OVERLAP // 2, batch_size=None,
                   tta=False, bar=None, engine=None):
    """x: (4, h, w) packed RGGB planes on [0, 1] -> float32 (4, h, w) blended predictions.

    tile/overlap in packed pixels. Tiles are predicted one row of tiles at a time through
    predict_packed (with its `engine`); `bar` (a tqdm) is advanced by one per tile."""
    from .infer import predict_packed

    _, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    window = ramp(th, overlap)[:, None] * ramp(tw, overlap)[None, :]
    out = np.zeros((4, h, w), np.float32)
    weight = np.zeros((h, w), np.float32)
    for y in ys:
        tiles = np.stack([x[:, y:y + th, x0:x0 + tw] for x0 in xs])
        pred = predict_packed(model, tiles, batch_size=batch_size, tta=tta, progress=False, engine=engine)
        for x0, p in zip(xs, pred):
            out[:, y:y + th, x0:x0 + tw] += p * window
            weight[y:y + th, x0:x0 + tw] += window
        if bar is not None:
            bar.update(len(xs))
    out /= weight
    return out


def seam_report(model, x, tile, overlap, batch_size=None, engine=None):
    """How much neighbouring tiles disagree where they overlap, next to how much the model
    changes: {"disagreement": mean |p_a - p_b| over every overlap of horizontally or vertically
    adjacent tiles, "removed": mean |blended - x|, "ratio": their quotient}. x, tile, overlap as
    in denoise_packed. A ratio well below 1 means the blend has no visible seams: the tiles
    differ from each other far less than from the noisy input."""
    from .infer import predict_packed

    _, h, w = x.shape
    grid = tile_grid(h, w, tile, overlap)
    preds = predict_packed(model, np.stack([x[:, y:y + th, x0:x0 + tw] for y, x0, th, tw in grid]),
                           batch_size=batch_size, progress=False, engine=engine)
    diffs = []
    for i, (ya, xa, th, tw) in enumerate(grid):
        for j, (yb, xb, _, _) in enumerate(grid):
            if j <= i or not ((ya == yb and 0 < xb - xa < tw) or (xa == xb and 0 < yb - ya < th)):
                continue
            y0, y1, x0, x1 = max(ya, yb), min(ya, yb) + th, max(xa, xb), min(xa, xb) + tw
            a = preds[i][:, y0 - ya:y1 - ya, x0 - xa:x1 - xa]
            b = preds[j][:, y0 - yb:y1 - yb, x0 - xb:x1 - xb]
            diffs.append(np.abs(a - b).mean())
    removed = float(np.abs(denoise_packed(model, x, tile, overlap, batch_size, engine=engine) - x).mean())
    disagreement = float(np.mean(diffs)) if diffs else 0.0
    return {"disagreement": disagreement, "removed": removed, "ratio": disagreement / max(removed, 1e-12),
            "pairs": len(diffs)}


def denoise_mosaic(model, m, domain, tile=DENOISE_TILE, overlap=DENOISE_OVERLAP, batch_size=None,
                   tta=False, progress=True, engine=None):
    """A megfb.raw.Mosaic -> uint16 (H, W) denoised mosaic in the file's own scale and grid.

    domain: (black, white) of the checkpoint's value range in 16-bit DN."""
    from tqdm import tqdm

    from .io import pack_bayer, unpack_bayer
    from .raw import from_model_domain, from_rggb, to_model_domain, to_rggb

    black, white = domain
    x, offset = to_rggb(to_model_domain(m, black, white), m.pattern)
    packed = pack_bayer(x)
    del x
    _, h, w = packed.shape
    n = len(tile_grid(h, w, tile // 2, overlap // 2))
    bar = tqdm(total=n, unit="tile", desc=os.path.basename(m.path), disable=not progress, leave=True)
    try:
        y = denoise_packed(model, packed, tile // 2, overlap // 2, batch_size, tta, bar, engine)
    finally:
        bar.close()
    del packed
    return from_model_domain(from_rggb(unpack_bayer(y), offset, m.shape), m, black, white)


def model_domain(info):
    """(black, white) in 16-bit DN of the data the checkpoint was trained on.

    A trainer checkpoint records them in its stats (black_level, white_level on [0, 1]); a
    plain state dict such as the published weights gets the contest's (megfb.raw.MODEL_BLACK,
    MODEL_WHITE)."""
    from .raw import FULL_SCALE, MODEL_BLACK, MODEL_WHITE

    stats = info.get("stats") or {}
    black = stats.get("black_level")
    white = stats.get("white_level")
    black = MODEL_BLACK if black is None else float(np.mean(black)) * FULL_SCALE
    white = MODEL_WHITE if white is None else float(np.mean(white)) * FULL_SCALE
    return black, white


# --------------------------------------------------------------------------------- command

def output_paths(path, out_dir, kind, npy=False, preview=True):
    """{what: output path} for one input."""
    stem = os.path.splitext(os.path.basename(path))[0]
    base = os.path.join(out_dir, stem)
    if kind == "bin":
        return {"bin": base + ".denoised.bin"}
    paths = {"tiff": base + ".denoised.tif"}
    if npy:
        paths["npy"] = base + ".denoised.npy"
    if kind == "raw" and os.path.splitext(path)[1].lower() == ".dng":
        paths["dng"] = base + ".denoised.dng"
    if preview:
        paths["preview"] = base + ".preview.png"
    return paths


def _check_inputs(args):
    """Read every input once before a model is loaded or anything written: one bad file stops
    the run with its own sentence and no output at all."""
    from .atomic import check_folder, same_file
    from .io import count_patches
    from .raw import read_mosaic

    # the output place before any work: a file where the folder should be, or a folder that
    # cannot be written, is one line (a missing --out-dir is made inside an existing folder)
    if os.path.exists(args.out_dir):
        check_folder(args.out_dir, "--out-dir")
    else:
        check_folder(os.path.dirname(os.path.abspath(args.out_dir)), "--out-dir parent folder")
    sources = [p for p in (*args.inputs, args.ckpt, args.config) if p]
    plan, seen = [], {}
    for path in args.inputs:
        if os.path.splitext(path)[1].lower() == ".bin":
            count_patches(path)
            kind = "bin"
        else:
            kind = read_mosaic(path, args.pattern, args.black, args.white).kind
        outputs = output_paths(path, args.out_dir, kind, args.npy, not args.no_preview)
        for out in outputs.values():
            if os.path.abspath(out) in seen:
                raise MegfbError(f"{path} and {seen[os.path.abspath(out)]} would both write {out}; "
                                 "denoise them into different --out-dir folders")
            if os.path.exists(out) and not args.force:
                raise MegfbError(f"{out} already exists; use --force to replace it")
            clash = next((p for p in sources if same_file(out, p)), None)
            if clash is not None:  # also through a link; --force never allows it
                raise MegfbError(f"refusing to overwrite the input {clash} with {out}")
            seen[os.path.abspath(out)] = path
        plan.append((path, kind, outputs))
    return plan


def cmd_denoise(args):
    import time

    from .checkpoint import describe, model_from_checkpoint
    from .infer import predict_mosaics
    from .io import read_bin, write_bin
    from .raw import read_mosaic, write_denoised_dng, write_npy, write_preview, write_tiff

    if args.overlap >= args.tile:
        raise MegfbError(f"--overlap {args.overlap} must be smaller than --tile {args.tile}")
    if args.tile % 2 or args.overlap % 2:
        raise MegfbError(f"--tile {args.tile} and --overlap {args.overlap} must be even (whole 2x2 Bayer cells)")
    plan = _check_inputs(args)
    model, info = model_from_checkpoint(args.ckpt, args.config)
    domain = model_domain(info)
    print(f"model: {describe(args.ckpt, info)}; its range: black {domain[0]:g}, white {domain[1]:g} (16-bit)")
    for path, kind, outputs in plan:
        t0 = time.perf_counter()
        if kind == "bin":
            pred = predict_mosaics(model, read_bin(path), args.batch_size, args.tta)
            write_bin(outputs["bin"], pred)
            print(f"{path}: {len(pred)} patches -> {outputs['bin']} ({time.perf_counter() - t0:.1f} s)")
            continue
        m = read_mosaic(path, args.pattern, args.black, args.white)
        out = denoise_mosaic(model, m, domain, args.tile, args.overlap, args.batch_size, args.tta,
                             engine=getattr(args, "engine", None))
        seconds = time.perf_counter() - t0
        write_tiff(outputs["tiff"], out)
        if "npy" in outputs:
            write_npy(outputs["npy"], out)
        if "dng" in outputs:
            write_denoised_dng(outputs["dng"], path, out, m)
        if "preview" in outputs:
            write_preview(outputs["preview"], m, out)
        mp = m.shape[0] * m.shape[1] / 1e6
        print(f"{path}: {m.describe()}; {mp:.1f} MP in {seconds:.1f} s ({seconds / mp:.2f} s/MP) -> "
              + ", ".join(outputs.values()))
    return 0
