"""Training data: split, black-level statistics, CFA-safe augmentation, batches.

Contest files are read with os.pread (megfb.io.read_patches, the batches' own reader), not
through memory maps, so a file truncated meanwhile is one line instead of SIGBUS. Work is in
the packed domain: (..., 4, h, w) planes R, Gr, Gb, B of an RGGB mosaic, on [0, 1] (/65535).
"""
import os
import warnings

import numpy as np
import yaml
from megengine.data import DataLoader
from megengine.data.collator import Collator
from megengine.data.dataset import Dataset
from megengine.data.sampler import MapSampler

from .atomic import atomic_output
from .errors import MegfbError
from .io import (PATCH, WHITE, contest_paths, mosaic_to_packed, pack_bayer, read_pair, read_patches,
                 unpack_bayer)
from .metrics import contest_score, psnr

CHANNELS = ("R", "Gr", "Gb", "B")  # packed order (0,0), (0,1), (1,0), (1,1) of RGGB


def split_indices(n, val_fraction, seed):
    """(train_idx, val_idx): a seeded random split of n patches, each sorted (int64).

    Sorted so reads from the memmap go forward through the file.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MegfbError(f"validation fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def check_split(n, val_fraction, path, what="data.val_fraction / --val-fraction"):
    """The one rule `train` and `data stats` share: the fraction is in (0, 1) and both the
    training and the validation split hold at least one patch. One line naming the file."""
    from .config import RULES

    problem = RULES["data.val_fraction"](val_fraction)
    if problem:
        raise MegfbError(f"the validation fraction ({what}) must be {problem}, got {val_fraction!r}")
    if n < 2:
        raise MegfbError(f"{path} holds {n} patch{'es' if n != 1 else ''}: at least 2 are needed, one for "
                         f"training and one for the validation split ({what})")


def data_fingerprint(*paths):
    """What a data set is, for the records that depend on it: file names and sizes (not mtimes,
    so a copy or a touch does not count as a change)."""
    return {os.path.basename(os.fspath(p)): os.path.getsize(p) for p in paths}


def check_stats_source(stats, stats_path, paths):
    """Refuse a stats.yaml computed from other data (one line naming both files)."""
    source = stats.get("source")
    if not isinstance(source, dict) or not all(isinstance(source.get(k), dict) for k in ("train_input", "train_gt")):
        raise MegfbError(f"statistics file {stats_path} does not record the data it was computed from "
                         "('source'); rerun `megfb data stats` to recompute it")
    for key, path in zip(("train_input", "train_gt"), paths):
        rec = source[key]
        name, size = os.path.basename(str(rec.get("path", ""))), rec.get("bytes")
        if name != os.path.basename(path) or size != os.path.getsize(path):
            raise MegfbError(f"statistics file {stats_path} was computed from {name} of {size} bytes, not from "
                             f"{path} ({os.path.getsize(path)} bytes): rerun `megfb data stats` for this data")


# ---------------------------------------------------------------------------- statistics

def _histograms(path, idx, chunk, bar):
    """Per packed channel 65536-bin histograms of the uint16 mosaics idx of a .bin (exact)."""
    hist = np.zeros((4, 65536), np.int64)
    for i in range(0, len(idx), chunk):
        p = pack_bayer(read_patches(path, idx[i:i + chunk]))
        for c in range(4):
            hist[c] += np.bincount(p[:, c].ravel(), minlength=65536)
        if bar is not None:
            bar.update(len(idx[i:i + chunk]))
    return hist


def _moments(hist):
    values = np.arange(65536, dtype=np.float64) / WHITE
    count = hist.sum(axis=1).astype(np.float64)
    mean = (hist * values).sum(axis=1) / count
    var = (hist * (values - mean[:, None]) ** 2).sum(axis=1) / count
    return mean, np.sqrt(var)


def _percentile(hist, q):
    """Per channel, the smallest value with at least fraction q of the samples at or below it."""
    cum = np.cumsum(hist, axis=1)
    return np.array([int(np.searchsorted(c, q * c[-1])) for c in cum])


def _range(hist):
    nonzero = [np.flatnonzero(h) for h in hist]
    return [int(nz[0]) for nz in nonzero], [int(nz[-1]) for nz in nonzero]


def compute_stats(noisy_path, clean_path, val_fraction=0.1, seed=0, chunk=256, progress=True):
    """Statistics of a training pair file, computed on its training split.

    - black_level: per packed channel, the 0.01th percentile of the clean target (its
      histogram floor: clean targets have no noise below black), in 16-bit DN and on [0, 1];
    - mean/std on [0, 1] of the noisy input (what the model standardises) and of the clean
      target; value ranges in 16-bit DN;
    - the contest score and PSNR of the identity prediction (noisy input as the answer) on
      the validation split: the floor any model must beat.
    Exact: histograms of the uint16 values, accumulated chunk by chunk over the memmaps.
    """
    from tqdm import tqdm

    noisy, clean = read_pair(noisy_path, clean_path)
    check_split(len(noisy), val_fraction, noisy_path)
    train_idx, val_idx = split_indices(len(noisy), val_fraction, seed)
    stats_idx = train_idx if len(train_idx) else val_idx
    bar = tqdm(total=2 * len(stats_idx) + len(val_idx), unit="patch", desc="stats",
               disable=None if progress else True)
    h_noisy = _histograms(noisy_path, stats_idx, chunk, bar)
    h_clean = _histograms(clean_path, stats_idx, chunk, bar)
    mean, std = _moments(h_noisy)
    for c, (name, sd) in enumerate(zip(CHANNELS, std)):
        if not sd > 0:
            bar.close()
            value = int(np.flatnonzero(h_noisy[c])[0])
            raise MegfbError(f"{noisy_path}: every {name} pixel of the {len(stats_idx)} patches statistics are "
                             f"computed on has the value {value} (constant data, std 0): there is nothing "
                             "to standardise or learn; check that the file holds real noisy images")
    if len(val_idx):
        vn, vc = read_patches(noisy_path, val_idx), read_patches(clean_path, val_idx)
        identity = {"score": contest_score(vn, vc), "psnr": psnr(vn, vc)}
        bar.update(len(val_idx))
    else:
        identity = {"score": None, "psnr": None}
    bar.close()
    clean_mean, clean_std = _moments(h_clean)
    black = _percentile(h_clean, 1e-4)
    lo_n, hi_n = _range(h_noisy)
    lo_c, hi_c = _range(h_clean)
    f = lambda v: [round(float(x), 6) for x in v]  # noqa: E731
    return {
        "written_by": "megfb data stats",
        "channels": list(CHANNELS),
        "mean": f(mean),
        "std": f(std),
        "clean_mean": f(clean_mean),
        "clean_std": f(clean_std),
        "black_level": {"dn16": [int(b) for b in black], "unit": f(black / WHITE)},
        "range_dn16": {"noisy_min": lo_n, "noisy_max": hi_n, "clean_min": lo_c, "clean_max": hi_c},
        "identity_val": {"score": identity["score"], "psnr": identity["psnr"]},
        "computed_on": "train split" if len(train_idx) else "validation split",
        "split": {"val_fraction": float(val_fraction), "seed": int(seed),
                  "n_train": int(len(train_idx)), "n_val": int(len(val_idx))},
        "source": {
            key: {"path": os.fspath(p), "bytes": os.path.getsize(p), "patches": int(len(noisy))}
            for key, p in (("train_input", noisy_path), ("train_gt", clean_path))
        },
    }


def load_stats(path):
    """The stats.yaml written by `megfb data stats`; MegfbError when missing or malformed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MegfbError(f"statistics file not found: {path} (run `megfb data stats` first)")
    try:
        with open(path) as f:
            stats = yaml.safe_load(f)
    except yaml.YAMLError:
        raise MegfbError(f"statistics file {path} is not valid YAML") from None
    for key in ("mean", "std"):
        value = stats.get(key) if isinstance(stats, dict) else None
        if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
            raise MegfbError(f"statistics file {path}: '{key}' must be a list of 4 numbers")
    if min(stats["std"]) <= 0:
        raise MegfbError(f"statistics file {path}: 'std' must be positive")
    return stats


