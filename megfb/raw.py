"""Raw photographs in and out: reading Bayer mosaics, their colour phase and levels, writing results.

What `megfb denoise` reads (`read_mosaic`):
- camera raw files through rawpy (LibRaw): DNG, CR2/CR3, NEF, ARW, ORF, RW2, RAF (Bayer
  models), ...; the visible area of the sensor, its 2x2 colour pattern, per-site black levels
  and white level all come from LibRaw;
- plain mosaics: 16-bit TIFF or PNG, or a 2-D integer `.npy`, with the levels and pattern
  given by the caller (`--pattern`, `--black` one value or four in the 2x2 cell's raster order,
  `--white`).
X-Trans and Foveon sensors, demosaiced (3-channel) images, 8-bit images and files that are
truncated or unreadable are refused with one sentence naming the file.

The model's domain. A checkpoint was trained on 16-bit mosaics with a black level B and a
white level W of its own (the contest convention: B = 4096, W = 65472, i.e. 64 and 1023 at 10
bits scaled x64; a trainer checkpoint records its data's levels). A file with per-site black
b and white w is mapped linearly so that its black lands on B and its white on W:
    m = (B + (x - b) / (w - b) * (W - B)) / 65535,   clipped to [0, 1] like the contest inputs,
keeping values below black (read noise) as they are. Predictions go back by the inverse map,
rounded and clipped to [0, 65535]; pixels at or above the white level in the input (clipped
highlights) are returned unchanged. The noise level a camera gives is left as it is: the model
is blind to it.

Colour phase. The model only ever saw RGGB. A mosaic whose 2x2 cell at the origin is BGGR,
GRBG or GBRG is padded by one row and/or column at the top/left with `np.pad(mode="reflect")`,
which keeps every site's colour (a reflected row -k has the parity of row k); the padding is
cropped away afterwards, so the output pixel grid is exactly the input's.
"""
import contextlib
import io
import os
import sys

import numpy as np

from .atomic import atomic_output
from .errors import MegfbError

PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
PLAIN_EXTENSIONS = (".tif", ".tiff", ".png", ".npy")
MIN_SIDE = 4

# The contest's value range (16-bit; shared/spec/synthetic-raw.md: black 64 and white 1023 at
# 10 bits, scaled x64), used for a plain state dict such as the published weights.
MODEL_BLACK = 4096.0
MODEL_WHITE = 65472.0
FULL_SCALE = 65535.0


class Mosaic:
    """A Bayer mosaic and what is needed to map it: pattern of the 2x2 cell at the origin,
    per-site black levels (2x2, raster order) and the white level, all in the file's units."""

    def __init__(self, path, kind, data, pattern, black, white, meta=None):
        self.path, self.kind, self.data = path, kind, data
        self.pattern, self.black, self.white = pattern, np.asarray(black, np.float64).reshape(2, 2), float(white)
        self.meta = meta or {}

    @property
    def shape(self):
        return self.data.shape

    def describe(self):
        b = self.black.ravel()
        black = f"{b[0]:g}" if np.all(b == b[0]) else "/".join(f"{v:g}" for v in b)
        return f"{self.shape[1]}x{self.shape[0]} {self.pattern}, black {black}, white {self.white:g}"


# ------------------------------------------------------------------------------------ reading

