import os

import numpy as np
import pytest

from megfb.errors import MegfbError
from megfb.io import (PATCH_BYTES, contest_paths, mosaic_to_packed, pack_bayer, packed_to_mosaic, read_bin,
                      read_pair, unpack_bayer, write_bin)


def test_pack_matches_contest_expression_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65536, size=(3, 8, 6), dtype=np.uint16)
    n, h, w = x.shape
    contest = x.reshape(n, 1, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(n, 4, h // 2, w // 2)
    packed = pack_bayer(x)
    assert packed.shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(packed, contest)
    # channel order (0,0), (0,1), (1,0), (1,1)
    assert packed[1, 0, 2, 1] == x[1, 4, 2] and packed[1, 1, 2, 1] == x[1, 4, 3]
    assert packed[1, 2, 2, 1] == x[1, 5, 2] and packed[1, 3, 2, 1] == x[1, 5, 3]
    np.testing.assert_array_equal(unpack_bayer(packed), x)
    # general leading axes
    y = rng.normal(size=(2, 3, 4, 10))
    assert pack_bayer(y).shape == (2, 3, 4, 2, 5)
    np.testing.assert_array_equal(unpack_bayer(pack_bayer(y)), y)
    np.testing.assert_array_equal(pack_bayer(y[0, 0]), pack_bayer(y)[0, 0])


def test_packed_scaling_round_trip():
    x = np.random.default_rng(1).integers(0, 65536, size=(2, 16, 16), dtype=np.uint16)
    p = mosaic_to_packed(x)
    assert p.dtype == np.float32 and p.shape == (2, 4, 8, 8) and 0 <= p.min() and p.max() <= 1
    np.testing.assert_array_equal(packed_to_mosaic(p), x)
    # out-of-range predictions are clipped, not wrapped
    np.testing.assert_array_equal(packed_to_mosaic(np.full((1, 4, 1, 1), 1.7)), 65535)
    np.testing.assert_array_equal(packed_to_mosaic(np.full((1, 4, 1, 1), -0.2)), 0)


def test_write_read_round_trip(tmp_path):
    x = np.random.default_rng(2).integers(0, 65536, size=(3, 256, 256), dtype=np.uint16)
    path = tmp_path / "a.bin"
    write_bin(path, x)
    assert os.path.getsize(path) == 3 * PATCH_BYTES
    assert np.fromfile(path, dtype="<u2")[:2].tolist() == x.ravel()[:2].tolist()  # no header
    y = read_bin(path)
    assert isinstance(y, np.memmap) and not y.flags.writeable and y.shape == (3, 256, 256)
    np.testing.assert_array_equal(y, x)
    noisy, clean = read_pair(path, path)
    assert len(noisy) == len(clean) == 3
    assert os.listdir(tmp_path) == ["a.bin"]


def test_contest_paths():
    p = contest_paths("d")
    assert p == {"train_input": os.path.join("d", "competition_train_input.0.2.bin"),
                 "train_gt": os.path.join("d", "competition_train_gt.0.2.bin"),
                 "test_input": os.path.join("d", "competition_test_input.0.2.bin"),
                 "test_gt": os.path.join("d", "synthetic_test_gt.0.2.bin")}


def test_bad_files(tmp_path):
    with pytest.raises(MegfbError, match="not found.*nope.bin"):
        read_bin(tmp_path / "nope.bin")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(MegfbError, match="empty.bin is empty"):
        read_bin(empty)
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * (PATCH_BYTES + 10))
    with pytest.raises(MegfbError, match=f"short.bin has {PATCH_BYTES + 10} bytes.*1 whole patches and 10 bytes"):
        read_bin(short)
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    one.write_bytes(b"\0" * PATCH_BYTES)
    two.write_bytes(b"\0" * 2 * PATCH_BYTES)
    with pytest.raises(MegfbError, match="one.bin holds 1 patches but .*two.bin holds 2"):
        read_pair(one, two)


def test_write_bin_refuses_wrong_shape_or_dtype(tmp_path):
    with pytest.raises(MegfbError, match="x.bin.*shape"):
        write_bin(tmp_path / "x.bin", np.zeros((2, 128, 256), np.uint16))
    with pytest.raises(MegfbError, match="x.bin.*uint16"):
        write_bin(tmp_path / "x.bin", np.zeros((2, 256, 256), np.float32))
    with pytest.raises(MegfbError, match="x.bin.*shape"):
        write_bin(tmp_path / "x.bin", np.zeros((256, 256), np.uint16))
    assert os.listdir(tmp_path) == []
