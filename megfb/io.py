"""Contest .bin files and the Bayer packing every top MegCup 2022 solution fed its network.

A contest file is N raw 256x256 Bayer mosaics, little-endian uint16, C order, no header, so
its byte size alone says how many patches it holds. A size that is not a whole number of
patches means the file is not a contest file; we say so rather than reshape it silently.
"""
import hashlib
import os

import numpy as np

from .atomic import atomic_output
from .errors import MegfbError

PATCH = 256
PATCH_BYTES = PATCH * PATCH * 2  # one uint16 mosaic
DTYPE = np.dtype("<u2")
WHITE = 65535.0  # values are scaled to [0, 1] by this (the contest's convention)

# Packed per-channel statistics (R, Gr, Gb, B) of the contest training data on the [0,1]
# scale, black level included: stored in the published FBRestormer weights (the 1st place
# standardises with the same constants); the synthetic default set is exposed to match them.
PUBLISHED_MEAN = (0.08958147, 0.11184454, 0.11297596, 0.09162903)
PUBLISHED_STD = (0.06037381, 0.09139108, 0.09338845, 0.06839059)

FILE_NAMES = {
    "train_input": "competition_train_input.0.2.bin",
    "train_gt": "competition_train_gt.0.2.bin",
    "test_input": "competition_test_input.0.2.bin",
    # not a contest file: the synthetic set's test targets, so test predictions can be scored locally
    "test_gt": "synthetic_test_gt.0.2.bin",
}


def contest_paths(data_dir):
    """Where the contest files (and the synthetic test targets) live in `data_dir`."""
    return {key: os.path.join(os.fspath(data_dir), name) for key, name in FILE_NAMES.items()}


def count_patches(path):
    """Number of 256x256 patches in a contest .bin; MegfbError when it is not one."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MegfbError(f"file not found: {path}")
    if not os.path.isfile(path):
        raise MegfbError(f"{path} is not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise MegfbError(f"{path} is empty (0 bytes); expected N x {PATCH} x {PATCH} uint16 patches")
    if size % PATCH_BYTES:
        raise MegfbError(
            f"{path} has {size} bytes, not a multiple of one {PATCH}x{PATCH} uint16 patch ({PATCH_BYTES} bytes): "
            f"{size // PATCH_BYTES} whole patches and {size % PATCH_BYTES} bytes left over, so it is not a contest file"
        )
    return size // PATCH_BYTES


def read_bin(path):
    """Memory-map a contest .bin read-only as (N, 256, 256) uint16.

    A memmap, not a read: the training file is 1 GB and every loader worker opens it.
    """
    n = count_patches(path)
    return np.memmap(os.fspath(path), dtype=DTYPE, mode="r", shape=(n, PATCH, PATCH))


def read_patches(path, indices):
    """Patches `indices` of a contest .bin as (n, 256, 256) uint16, read with os.pread.

    For the long reads (statistics, validation sets): a file truncated or replaced meanwhile
    is one line naming it, where a memmap read would end the process with SIGBUS."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    out = np.empty((len(idx), PATCH, PATCH), dtype=DTYPE)
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        for j, i in enumerate(idx):
            if os.preadv(fd, [memoryview(out[j]).cast("B")], int(i) * PATCH_BYTES) != PATCH_BYTES:
                raise MegfbError(f"{path} is now {os.fstat(fd).st_size} bytes, too short for patch {int(i)}: it "
                                 "was truncated or replaced while it was being read")
    finally:
        os.close(fd)
    return out


def load_bin(path):
    """Read a contest .bin whole into memory as (N, 256, 256) uint16 (prediction inputs: at most
    a few hundred MB). Unlike a memmap, a file truncated or replaced while a long command runs
    cannot kill the process with SIGBUS later: it is read once, and a short read is one line."""
    n = count_patches(path)
    out = np.empty((n, PATCH, PATCH), dtype=DTYPE)
    with open(path, "rb") as f:
        got = f.readinto(memoryview(out).cast("B"))
    if got != n * PATCH_BYTES:
        raise MegfbError(f"{path} changed while it was read ({got} of {n * PATCH_BYTES} bytes); "
                         "was it being written or truncated?")
    return out