def write_stats(path, stats):
    """Write a stats dict (compute_stats) as YAML, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(stats, f, sort_keys=False, default_flow_style=None)


def cmd_stats(args):
    """`megfb data stats`: print the statistics table and write data/stats.yaml."""
    from .atomic import check_output
    from .clean import is_megfb_stats

    paths = contest_paths(args.data_dir)
    out = args.out or os.path.join(args.data_dir, "stats.yaml")
    noisy, _ = read_pair(paths["train_input"], paths["train_gt"])  # one line for a missing/bad file first
    check_split(len(noisy), args.val_fraction, paths["train_input"])
    # its own statistics file is the project's rolling output; anything else needs --force
    force = getattr(args, "force", False) or (os.path.isfile(out) and is_megfb_stats(out))
    check_output(out, inputs=(paths["train_input"], paths["train_gt"], paths["test_input"]), force=force,
                 what="--out")
    stats = compute_stats(paths["train_input"], paths["train_gt"], args.val_fraction, args.split_seed)
    s = stats["split"]
    print(f"{stats['source']['train_input']['patches']} pairs; statistics on the {stats['computed_on']} "
          f"({s['n_train']} train / {s['n_val']} val, seed {s['seed']})")
    print(f"{'channel':8s}{'black DN16':>11s}{'black':>9s}{'mean':>9s}{'std':>9s}"
          f"{'clean mean':>12s}{'clean std':>11s}{'min':>7s}{'max':>7s}")
    for c, name in enumerate(CHANNELS):
        print(f"{name:8s}{stats['black_level']['dn16'][c]:>11d}{stats['black_level']['unit'][c]:>9.4f}"
              f"{stats['mean'][c]:>9.4f}{stats['std'][c]:>9.4f}{stats['clean_mean'][c]:>12.4f}"
              f"{stats['clean_std'][c]:>11.4f}{stats['range_dn16']['noisy_min'][c]:>7d}"
              f"{stats['range_dn16']['noisy_max'][c]:>7d}")
    ident = stats["identity_val"]
    if ident["score"] is not None:
        print(f"identity prediction on the validation split: score {ident['score']:.4f}, PSNR {ident['psnr']:.2f} dB")
    write_stats(out, stats)
    print(f"wrote {out}")


# ------------------------------------------------------------------- CFA-safe augmentation

def dihedral_packed(x, k):
    """The k-th (0..7) flip/rotation of packed RGGB planes (..., 4, h, w), CFA phase kept.

    k % 4 quarter turns (np.rot90 on the last two axes), then a left-right flip when k >= 4.
    Flipping every plane keeps R in channel 0 and B in channel 3 (on the mosaic that is the
    flip plus a one-pixel shift back to RGGB); a transpose keeps R and B on their sites but
    swaps the two greens, so odd k (one transpose in the rotation) swap channels 1 and 2.
    """
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    y = np.rot90(x, k % 4, axes=(-2, -1))
    if k >= 4:
        y = y[..., ::-1]
    if k % 2:
        y = y[..., [0, 2, 1, 3], :, :]
    return np.ascontiguousarray(y)


def dihedral_packed_inverse(y, k):
    """Undo dihedral_packed(., k): swap back, unflip, rotate back."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    if k % 2:
        y = y[..., [0, 2, 1, 3], :, :]
    if k >= 4:
        y = y[..., ::-1]
    return np.ascontiguousarray(np.rot90(y, -(k % 4), axes=(-2, -1)))