@contextlib.contextmanager
def _quiet_stderr():
    """LibRaw prints its own complaints (e.g. "Unexpected end of file") on file descriptor 2;
    our error already says it in one sentence."""
    fd = 2
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def parse_black(text):
    """"512" or "512,520,530,540" (the 2x2 cell in raster order) -> 2x2 array."""
    parts = [p for p in str(text).split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected a number or four comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, 4) or any(v < 0 or not np.isfinite(v) for v in values):
        raise ValueError(f"expected one black level or four (one per site of the 2x2 cell), all >= 0, got {text!r}")
    return np.array(values * (4 // len(values)), dtype=np.float64).reshape(2, 2)


def is_dng_tiff(path):
    """True when a .tif/.tiff file is a DNG (then LibRaw reads it, with its metadata)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return any(50706 in page.tags for page in tif.pages[:1])
    except Exception:  # noqa: BLE001 - not a TIFF at all: the plain reader says so
        return False


def _pattern_of(raw, path):
    """The 2x2 pattern string of the visible area's origin from LibRaw's colour indices."""
    pattern = raw.raw_pattern
    desc = raw.color_desc.decode("ascii", "replace")
    if pattern is None or pattern.shape != (2, 2):
        shape = "none" if pattern is None else "x".join(map(str, pattern.shape))
        raise MegfbError(f"{path} is not a Bayer raw file (colour filter pattern {shape}, e.g. X-Trans "
                         "or Foveon): megfb denoises 2x2 Bayer mosaics only")
    colours = raw.raw_colors_visible[:2, :2]
    letters = "".join(desc[int(c)] if int(c) < len(desc) else "?" for c in colours.ravel())
    if letters not in PATTERNS:
        raise MegfbError(f"{path} has the colour filter pattern {letters} ({desc}), not an RGB Bayer pattern")
    return letters, colours


def read_camera_raw(path):
    """A camera raw file through LibRaw -> Mosaic (the visible area, uint16)."""
    import rawpy

    try:
        with _quiet_stderr(), rawpy.imread(path) as raw:
            if raw.raw_type != rawpy.RawType.Flat:
                raise MegfbError(f"{path} holds an already demosaiced (linear RGB) image, not a Bayer mosaic")
            pattern, colours = _pattern_of(raw, path)
            levels = np.asarray(raw.black_level_per_channel, np.float64)
            black = levels[colours]
            white = float(raw.white_level)
            data = np.array(raw.raw_image_visible, dtype=np.uint16)
            meta = {"camera_whitebalance": list(raw.camera_whitebalance), "iso": float(raw.other.iso_speed)}
    except rawpy.LibRawFileUnsupportedError:
        raise MegfbError(f"{path} is not a raw file LibRaw can read (unsupported format)") from None
    except (rawpy.LibRawError, OSError) as exc:
        what = "truncated or unreadable" if "Input/output" in str(exc) or isinstance(exc, OSError) else "unreadable"
        raise MegfbError(f"{path} is {what}: LibRaw could not decode it ({type(exc).__name__})") from None
    if white <= black.max():
        raise MegfbError(f"{path}: white level {white:g} is not above the black level {black.max():g}")
    return Mosaic(path, "raw", data, pattern, black, white, meta)


def _read_plain_tiff(path):
    """The first page of a TIFF, after checking its pixel data lies inside the file (tifffile
    would silently return a short or empty array for a truncated one)."""
    import tifffile

    size = os.path.getsize(path)
    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ValueError("no image in it")
        page = tif.pages[0]
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
        if not ends or max(ends) > size or 0 in page.databytecounts:
            raise ValueError("pixel data missing")
        return page.asarray()


def read_plain(path, pattern=None, black=None, white=None):
    """A 16-bit TIFF/PNG or an integer .npy mosaic -> Mosaic, levels from the caller."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        elif ext == ".png":
            import cv2

            data = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            if data is None:
                raise ValueError("OpenCV could not decode it")
        else:
            data = _read_plain_tiff(path)
    except MegfbError:
        raise
    except Exception as exc:  # noqa: BLE001 - every reader has its own exception zoo
        raise MegfbError(f"{path} is truncated or unreadable ({type(exc).__name__})") from None
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 2:
        raise MegfbError(f"{path} is a {'x'.join(map(str, data.shape))} image, not a 2-D Bayer mosaic "
                         "(already demosaiced images cannot be denoised as raw)")
    if data.dtype.kind not in "ui" or data.dtype.itemsize > 2 or (data.dtype.kind == "i" and data.min() < 0):
        raise MegfbError(f"{path} holds {data.dtype} values; a raw mosaic must be unsigned 16-bit integers")
    if data.dtype.itemsize == 1:
        raise MegfbError(f"{path} is an 8-bit image, not a raw mosaic (16-bit TIFF/PNG or .npy expected)")
    if pattern is None:
        raise MegfbError(f"{path} is a plain mosaic: say its colour pattern with --pattern ({'|'.join(PATTERNS)})")
    black = np.zeros((2, 2)) if black is None else np.asarray(black, np.float64).reshape(2, 2)
    white = float(65535 if white is None else white)
    if white <= black.max():
        raise MegfbError(f"{path}: white level {white:g} is not above the black level {black.max():g}")
    return Mosaic(path, ext.lstrip(".").replace("tiff", "tif"), np.asarray(data, dtype=np.uint16), pattern, black, white)


def read_mosaic(path, pattern=None, black=None, white=None):
    """Any supported raw input -> Mosaic; MegfbError (one sentence naming the file) otherwise.

    pattern/black/white describe plain mosaics; for a camera raw file they override what
    LibRaw reports when given.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MegfbError(f"file not found: {path}")
    if not os.path.isfile(path):
        raise MegfbError(f"{path} is not a file")
    if os.path.getsize(path) == 0:
        raise MegfbError(f"{path} is empty (0 bytes)")
    ext = os.path.splitext(path)[1].lower()
    if ext in PLAIN_EXTENSIONS and not (ext in (".tif", ".tiff") and is_dng_tiff(path)):
        m = read_plain(path, pattern, black, white)
    else:
        m = read_camera_raw(path)
        if pattern is not None and pattern != m.pattern:
            raise MegfbError(f"{path}: --pattern {pattern} contradicts the file's own pattern {m.pattern}")
        if black is not None:
            m.black = np.asarray(black, np.float64).reshape(2, 2)
        if white is not None:
            m.white = float(white)
        if m.white <= m.black.max():
            raise MegfbError(f"{path}: white level {m.white:g} is not above the black level {m.black.max():g}")
    h, w = m.shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise MegfbError(f"{path} is {w}x{h} pixels; a mosaic needs at least {MIN_SIDE}x{MIN_SIDE}")
    return m


# ------------------------------------------------------------------------- phase and levels

def rggb_offset(pattern):
    """(dy, dx) of the first red site: where an RGGB cell starts in a mosaic of this pattern."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown Bayer pattern {pattern!r}; expected one of {', '.join(PATTERNS)}")
    i = pattern.index("R")
    return i // 2, i % 2


def to_rggb(x, pattern):
    """(H, W) mosaic -> (padded, (dy, dx)): an even-sized RGGB mosaic holding x at [dy:dy+H, dx:dx+W].

    Reflection padding keeps each site's colour (a reflected row -k has row k's parity)."""
    dy, dx = rggb_offset(pattern)
    h, w = x.shape
    pad_bottom, pad_right = (h + dy) % 2, (w + dx) % 2
    if dy or dx or pad_bottom or pad_right:
        x = np.pad(x, ((dy, pad_bottom), (dx, pad_right)), mode="reflect")
    return x, (dy, dx)


def from_rggb(y, offset, shape):
    """Inverse of to_rggb: crop the input's own grid back out."""
    dy, dx = offset
    return y[dy:dy + shape[0], dx:dx + shape[1]]


def _site_map(cell, shape):
    """A 2x2 per-site value tiled over an (H, W) grid (origin = the cell's top-left)."""
    h, w = shape
    return np.tile(np.asarray(cell, np.float32), ((h + 1) // 2, (w + 1) // 2))[:h, :w]


def to_model_domain(m, model_black=MODEL_BLACK, model_white=MODEL_WHITE):
    """Mosaic -> float32 (H, W) on [0, 1] in the checkpoint's range (see the module docstring)."""
    black = _site_map(m.black, m.shape)
    scale = np.float32(model_white - model_black) / (np.float32(m.white) - black)
    x = (m.data.astype(np.float32) - black) * scale + np.float32(model_black)
    return np.clip(x / np.float32(FULL_SCALE), 0.0, 1.0, out=x)


def from_model_domain(y, m, model_black=MODEL_BLACK, model_white=MODEL_WHITE):
    """float (H, W) predictions on [0, 1] -> uint16 in the file's own scale and black level."""
    black = _site_map(m.black, m.shape)
    scale = (np.float32(m.white) - black) / np.float32(model_white - model_black)
    x = (np.asarray(y, np.float32) * np.float32(FULL_SCALE) - np.float32(model_black)) * scale + black
    out = np.clip(np.rint(x), 0, 65535).astype(np.uint16)
    clipped = m.data >= m.white  # saturated highlights carry no noise to remove
    out[clipped] = m.data[clipped]
    return out


# ------------------------------------------------------------------------------------ writing

def write_tiff(path, mosaic):
    """uint16 (H, W) mosaic -> a plain 16-bit greyscale TIFF, atomically."""
    import tifffile

    with atomic_output(path) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(mosaic, np.uint16), photometric="minisblack", metadata=None)


def write_npy(path, mosaic):
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(mosaic, np.uint16))


# DNG tags (tag, tifffile type code) carried from a DNG input to the denoised DNG: identity,
# orientation and everything LibRaw and raw converters use to develop the mosaic (colour
# matrices, calibration, white balance, baseline exposure, crop, lens-shading opcodes).
_TYPE_CODES = {1: "B", 2: "s", 3: "H", 4: "I", 5: "2I", 7: "B", 9: "i", 10: "2i", 11: "f", 12: "d", 16: "Q"}
KEPT_IFD0_TAGS = {
    271: "Make", 272: "Model", 274: "Orientation", 306: "DateTime", 50706: "DNGVersion",
    50707: "DNGBackwardVersion", 50708: "UniqueCameraModel", 50709: "LocalizedCameraModel",
    50721: "ColorMatrix1", 50722: "ColorMatrix2", 50723: "CameraCalibration1", 50724: "CameraCalibration2",
    50725: "ReductionMatrix1", 50726: "ReductionMatrix2", 50727: "AnalogBalance", 50728: "AsShotNeutral",
    50729: "AsShotWhiteXY", 50730: "BaselineExposure", 50731: "BaselineNoise", 50732: "BaselineSharpness",
    50734: "LinearResponseLimit", 50735: "CameraSerialNumber", 50778: "CalibrationIlluminant1",
    50779: "CalibrationIlluminant2", 50936: "ProfileName", 50964: "ForwardMatrix1", 50965: "ForwardMatrix2",
}
KEPT_RAW_TAGS = {
    50711: "CFALayout", 50718: "DefaultScale", 50719: "DefaultCropOrigin", 50720: "DefaultCropSize",
    50733: "BayerGreenSplit", 50738: "AntiAliasStrength", 50780: "BestQualityScale",
    51009: "OpcodeList2", 51022: "OpcodeList3",
}
CFA_CODES = {"R": 0, "G": 1, "B": 2}


def dng_tags(pattern, black, white, extra=()):
    """The CFA, level and version tags of a minimal Bayer DNG (tifffile `extratags`)."""
    black = np.asarray(black, np.float64).reshape(2, 2)
    return [
        (50706, "B", 4, (1, 4, 0, 0), True),
        (50707, "B", 4, (1, 1, 0, 0), True),
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, tuple(CFA_CODES[c] for c in pattern), True),  # CFAPattern
        (50710, "B", 3, (0, 1, 2), True),  # CFAPlaneColor
        (50713, "H", 2, (2, 2), True),  # BlackLevelRepeatDim
        # BlackLevel as RATIONAL (the DNG spec allows SHORT/LONG/RATIONAL): fractional levels survive
        (50714, "2I", 4, tuple(v for b in black.ravel() for v in (int(round(b * 256)), 256)), True),
        (50717, "I", 1, (int(round(white)),), True),  # WhiteLevel
        *extra,
    ]


