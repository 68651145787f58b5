"""megfb.raw: reading real raw files (DNGs made here, read back by LibRaw), the Bayer phase,
the black/white level mapping, bad inputs, and the written TIFF/DNG/preview."""
import os

import numpy as np
import pytest
import rawpy
import tifffile
import cv2

from megfb.errors import MegfbError
from megfb.io import pack_bayer
from megfb.raw import (MODEL_BLACK, MODEL_WHITE, PATTERNS, Mosaic, from_model_domain, from_rggb, parse_black,
                       read_mosaic, rggb_offset, to_model_domain, to_rggb, write_denoised_dng, write_dng,
                       write_preview)

from raw_helpers import bayer_scene, dng_extra, make_dng

BLACK4 = [512, 520, 530, 540]


def colour_codes(h, w, pattern):
    """A mosaic whose every site holds its colour's code: R=1, G=2, B=3."""
    code = {"R": 1, "G": 2, "B": 3}
    cell = np.array([code[c] for c in pattern]).reshape(2, 2)
    return np.tile(cell, ((h + 1) // 2, (w + 1) // 2))[:h, :w]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_dng_round_trip_through_libraw(tmp_path, pattern):
    path = str(tmp_path / f"{pattern}.dng")
    _, noisy = make_dng(path, 37, 54, pattern, black=BLACK4, white=4095)
    m = read_mosaic(path)
    assert m.kind == "raw" and m.pattern == pattern
    assert np.array_equal(m.data, noisy)
    assert m.black.ravel().tolist() == BLACK4  # per site, raster order, as written
    assert m.white == 4095
    assert m.meta["camera_whitebalance"][:3] == pytest.approx([1 / 0.55, 1.0, 1 / 0.7], rel=1e-3)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", [(6, 8), (7, 9), (10, 5)])
def test_phase_makes_rggb_and_keeps_the_grid(pattern, shape):
    x = colour_codes(*shape, pattern)
    padded, offset = to_rggb(x, pattern)
    assert padded.shape[0] % 2 == 0 and padded.shape[1] % 2 == 0
    planes = pack_bayer(padded)
    for channel, code in enumerate((1, 2, 2, 3)):  # R, Gr, Gb, B
        assert np.all(planes[channel] == code)
    assert offset == rggb_offset(pattern)
    assert np.array_equal(from_rggb(padded, offset, shape), x)


def test_level_mapping_hand_computed():
    data = np.array([[512, 4095], [300, 2303]], np.uint16)
    m = Mosaic("t", "npy", data, "RGGB", np.full((2, 2), 512.0), 4095)
    y = to_model_domain(m)
    assert y[0, 0] == pytest.approx(MODEL_BLACK / 65535)  # black -> the model's black
    assert y[0, 1] == pytest.approx(MODEL_WHITE / 65535)  # white -> the model's white
    # below black stays below (read noise is kept): 4096 + (300-512)/3583*61376
    assert y[1, 0] == pytest.approx((4096 + (300 - 512) / 3583 * 61376) / 65535, rel=1e-5)
    assert y[1, 1] == pytest.approx((4096 + (2303 - 512) / 3583 * 61376) / 65535, rel=1e-5)


@pytest.mark.parametrize("black,white", [(0, 65535), (512, 16383), (BLACK4, 4095), (64, 1023)])
def test_level_mapping_round_trip(black, white):
    _, noisy = bayer_scene(30, 42, "GRBG", black, white, noise=0.05, seed=3)
    m = Mosaic("t", "npy", noisy, "GRBG", parse_black(",".join(map(str, np.ravel(black)))), white)
    back = from_model_domain(to_model_domain(m), m)
    keep = to_model_domain(m) > 0  # inputs far below black clip at 0 like the contest's
    assert np.abs(back.astype(int) - noisy.astype(int))[keep].max() <= 1


def test_saturated_pixels_are_kept():
    data = np.array([[100, 4095], [5000, 2000]], np.uint16)
    m = Mosaic("t", "npy", data, "RGGB", np.zeros((2, 2)), 4095)
    out = from_model_domain(np.full((2, 2), 0.01, np.float32), m)
    assert out[0, 1] == 4095 and out[1, 0] == 5000  # at/above white: the input's
    assert out[0, 0] != 100


def test_parse_black():
    assert parse_black("64").ravel().tolist() == [64] * 4
    assert parse_black("1,2,3,4").tolist() == [[1, 2], [3, 4]]
    for bad in ("1,2", "x", "-1"):
        with pytest.raises(ValueError):
            parse_black(bad)


@pytest.mark.parametrize("ext", [".tif", ".png", ".npy"])
def test_plain_mosaics(tmp_path, ext):
    _, noisy = bayer_scene(20, 34, "BGGR", 256, 4095)
    path = str(tmp_path / ("m" + ext))
    if ext == ".tif":
        tifffile.imwrite(path, noisy)
    elif ext == ".png":
        cv2.imwrite(path, noisy)
    else:
        np.save(path, noisy)
    m = read_mosaic(path, "BGGR", parse_black("256"), 4095)
    assert np.array_equal(m.data, noisy) and m.pattern == "BGGR" and m.white == 4095
    with pytest.raises(MegfbError, match="--pattern"):
        read_mosaic(path)


def _bad_files(tmp_path):
    """{name: (path, words the error must contain)} for every kind of input we refuse."""
    d, bad = tmp_path, {}
    base = dng_extra()
    xtrans = (1, 1, 0, 1, 1, 2, 1, 1, 2, 1, 1, 0, 2, 0, 1, 0, 2, 1, 1, 1, 2, 1, 1, 0, 1, 1, 0, 1, 1, 2, 0, 2, 1, 2, 0, 1)
    tifffile.imwrite(d / "xtrans.dng", np.full((48, 48), 600, np.uint16), photometric="CFA", metadata=None,
                     extratags=base + [(50706, "B", 4, (1, 4, 0, 0), True), (50717, "I", 1, (4095,), True),
                                       (33421, "H", 2, (6, 6), True), (33422, "B", 36, xtrans, True)])
    bad["xtrans"] = (d / "xtrans.dng", "not a Bayer raw file")
    tifffile.imwrite(d / "linear.dng", np.full((32, 32, 3), 600, np.uint16), photometric=34892, metadata=None,
                     extratags=base + [(50706, "B", 4, (1, 4, 0, 0), True), (50717, "I", 1, (4095,), True)])
    bad["linear"] = (d / "linear.dng", "demosaiced")
    make_dng(str(d / "full.dng"), 64, 64)
    blob = (d / "full.dng").read_bytes()
    (d / "truncated.dng").write_bytes(blob[:len(blob) // 2])
    bad["truncated"] = (d / "truncated.dng", "truncated")
    (d / "garbage.nef").write_bytes(bytes(range(256)) * 20)
    bad["garbage"] = (d / "garbage.nef", "not a raw file")
    (d / "empty.dng").write_bytes(b"")
    bad["empty"] = (d / "empty.dng", "empty")
    bad["missing"] = (d / "missing.cr2", "not found")
    tifffile.imwrite(d / "rgb.tif", np.zeros((16, 16, 3), np.uint16))
    bad["rgb"] = (d / "rgb.tif", "demosaiced")
    cv2.imwrite(str(d / "eight.png"), np.zeros((16, 16), np.uint8))
    bad["8-bit"] = (d / "eight.png", "8-bit")
    np.save(d / "float.npy", np.zeros((16, 16), np.float32))
    bad["float"] = (d / "float.npy", "float32")
    np.save(d / "cut.npy", np.zeros((64, 64), np.uint16))
    (d / "cut.npy").write_bytes((d / "cut.npy").read_bytes()[:3000])
    bad["truncated npy"] = (d / "cut.npy", "truncated")
    (d / "cut.tif").write_bytes(b"II*\0" + b"\0" * 10)
    bad["truncated tif"] = (d / "cut.tif", "truncated")
    np.save(d / "tiny.npy", np.zeros((2, 8), np.uint16))
    bad["too small"] = (d / "tiny.npy", "at least")
    return bad


def test_bad_inputs_one_sentence_naming_the_file(tmp_path):
    for name, (path, words) in _bad_files(tmp_path).items():
        with pytest.raises(MegfbError) as info:
            read_mosaic(str(path), pattern=None if "dng" in str(path) or "nef" in str(path) else "RGGB")
        message = str(info.value)
        assert os.path.basename(str(path)) in message, name
        assert words in message, (name, message)
        assert "\n" not in message


def test_levels_that_make_no_sense(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((8, 8), np.uint16))
    with pytest.raises(MegfbError, match="m.npy: white level 100 is not above the black level 200"):
        read_mosaic(str(tmp_path / "m.npy"), "RGGB", parse_black("200"), 100)


def test_denoised_dng_keeps_the_metadata_libraw_needs(tmp_path):
    src = str(tmp_path / "in.dng")
    make_dng(src, 40, 60, "GBRG", black=BLACK4, white=4095, noise_profile=(1e-4, 1e-6))
    m = read_mosaic(src)
    out = (m.data // 2 + 300).astype(np.uint16)
    write_denoised_dng(str(tmp_path / "out.dng"), src, out, m)
    back = read_mosaic(str(tmp_path / "out.dng"))
    assert np.array_equal(back.data, out)
    assert back.pattern == "GBRG" and back.white == 4095 and back.black.ravel().tolist() == BLACK4
    assert back.meta["camera_whitebalance"] == pytest.approx(m.meta["camera_whitebalance"])
    with tifffile.TiffFile(str(tmp_path / "out.dng")) as tif:
        tags = tif.pages[0].tags
        assert tags[272].value == "synthetic test camera" and 50721 in tags and 50728 in tags
        assert 51041 not in tags  # the noise profile described the noise that was removed
    with rawpy.imread(str(tmp_path / "out.dng")) as raw:
        assert raw.color_matrix.shape == (3, 4)


def test_preview_is_developed_side_by_side(tmp_path):
    src = str(tmp_path / "in.dng")
    make_dng(src, 64, 80, "RGGB")
    m = read_mosaic(src)
    write_preview(str(tmp_path / "p.png"), m, m.data)
    img = cv2.imread(str(tmp_path / "p.png"))
    assert img.shape[1] >= 2 * 80 and img.shape[0] >= 2 * 64  # two frames above two 100% crops
    # a plain mosaic is developed from an in-memory DNG with its pattern and levels
    plain = Mosaic(str(tmp_path / "x.npy"), "npy", m.data, "RGGB", m.black, m.white)
    write_preview(str(tmp_path / "q.png"), plain, m.data)
    assert cv2.imread(str(tmp_path / "q.png")).shape == img.shape
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_write_dng_is_atomic(tmp_path, monkeypatch):
    import megfb.raw as raw

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(raw, "_write_dng_to", boom)
    with pytest.raises(RuntimeError):
        write_dng(str(tmp_path / "x.dng"), np.zeros((8, 8), np.uint16), "RGGB", np.zeros(4), 1023)
    assert os.listdir(tmp_path) == []
