"""Contest-format synthetic raw pairs: the default data when data/ holds no contest files.

Recipe (shared/spec/synthetic-raw.md): crops of the colour photographs that ship inside the
scikit-image wheel, and procedural scenes (megfb/scenes.py: textures, strokes, gradients,
highlights, dead leaves) for what a handful of photos lacks, are unprocessed to linear
camera RGB (inverse sRGB curve, inverse colour matrix, inverse white balance; Brooks et al.,
"Unprocessing Images for Learned Raw Denoising", CVPR 2019), mosaicked to RGGB, exposed so the
set's packed statistics land near the contest's published ones, and given the noise of a real
phone sensor (OPPO Reno 10x, calibrated in the PMRID paper, ECCV 2020) in 10-bit DN, then
stored x64 as uint16 exactly like the contest files.

Everything downstream reads these files through megfb.io and cannot tell them from the real
ones; `synthetic.yaml` beside them records that they are generated (and their sizes and
hashes), which is how `megfb data synth` knows it may replace them and must never touch
anything else.
"""
import collections
import contextlib
import functools
import hashlib
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import yaml

from . import scenes
from .atomic import atomic_output
from .errors import MegfbError
from .io import (FILE_NAMES, PATCH, PUBLISHED_MEAN, PUBLISHED_STD, contest_paths, pack_bayer,
                 sha256_file, unpack_bayer, write_patches)

NOTE_NAME = "synthetic.yaml"
CHUNK = 64  # patches generated per step; part of the seed -> data mapping, so keep it fixed

# Source photographs, all read from the installed wheel (none of these download anything).
# Train and test use disjoint photos; chelsea and `cat` are the same picture, and the two
# motorcycle views are one scene, so each pair stays on one side.
TRAIN_PHOTOS = ("astronaut", "chelsea", "hubble_deep_field", "retina", "motorcycle_left",
                "motorcycle_right", "colorwheel", "brick", "grass", "camera", "moon", "page")
TEST_PHOTOS = ("coffee", "rocket", "immunohistochemistry", "gravel", "coins", "clock", "text")

SETTINGS = {
    "iso": [800, 6400],  # log-uniform per patch
    "red_gain": [1.6, 2.4],  # white-balance gains undone per patch
    "blue_gain": [1.4, 2.2],
    "procedural_fraction": 0.4,  # share of procedural scenes (megfb.scenes, every kind alike)
    # Exposure: per patch, the green signal mean (DN above black) is drawn log-normal; these two
    # constants were tuned so the packed per-channel mean/std land near the contest's figures.
    "exposure_log_mean": 3.2,
    "exposure_log_std": 1.45,
    "highlight_percentile": 99.9,  # ...but this percentile of a patch stays below white
}

# Sensor: OPPO Reno 10x (PMRID), 10-bit DN.
BLACK, WHITE = 64, 1023
V = WHITE - BLACK


def system_gain(iso):
    """K(ISO): DN per photo-electron."""
    return 0.0005995267 * iso + 0.00868861


def read_noise_var(iso):
    """sigma^2(ISO) of the signal-independent (read) noise, in DN^2."""
    return 7.11772e-7 * iso ** 2 + 6.514934e-4 * iso + 0.11492713


# Camera colour matrices (XYZ -> camera) from Brooks et al.; a random convex combination per
# patch gives a family of plausible sensors rather than one.
XYZ2CAMS = np.array([
    [[1.0234, -0.2969, -0.2266], [-0.5625, 1.6328, -0.0469], [-0.0703, 0.2188, 0.6406]],
    [[0.4913, -0.0541, -0.0202], [-0.6130, 1.3513, 0.2906], [-0.1564, 0.2151, 0.7183]],
    [[0.8380, -0.2630, -0.0639], [-0.2887, 1.0725, 0.2496], [-0.0627, 0.1427, 0.5438]],
    [[0.6596, -0.2079, -0.0562], [-0.4782, 1.3016, 0.1933], [-0.0970, 0.1581, 0.5181]],
])
RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                    [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]])
RGGB = (0, 1, 1, 2)  # colour of packed channels (0,0), (0,1), (1,0), (1,1)