def read_pair(input_path, gt_path):
    """(noisy, clean) memmaps of an input/ground-truth pair; their patch counts must agree."""
    noisy, clean = read_bin(input_path), read_bin(gt_path)
    if len(noisy) != len(clean):
        raise MegfbError(
            f"{input_path} holds {len(noisy)} patches but {gt_path} holds {len(clean)}; "
            "an input file and its ground truth must have the same count"
        )
    return noisy, clean


def check_patches(array, what="array"):
    """Refuse anything that is not (N, 256, 256) uint16 (MegfbError naming `what`)."""
    shape = tuple(np.shape(array))
    if len(shape) != 3 or shape[1:] != (PATCH, PATCH) or shape[0] < 1:
        raise MegfbError(f"{what}: expected shape (N, {PATCH}, {PATCH}), got {shape}")
    dtype = np.asarray(array[:0]).dtype
    if dtype != np.uint16:
        raise MegfbError(f"{what}: expected uint16 values, got {dtype}")


def write_patches(f, array):
    """Append (n, 256, 256) uint16 patches to an open binary file, little-endian."""
    f.write(np.ascontiguousarray(array, dtype=DTYPE).tobytes())


def write_bin(path, array, chunk=256):
    """Write (N, 256, 256) uint16 patches as a contest .bin, atomically (all or nothing)."""
    check_patches(array, f"refusing to write {path}")
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        for i in range(0, len(array), chunk):  # chunks: `array` may itself be a 1 GB memmap
            write_patches(f, array[i:i + chunk])


def sha256_stream(f, block=1 << 24):
    """SHA-256 hex digest of an open binary file, read in blocks."""
    h = hashlib.sha256()
    for part in iter(lambda: f.read(block), b""):
        h.update(part)
    return h.hexdigest()


def sha256_file(path):
    """SHA-256 hex digest of a file (manifests record what went into a result)."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def pack_bayer(x):
    """(..., H, W) mosaic -> (..., 4, H/2, W/2) planes in the order (0,0), (0,1), (1,0), (1,1).

    For an RGGB sensor that is R, Gr, Gb, B. The contest's own expression for (N, H, W) is
    x.reshape(n,1,h//2,2,w//2,2).transpose(0,1,3,5,2,4).reshape(n,4,h//2,w//2).
    """
    *lead, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_bayer needs even height and width, got {h}x{w}")
    nd = len(lead)
    y = x.reshape(*lead, h // 2, 2, w // 2, 2)
    y = y.transpose(*range(nd), nd + 1, nd + 3, nd, nd + 2)
    return y.reshape(*lead, 4, h // 2, w // 2)


def unpack_bayer(x):
    """(..., 4, h, w) planes -> (..., 2h, 2w) mosaic; the exact inverse of pack_bayer."""
    *lead, c, h, w = x.shape
    if c != 4:
        raise ValueError(f"unpack_bayer needs 4 planes, got {c}")
    nd = len(lead)
    y = x.reshape(*lead, 2, 2, h, w)
    y = y.transpose(*range(nd), nd + 2, nd, nd + 3, nd + 1)
    return y.reshape(*lead, 2 * h, 2 * w)


def mosaic_to_packed(x):
    """uint16 mosaics (..., H, W) -> float32 packed planes on [0, 1], what the network sees."""
    return pack_bayer(np.asarray(x, dtype=np.float32)) / np.float32(WHITE)


ROUNDING = ("round", "floor")


def packed_to_mosaic(y, rounding="round"):
    """Network output on [0, 1] (..., 4, h, w) -> uint16 mosaics, the contest's submission rule:
    x 65535, clip to [0, 65535], round, uint16, unpack.

    rounding "floor" truncates instead, as the 2nd place's code does (astype(uint16) of the
    clipped float): a model declares which through its `output_rounding` attribute."""
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {ROUNDING}, got {rounding!r}")
    y = np.clip(np.asarray(y, dtype=np.float32) * np.float32(WHITE), 0.0, WHITE)
    y = np.rint(y) if rounding == "round" else np.floor(y)
    return unpack_bayer(y.astype(np.uint16))