def dihedral_mosaic_packed(x, k):
    """The k-th (0..7) flip/transpose of the mosaic itself, for packed planes (..., 4, h, w):
    unpack, k % 4 quarter turns, a left-right flip when k >= 4, pack again. The Bayer phase
    moves (the network sees e.g. GRBG); only a model trained on such flips suits it."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    m = np.rot90(unpack_bayer(x), k % 4, axes=(-2, -1))
    if k >= 4:
        m = m[..., ::-1]
    return np.ascontiguousarray(pack_bayer(np.ascontiguousarray(m)))


def dihedral_mosaic_packed_inverse(y, k):
    """Undo dihedral_mosaic_packed(., k)."""
    if not 0 <= k < 8:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    m = unpack_bayer(y)
    if k >= 4:
        m = m[..., ::-1]
    return np.ascontiguousarray(pack_bayer(np.ascontiguousarray(np.rot90(m, -(k % 4), axes=(-2, -1)))))



# ---------------------------------------------------------------------------- batches

class _PatchFiles:
    """The training pair, read with os.pread (file descriptors opened lazily, once per process,
    so loader workers never pickle them). Not a memmap: a file truncated or replaced while
    training then gives a clear error naming it, where a memmap read kills the process with
    SIGBUS."""

    def __init__(self, noisy_path, clean_path):
        self.noisy_path, self.clean_path = os.fspath(noisy_path), os.fspath(clean_path)
        self.count = len(read_pair(self.noisy_path, self.clean_path)[0])  # validated up front
        self._fds = None

    def _open(self):
        if self._fds is None:
            self._fds = tuple(os.open(p, os.O_RDONLY) for p in (self.noisy_path, self.clean_path))
        return self._fds

    def rows(self, which, i, y, n):
        """Rows y..y+n of patch i of the input (which=0) or target (1) file, uint16 (n, 256)."""
        fd, path = self._open()[which], (self.noisy_path, self.clean_path)[which]
        want = n * PATCH * 2
        data = os.pread(fd, want, (i * PATCH + y) * PATCH * 2)
        if len(data) != want:
            raise MegfbError(f"{path} is now {os.fstat(fd).st_size} bytes, shorter than the {self.count} "
                             "patches it held when training started: it was truncated or replaced while "
                             "training ran; restore it and rerun the same command to resume")
        return np.frombuffer(data, dtype="<u2").reshape(n, PATCH)

    def __getstate__(self):
        return {**self.__dict__, "_fds": None}

    def __del__(self):
        for fd in getattr(self, "_fds", None) or ():
            try:
                os.close(fd)
            except OSError:
                pass


def make_batch(files, indices, crop, batch_size, augment, seed, t, rank=0):
    """Batch number t: a pure function of (seed, t[, rank]) and the data.

    Returns (noisy, clean) float32 (B, 4, crop/2, crop/2) on [0, 1]. Crops start on even rows
    and columns so every crop is RGGB like the full patch. augment: False, True (the 8
    CFA-preserving flips/rotations) or "mosaic" (the 8 flips/transposes of the mosaic itself,
    the 2nd place's augmentation: the network then also sees other Bayer phases).
    """
    rng = np.random.default_rng([seed, t] if rank == 0 else [seed, t, rank])
    picks = indices[rng.integers(0, len(indices), size=batch_size)]
    offsets = 2 * rng.integers(0, (PATCH - crop) // 2 + 1, size=(batch_size, 2))
    ks = rng.integers(0, 8, size=batch_size) if augment else np.zeros(batch_size, np.int64)
    flip = dihedral_mosaic_packed if augment == "mosaic" else dihedral_packed
    out_noisy = np.empty((batch_size, 4, crop // 2, crop // 2), np.float32)
    out_clean = np.empty_like(out_noisy)
    for b, (i, (y, x), k) in enumerate(zip(picks, offsets, ks)):
        out_noisy[b] = flip(mosaic_to_packed(files.rows(0, i, y, crop)[:, x:x + crop]), int(k))
        out_clean[b] = flip(mosaic_to_packed(files.rows(1, i, y, crop)[:, x:x + crop]), int(k))
    return out_noisy, out_clean


class TrainBatches:
    """Endless iterator of (noisy, clean) float32 packed training batches, (B, 4, crop/2, crop/2).

    Batch t (0-based) depends only on (seed, t), so a run resumed with start=t sees exactly
    the batches it would have seen. With workers > 0 the batches are made by a
    megengine.data.DataLoader with that many worker processes (same batches, same order).
    `rank` (data-parallel training) gives each GPU its own stream; rank 0 is the
    single-process stream.
    """

    def __init__(self, noisy_path, clean_path, indices, crop, batch_size, augment=True, seed=0,
                 workers=0, start=0, rank=0):
        if crop % 2 or not 2 <= crop <= PATCH:
            raise MegfbError(f"crop must be an even number of pixels in [2, {PATCH}], got {crop}")
        self.files = _PatchFiles(noisy_path, clean_path)  # validates the files, in the parent
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise MegfbError(f"no training patches selected from {noisy_path}")
        if self.indices.min() < 0 or self.indices.max() >= self.files.count:
            raise MegfbError(f"training indices out of range for {noisy_path} ({self.files.count} patches)")
        self.crop, self.batch_size, self.augment = (int(crop), int(batch_size),
                                                  "mosaic" if augment == "mosaic" else bool(augment))
        self.seed, self.workers, self.start, self.rank = int(seed), int(workers), int(start), int(rank)

    def batch(self, t):
        return make_batch(self.files, self.indices, self.crop, self.batch_size, self.augment,
                          self.seed, t, self.rank)

    def __iter__(self):
        if self.workers <= 0:
            t = self.start
            while True:
                yield self.batch(t)
                t += 1
        # MegEngine's worker processes pass batches through pyarrow.plasma, which warns on every
        # use, and re-import numpy's float limits noisily; both are harmless here.
        warnings.filterwarnings("ignore", message="Plasma is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The value of the smallest subnormal", category=UserWarning)
        loader = DataLoader(_BatchDataset(self), sampler=_BatchNumbers(self.start),
                            collator=_Single(), num_workers=self.workers)
        yield from loader


class _BatchDataset(Dataset):
    """Item t is the whole batch t: one worker makes one batch, workers take turns."""

    def __init__(self, batches):
        self.b = batches

    def __getitem__(self, t):
        return self.b.batch(t)

    def __len__(self):
        return np.iinfo(np.int64).max


class _BatchNumbers(MapSampler):
    """Yields [start], [start + 1], ... forever (DataLoader keeps the order across workers)."""

    def __init__(self, start):  # no MapSampler.__init__: it wants a finite dataset
        self.start, self.batch_size = start, 1

    def __iter__(self):
        t = self.start
        while True:
            yield [t]
            t += 1

    def __len__(self):
        return np.iinfo(np.int64).max


class _Single(Collator):
    def apply(self, inputs):
        return inputs[0]