def write_dng(path, mosaic, pattern, black, white, extra=()):
    """A minimal uncompressed Bayer DNG (16-bit), atomically; `extra` tags are added as given."""
    with atomic_output(path) as tmp:
        _write_dng_to(tmp, mosaic, pattern, black, white, extra)


def _write_dng_to(target, mosaic, pattern, black, white, extra=()):
    import tifffile

    tags = dng_tags(pattern, black, white, extra)
    given = {t[0] for t in extra}
    tags = [t for t in tags if t[0] not in given or t in extra]
    tifffile.imwrite(target, np.ascontiguousarray(mosaic, np.uint16), photometric="CFA", compression=None,
                     subfiletype=0, extratags=tags, metadata=None, software="megfb")


def dng_bytes(mosaic, pattern, black, white, extra=()):
    """The same DNG in memory (LibRaw develops plain mosaics for the preview from it)."""
    buf = io.BytesIO()
    _write_dng_to(buf, mosaic, pattern, black, white, extra)
    return buf.getvalue()


def _raw_ifd(tif):
    """The page holding the CFA data of a DNG (IFD0 or one of its SubIFDs)."""
    pages = list(tif.pages)
    for page in pages:
        pages.extend(getattr(page, "pages", None) or [])
    for page in pages:
        if page.photometric == 32803 and page.tags.get(254) is not None and page.tags[254].value == 0:
            return page
    for page in pages:
        if page.photometric == 32803:
            return page
    return None