# ---------------------------------------------------------------------------------- content

PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MAX_PHOTO_SIDE = 1024  # user photos are area-downscaled in linear light to this long side
TEST_SHARE = 8  # with --photos, one photo in TEST_SHARE (at least one) goes to the test file


@functools.lru_cache(maxsize=None)
def load_photo(name):
    """A photo as linear RGB float32 (H, W, 3), or (H, W, 1) when grey: a scikit-image sample
    photo by name, or a file (a path; see read_photo_file).

    Linearised once per photo, before any resampling, so crops are scaled in linear light.
    """
    if name.lower().endswith(PHOTO_EXTENSIONS):
        return read_photo_file(name)
    # skimage's lazy imports after megengine warn about numpy's float limits; harmless
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import skimage.data

        if name.startswith("motorcycle_"):
            img = skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1]
        else:
            img = getattr(skimage.data, name)()
    if img.dtype != np.uint8:
        raise RuntimeError(f"skimage.data.{name} is {img.dtype}, expected uint8")
    lut = scenes.inverse_srgb(np.arange(256) / 255.0).astype(np.float32)
    img = lut[img]
    return img[..., None] if img.ndim == 2 else img[..., :3]


def read_photo_file(path):
    """An sRGB-encoded 8- or 16-bit PNG/JPEG/TIFF/BMP photo as linear RGB float32 (H, W, 3) or
    (H, W, 1), downscaled (area, in linear light) to MAX_PHOTO_SIDE; MegfbError naming the
    file when it is unreadable, not a photo, or smaller than one 256x256 crop."""
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise MegfbError(f"photo {path} cannot be read as an image (unreadable or truncated file)")
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    else:
        raise MegfbError(f"photo {path} holds {img.dtype} values; expected an 8- or 16-bit image")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]  # alpha dropped
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[..., ::-1]  # OpenCV reads BGR
    elif img.ndim != 2:
        raise MegfbError(f"photo {path} has {img.shape[2]} channels; expected grey or RGB")
    h, w = img.shape[:2]
    if min(h, w) < PATCH:
        raise MegfbError(f"photo {path} is {w}x{h}, smaller than one {PATCH}x{PATCH} crop")
    linear = scenes.inverse_srgb(img.astype(np.float32) / np.float32(scale)).astype(np.float32)
    if max(h, w) > MAX_PHOTO_SIDE:
        f = MAX_PHOTO_SIDE / max(h, w)
        size = (max(PATCH, round(w * f)), max(PATCH, round(h * f)))
        linear = cv2.resize(linear, size, interpolation=cv2.INTER_AREA)
    return linear[..., None] if linear.ndim == 2 else np.ascontiguousarray(linear)


def find_photos(folders):
    """Photo files (PHOTO_EXTENSIONS, any case) directly inside each folder, sorted."""
    found = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise MegfbError(f"--photos {folder} is not a folder")
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(PHOTO_EXTENSIONS))
        if not names:
            raise MegfbError(f"--photos {folder} holds no photos ({', '.join(PHOTO_EXTENSIONS)})")
        found += [os.path.join(folder, n) for n in names]
    return found


def split_photos(folders):
    """(train sources, test sources, manifest entries) for the photos in `folders`.

    Every photo is read and checked first (nothing is written on a bad one). The split goes
    by content hash: the photos sorted by SHA-256, every TEST_SHARE-th one to the test file,
    so no photo is in both files, and adding a photo moves no other photo across.
    """
    paths = find_photos(folders)
    entries = []
    for path in paths:
        img = load_photo(path)
        entries.append({"path": os.path.abspath(path), "sha256": sha256_file(path),
                        "used_size": [int(img.shape[1]), int(img.shape[0])]})
    seen = {}
    for e in entries:
        if e["sha256"] in seen:
            raise MegfbError(f"photo {e['path']} is the same file as {seen[e['sha256']]}")
        seen[e["sha256"]] = e["path"]
    if len(entries) < 2:
        raise MegfbError(f"--photos needs at least 2 photos (one for the training file, one for the "
                         f"test file, never shared); found {len(entries)}")
    entries.sort(key=lambda e: e["sha256"])
    for i, e in enumerate(entries):
        e["split"] = "test" if i % TEST_SHARE == TEST_SHARE - 1 else "train"
    if not any(e["split"] == "test" for e in entries):
        entries[-1]["split"] = "test"
    by_path = {os.path.abspath(p): p for p in paths}
    train = tuple(by_path[e["path"]] for e in entries if e["split"] == "train")
    test = tuple(by_path[e["path"]] for e in entries if e["split"] == "test")
    return train, test, entries


def photo_crop(rng, photo):
    """A random crop of a photo, rescaled to 256x256 (x0.4-x2), flipped/rotated, tinted if grey."""
    h, w = photo.shape[:2]
    side = int(rng.integers(min(128, h, w), min(h, w, 640) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[y:y + side, x:x + side]
    interp = cv2.INTER_AREA if side > PATCH else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (PATCH, PATCH), interpolation=interp).reshape(PATCH, PATCH, -1)
    if crop.shape[2] == 1:  # grey photos get a mild random colour cast
        crop = crop * rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    crop = np.rot90(crop, int(rng.integers(4)))
    return crop[:, ::-1] if rng.integers(2) else crop


def clean_scenes(rng, n, photos):
    """n linear-RGB scenes (n, 256, 256, 3) float32 on roughly [0, 1]: crops of the photos, and
    a share (SETTINGS["procedural_fraction"]) of procedural scenes of every kind in
    megfb.scenes (textures, strokes, gradients, highlights, dead leaves)."""
    out = np.empty((n, PATCH, PATCH, 3), np.float32)
    procedural = rng.uniform(size=n) < SETTINGS["procedural_fraction"]
    kinds = rng.integers(0, len(scenes.KINDS), size=n)
    for i in range(n):
        if procedural[i]:
            out[i] = scenes.procedural_scene(rng, scenes.KINDS[kinds[i]])
        else:
            out[i] = photo_crop(rng, load_photo(photos[int(rng.integers(len(photos)))]))
    return out


# ------------------------------------------------------------------------ camera + sensor

def unprocess_mosaic(rng, rgb):
    """Linear sRGB scenes (n, H, W, 3) -> linear camera RGGB mosaics (n, H, W) float32.

    Inverse colour matrix and inverse white balance are one 3x3 map per patch; each Bayer
    site only needs its own row of it, so it is applied to the packed planes (a third of the
    work of converting all three colours everywhere).
    """
    n = len(rgb)
    w = rng.uniform(1e-8, 1, size=(n, len(XYZ2CAMS)))
    xyz2cam = np.einsum("nk,kij->nij", w, XYZ2CAMS) / w.sum(axis=1)[:, None, None]
    rgb2cam = xyz2cam @ RGB2XYZ
    rgb2cam /= rgb2cam.sum(axis=-1, keepdims=True)  # a white pixel stays white
    gains = np.stack([rng.uniform(*SETTINGS["red_gain"], size=n), np.ones(n),
                      rng.uniform(*SETTINGS["blue_gain"], size=n)], axis=1)
    site = rgb2cam[:, RGGB, :] / gains[:, RGGB, None]  # (n, 4 sites, 3 colours)
    planes = pack_bayer(rgb.transpose(0, 3, 1, 2))  # (n, 3 colours, 4 sites, h, w)
    raw = np.einsum("nkj,njkhw->nkhw", site.astype(np.float32), planes, optimize=True)
    return unpack_bayer(np.maximum(raw, 0))


def expose(rng, mosaic):
    """Scale each patch to a signal in DN above black, clipped at white (saturation)."""
    n = len(mosaic)
    green = pack_bayer(mosaic)[:, 1:3]
    green_mean = green.mean(axis=(1, 2, 3)) + 1e-6
    # highlights of every colour (a red retina saturates red first) from a subsample: a stride
    # of 3 visits all four Bayer sites, and 1/9 of the pixels is plenty for a percentile
    highlight = np.percentile(mosaic[:, ::3, ::3].reshape(n, -1), SETTINGS["highlight_percentile"], axis=1) + 1e-6
    target = np.exp(rng.normal(SETTINGS["exposure_log_mean"], SETTINGS["exposure_log_std"], size=n))
    gain = np.minimum(target / green_mean, V / highlight)
    return np.clip(mosaic * gain[:, None, None].astype(np.float32), 0, V)


def add_sensor_noise(rng, signal, profiles=None):
    """Signal (n, H, W) in DN above black -> (noisy, clean) 16-bit uint16 mosaics.

    profiles: None for the built-in phone calibration, else a list of noise profiles (see
    parse_noise_profile), one drawn per patch."""
    if profiles:
        return add_profile_noise(rng, signal, profiles)
    n = len(signal)
    lo, hi = SETTINGS["iso"]
    iso = np.exp(rng.uniform(np.log(lo), np.log(hi), size=n))[:, None, None]
    k = system_gain(iso)
    photons = rng.poisson(signal / k)  # the bulk of the generation time
    # float32 from here: integer DN up to 1023 and the x64 16-bit values are exact in it
    noisy = photons.astype(np.float32) * k.astype(np.float32)
    noisy += rng.standard_normal(signal.shape, dtype=np.float32) * np.sqrt(read_noise_var(iso)).astype(np.float32)
    noisy = np.clip(np.rint(noisy + BLACK), 0, WHITE)
    clean = signal.astype(np.float64) + BLACK
    return _to16(noisy), _to16(clean)


def _to16(x):
    return np.clip(np.rint(x * 64), 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------- a given camera's noise

def add_profile_noise(rng, signal, profiles):
    """The noise of a given camera instead of the phone's: on the [0, 1] scale between black and
    white, per-channel variance = a * x + b (the DNG NoiseProfile model), drawn as
    a * Poisson(x / a) + Normal(0, b). Quantised at 16 bits (the camera's own bit depth is not
    known), black 4096 and white 65472 like the rest of the set."""
    n, h, w = signal.shape
    pick = rng.integers(0, len(profiles), size=n)
    x = signal.astype(np.float64) / V
    noisy = np.empty_like(x)
    for i, p in enumerate(profiles):
        sel = np.flatnonzero(pick == i)
        if not len(sel):
            continue
        a = np.tile(np.asarray(p["a"], np.float64).reshape(2, 2), (h // 2, w // 2))
        b = np.tile(np.asarray(p["b"], np.float64).reshape(2, 2), (h // 2, w // 2))
        xs = x[sel]
        shot = np.where(a > 0, rng.poisson(xs / np.where(a > 0, a, 1)) * a, xs)
        noisy[sel] = shot + rng.standard_normal(xs.shape) * np.sqrt(b)
    noisy = np.clip(noisy * V + BLACK, 0, WHITE)
    return _to16(noisy), _to16(signal.astype(np.float64) + BLACK)


def profile_from_iso(iso):
    """The built-in phone calibration (10-bit DN) at one ISO as an (a, b) profile on [0, 1]."""
    return float(system_gain(iso)) / V, float(read_noise_var(iso)) / V ** 2


def parse_noise_profile(text):
    """`--noise-profile` -> {"source", "a": [4], "b": [4]} per RGGB site (R, Gr, Gb, B).

    Accepted: "a,b" (one pair for every channel); "iso:N" (the built-in phone calibration at
    ISO N); or a DNG whose NoiseProfile tag gives one pair, or one per colour plane (R, G, B).
    Other raw files are refused: LibRaw reports their ISO but holds no noise calibration for
    the camera, so a and b cannot be derived from them."""
    text = str(text)
    if text.lower().startswith("iso:"):
        try:
            iso = float(text[4:])
        except ValueError:
            raise MegfbError(f"--noise-profile {text}: expected iso:N with a number N") from None
        if not iso > 0:
            raise MegfbError(f"--noise-profile {text}: the ISO must be positive")
        a, b = profile_from_iso(iso)
        return {"source": f"phone calibration at ISO {iso:g}", "a": [a] * 4, "b": [b] * 4}
    if not os.path.exists(text) and "," in text:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise MegfbError(f"--noise-profile {text}: expected a,b (two numbers), iso:N or a DNG file") from None
        if len(values) != 2 or not all(np.isfinite(values)) or values[0] < 0 or values[1] < 0:
            raise MegfbError(f"--noise-profile {text}: expected two numbers a,b >= 0 (variance = a*x + b on [0, 1])")
        return {"source": "given", "a": [values[0]] * 4, "b": [values[1]] * 4}
    return noise_profile_of_file(text)


def noise_profile_of_file(path):
    """The NoiseProfile tag (51041) of a DNG, mapped to the RGGB sites."""
    if not os.path.isfile(path):
        raise MegfbError(f"--noise-profile {path}: file not found (expected a,b, iso:N or a DNG file)")
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            is_dng = bool(tif.pages) and 50706 in tif.pages[0].tags
            values, planes = None, (0, 1, 2)
            for page in [*tif.pages, *[sub for p in tif.pages for sub in (getattr(p, "pages", None) or [])]]:
                tag = page.tags.get(51041)
                if tag is not None and values is None:
                    values = [float(v) for v in np.ravel(tag.value)]
                plane = page.tags.get(50710)
                if plane is not None:
                    value = plane.value
                    planes = tuple(value) if isinstance(value, bytes) else tuple(int(v) for v in np.ravel(value))
    except Exception:  # noqa: BLE001 - tifffile's exceptions for a non-TIFF file vary
        is_dng, values = False, None
    if not is_dng:
        raise MegfbError(f"--noise-profile {path} is not a DNG: LibRaw reports a raw file's ISO but no noise "
                         "calibration, so a,b cannot be derived from it; give a,b or a DNG with a NoiseProfile")
    if values is None:
        raise MegfbError(f"--noise-profile {path}: this DNG has no NoiseProfile tag; give a,b instead")
    if len(values) == 2:
        values = values * 3
    if len(values) != 2 * len(planes) or len(planes) != 3 or sorted(planes) != [0, 1, 2]:
        raise MegfbError(f"--noise-profile {path}: NoiseProfile holds {len(values)} values; expected 2 or one "
                         "pair per R, G, B plane")
    if any(v < 0 or not np.isfinite(v) for v in values):
        raise MegfbError(f"--noise-profile {path}: NoiseProfile has negative or non-finite values")
    pair = {planes[i]: (values[2 * i], values[2 * i + 1]) for i in range(3)}  # colour -> (a, b)
    sites = [pair[c] for c in RGGB]
    return {"source": os.path.abspath(path), "a": [p[0] for p in sites], "b": [p[1] for p in sites]}


def _chunk(seed, stream, c, n, photos, profiles=None):
    rng = np.random.default_rng([seed, stream, c])
    rgb = clean_scenes(rng, n, photos)
    return add_sensor_noise(rng, expose(rng, unprocess_mosaic(rng, rgb)), profiles)


def generate(n, photos, seed, stream, threads=None, profiles=None):
    """Yield (noisy, clean) uint16 chunks of the n-patch set `stream` (0 train, 1 test).

    Chunk c is drawn from its own generator seeded by (seed, stream, c): the data are a pure
    function of the seed and the counts, whatever the number of threads. Threads pay off
    because the Poisson draws (most of the time) and OpenCV release the GIL.
    """
    threads = threads or min(2, os.cpu_count() or 1)
    starts = list(range(0, n, CHUNK))
    with ThreadPoolExecutor(threads) as pool:
        pending = collections.deque()
        for c, start in enumerate(starts):
            pending.append(pool.submit(_chunk, seed, stream, c, min(CHUNK, n - start), photos, profiles))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ------------------------------------------------------------------------ files + command

def read_note(data_dir):
    """The synthetic set's note, or None when there is none (or it is unreadable)."""
    path = os.path.join(data_dir, NOTE_NAME)
    try:
        with open(path) as f:
            note = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return note if isinstance(note, dict) and note.get("synthetic") is True else None


def is_generated(path, note):
    """True when `path` is the very file the note recorded (size, then mtime or hash)."""
    entry = ((note or {}).get("files") or {}).get(os.path.basename(path))
    if not isinstance(entry, dict):
        return False
    st = os.stat(path)
    if st.st_size != entry.get("bytes"):
        return False
    return st.st_mtime_ns == entry.get("mtime_ns") or sha256_file(path) == entry.get("sha256")


def classify(data_dir):
    """('none' | 'generated' | 'partial' | 'real', files): what data_dir holds.

    'real' lists the existing files that no note claims: those are never overwritten.
    """
    note = read_note(data_dir)
    present = [p for p in contest_paths(data_dir).values() if os.path.exists(p)]
    foreign = [p for p in present if not is_generated(p, note)]
    if foreign:
        return "real", foreign
    if not present:
        return "none", []
    return ("generated" if len(present) == len(FILE_NAMES) else "partial"), present


class _Moments:
    """Running per-packed-channel mean/std on [0, 1] of uint16 mosaics."""

    def __init__(self):
        self.n, self.s, self.s2 = 0, np.zeros(4), np.zeros(4)

    def add(self, x):
        p = pack_bayer(x).astype(np.float64) / 65535.0
        self.n += p[:, 0].size
        self.s += p.sum(axis=(0, 2, 3))
        self.s2 += (p * p).sum(axis=(0, 2, 3))

    def result(self):
        mean = self.s / self.n
        return mean, np.sqrt(np.maximum(self.s2 / self.n - mean ** 2, 0))


def synthesize(data_dir, n_train=2048, n_test=256, seed=0, progress=True, photos=None, profiles=None):
    """Write the four .bin files and the note, all or nothing. Returns a summary dict.

    photos: (train sources, test sources, manifest entries) from split_photos, or None for
    the scikit-image photos. profiles: noise profiles (parse_noise_profile) instead of the
    built-in phone calibration. Does not check what data_dir already holds; cmd_synth does that.
    """
    train_photos, test_photos, photo_entries = photos or (TRAIN_PHOTOS, TEST_PHOTOS, None)
    from tqdm import tqdm

    paths = contest_paths(data_dir)
    t0 = time.time()
    moments = _Moments()
    files = {}
    bar = tqdm(total=n_train + n_test, unit="patch", desc="synth", disable=None if progress else True)
    with contextlib.ExitStack() as stack:
        tmp = {key: stack.enter_context(atomic_output(p)) for key, p in paths.items()}
        for (noisy_key, clean_key), n, photos, stream in (
            (("train_input", "train_gt"), n_train, train_photos, 0),
            (("test_input", "test_gt"), n_test, test_photos, 1),
        ):
            hashes = [hashlib.sha256(), hashlib.sha256()]
            with open(tmp[noisy_key], "wb") as fn, open(tmp[clean_key], "wb") as fc:
                for noisy, clean in generate(n, photos, seed, stream, profiles=profiles):
                    write_patches(fn, noisy)
                    write_patches(fc, clean)
                    hashes[0].update(noisy.astype("<u2", copy=False).tobytes())
                    hashes[1].update(clean.astype("<u2", copy=False).tobytes())
                    if stream == 0:
                        moments.add(noisy)
                    bar.update(len(noisy))
            for key, h in zip((noisy_key, clean_key), hashes):
                st = os.stat(tmp[key])  # os.replace keeps the mtime, so the note can record it now
                files[FILE_NAMES[key]] = {"bytes": st.st_size, "patches": st.st_size // (PATCH * PATCH * 2),
                                          "sha256": h.hexdigest(), "mtime_ns": st.st_mtime_ns}
        bar.close()
        mean, std = moments.result()
        note = {
            "synthetic": True,
            "generator": "megfb data synth (shared/spec/synthetic-raw.md)",
            "seed": seed,
            "counts": {"train": n_train, "test": n_test},
            "photos": ({"source": "scikit-image", "train": list(TRAIN_PHOTOS), "test": list(TEST_PHOTOS)}
                       if photo_entries is None else {"source": "--photos", "files": photo_entries}),
            "settings": dict(SETTINGS),
            "sensor": {"model": "OPPO Reno 10x (PMRID)", "black_dn10": BLACK, "white_dn10": WHITE, "scale_to_16bit": 64},
            "noise": ({"model": "phone calibration (PMRID), ISO log-uniform", "iso": list(SETTINGS["iso"])}
                      if not profiles else
                      {"model": "variance = a*x + b on [0, 1] (DNG NoiseProfile), one profile drawn per patch",
                       "profiles": [{"source": p["source"], "a_rggb": [float(v) for v in p["a"]],
                                     "b_rggb": [float(v) for v in p["b"]]} for p in profiles]}),
            "train_input_mean": [round(float(v), 5) for v in mean],
            "train_input_std": [round(float(v), 5) for v in std],
            "seconds": round(time.time() - t0, 1),
            "files": files,
        }
        # Entered last, so renamed first: the note describing the new files is in place
        # before they replace anything.
        with atomic_output(os.path.join(data_dir, NOTE_NAME)) as note_tmp:
            with open(note_tmp, "w") as f:
                yaml.safe_dump(note, f, sort_keys=False, default_flow_style=None)
    return note


def check_free_space(data_dir, n_train, n_test, margin=64 << 20):
    """Refuse before writing anything when the four files would not fit (plus a margin)."""
    import shutil

    need = (2 * n_train + 2 * n_test) * PATCH * PATCH * 2
    probe = os.path.abspath(data_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise MegfbError(f"--data-dir {data_dir}: {probe} is a file, not a folder")
    free = shutil.disk_usage(probe).free
    if need + margin > free:
        raise MegfbError(f"{n_train} training pairs and {n_test} test patches need {need / 2 ** 30:.1f} GiB in "
                         f"{data_dir}, but only {free / 2 ** 30:.1f} GiB are free; ask for fewer (--train/--test)")


def cmd_synth(args):
    """`megfb data synth`: generate the synthetic set unless real contest files are present."""
    data_dir = args.data_dir
    state, found = classify(data_dir)
    if state == "real":
        names = ", ".join(os.path.basename(p) for p in found)
        if args.force:
            raise MegfbError(f"refusing to overwrite {os.path.join(data_dir, os.path.basename(found[0]))}: "
                             f"{names} in {data_dir} are not a set generated by `megfb data synth` "
                             "(--force only regenerates synthetic sets)")
        print(f"real contest files found in {data_dir} ({names}); nothing generated")
        return 0
    if state == "generated" and not args.force:
        note = read_note(data_dir)
        c = note.get("counts", {})
        print(f"synthetic set already in {data_dir} (seed {note.get('seed')}, {c.get('train')} train / "
              f"{c.get('test')} test patches); use --force to regenerate it")
        return 0
    check_free_space(data_dir, args.train, args.test)
    photos = split_photos(args.photos) if args.photos else None  # every photo checked first
    profiles = [parse_noise_profile(p) for p in (getattr(args, "noise_profile", None) or [])]
    if args.procedural is not None:
        SETTINGS["procedural_fraction"] = args.procedural
    note = synthesize(data_dir, args.train, args.test, args.seed, photos=photos, profiles=profiles)
    fmt = lambda v: "[" + ", ".join(f"{x:.4f}" for x in v) + "]"  # noqa: E731
    print(f"synthetic set written to {data_dir}: {args.train} train pairs, {args.test} test patches, "
          f"seed {args.seed}, {note['seconds']:.1f} s")
    print(f"  train input mean {fmt(note['train_input_mean'])}  published {fmt(PUBLISHED_MEAN)}")
    print(f"  train input std  {fmt(note['train_input_std'])}  published {fmt(PUBLISHED_STD)}")
    for p in profiles:
        print(f"  noise profile ({p['source']}): a {p['a'][0]:.3g}.., b {p['b'][0]:.3g}.. (R, Gr, Gb, B in {NOTE_NAME})")
    if photos:
        print(f"  clean content: {len(photos[0])} photos for the training file, {len(photos[1])} for the "
              f"test file, {SETTINGS['procedural_fraction']:.0%} procedural scenes (listed in {NOTE_NAME})")
    return 0