def carried_dng_tags(source):
    """Tags of a DNG input worth keeping in the denoised DNG, as tifffile `extratags`."""
    import tifffile

    extra = []
    with tifffile.TiffFile(source) as tif:
        ifd0 = tif.pages[0]
        raw_ifd = _raw_ifd(tif) or ifd0
        for page, kept in ((ifd0, KEPT_IFD0_TAGS), (raw_ifd, KEPT_RAW_TAGS)):
            for code in kept:
                tag = page.tags.get(code)
                if tag is None or tag.dtype not in _TYPE_CODES:
                    continue
                value = tag.value
                if isinstance(value, bytes):
                    extra.append((code, "B", len(value), value, True))
                elif isinstance(value, str):
                    extra.append((code, "s", 0, value, True))
                else:
                    flat = np.asarray(value).ravel().tolist() if not np.isscalar(value) else [value]
                    if hasattr(value, "value"):  # an enum
                        flat = [int(value)]
                    count = len(flat) // 2 if _TYPE_CODES[tag.dtype].startswith("2") else len(flat)
                    extra.append((code, _TYPE_CODES[tag.dtype], count, tuple(flat), True))
    return extra


def write_denoised_dng(path, source, mosaic, m):
    """The denoised visible area as a DNG beside a DNG input, with the input's colour metadata.

    Written anew with tifffile (uncompressed 16-bit CFA): the tags in KEPT_IFD0_TAGS and
    KEPT_RAW_TAGS are copied, the pattern and levels are LibRaw's (so linearisation tables and
    ActiveArea are not: the data is the already linearised visible area). Not kept: EXIF
    (exposure, lens, GPS), maker notes, XMP, the embedded previews/thumbnails, NoiseProfile
    (it described the noise that was removed) and OpcodeList1."""
    extra = carried_dng_tags(source)
    write_dng(path, mosaic, m.pattern, m.black, m.white, extra)


# ------------------------------------------------------------------------------------ preview

def develop(raw_source, mosaic):
    """LibRaw's own development (camera white balance and colour matrix, AHD demosaic) of
    `mosaic` in place of the file's visible area -> linear uint16 RGB (H, W, 3).

    raw_source: a path or DNG bytes that LibRaw reads for everything but the pixel values."""
    import rawpy

    src = io.BytesIO(raw_source) if isinstance(raw_source, (bytes, bytearray)) else raw_source
    with _quiet_stderr(), rawpy.imread(src) as raw:
        raw.raw_image_visible[...] = mosaic
        return raw.postprocess(use_camera_wb=True, no_auto_bright=True, output_bps=16, gamma=(1, 1),
                               user_flip=0)


def _tone(rgb, exposure):
    x = np.clip(rgb * exposure, 0, 1)
    srgb = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
    return np.round(srgb * 255).astype(np.uint8)


def preview_panels(rgb16, width=480, crop=480):
    """A developed frame -> (the frame downscaled to `width`, a 100% centre crop of `crop`
    pixels), both linear float32 on [0, 1]; only these small parts are kept of a large frame."""
    import cv2

    h, w = rgb16.shape[:2]
    scale = min(1.0, width / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(rgb16, size, interpolation=cv2.INTER_AREA).astype(np.float32) / np.float32(65535)
    ch, cw = min(crop, h), min(crop, w)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return small, rgb16[y0:y0 + ch, x0:x0 + cw].astype(np.float32) / np.float32(65535)


def preview_image(before, after):
    """(frame, crop) panels of the original and the denoised image -> one BGR uint8 picture:
    original | denoised above their 100% crops, one exposure (from the original) for all."""
    import cv2

    exposure = 0.9 / max(float(np.percentile(before[0], 99.5)), 1e-6)
    rows = [[_tone(before[k], exposure), _tone(after[k], exposure)] for k in (0, 1)]
    gap, label_h = 8, 28
    canvas_w = max(2 * r[0].shape[1] + gap for r in rows)
    canvas = np.full((sum(label_h + r[0].shape[0] for r in rows) + gap, canvas_w, 3), 24, np.uint8)
    y = 0
    for k, row in enumerate(rows):
        for i, img in enumerate(row):
            x = i * (img.shape[1] + gap)
            canvas[y + label_h:y + label_h + img.shape[0], x:x + img.shape[1]] = img
            label = ("original", "denoised")[i] + (" (100% crop)" if k else "")
            cv2.putText(canvas, label, (x + 4, y + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
        y += label_h + row[0].shape[0] + gap
    return canvas[..., ::-1]  # RGB -> BGR for OpenCV


def write_preview(path, m, denoised):
    """Develop the original and the denoised mosaic with LibRaw and write the comparison PNG."""
    import cv2

    if m.kind == "raw":
        source = m.path
    else:  # a plain mosaic has no colour metadata: neutral white balance, identity matrix
        source = dng_bytes(m.data, m.pattern, m.black, m.white)
    image = preview_image(preview_panels(develop(source, m.data)), preview_panels(develop(source, denoised)))
    ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise MegfbError(f"could not encode the preview {path}")
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(png.tobytes())
