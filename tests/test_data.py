import os

import numpy as np
import pytest
import yaml

from megfb.cli import main
from megfb.data import (TrainBatches, compute_stats, dihedral_packed, dihedral_packed_inverse, load_stats,
                        split_indices)
from megfb.errors import MegfbError
from megfb.io import FILE_NAMES, pack_bayer, unpack_bayer, write_bin
from megfb.metrics import contest_score


def test_split_indices_deterministic():
    tr, va = split_indices(100, 0.1, 0)
    assert len(va) == 10 and len(tr) == 90
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    tr2, va2 = split_indices(100, 0.1, 0)
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(va, split_indices(100, 0.1, 1)[1])
    assert len(split_indices(5, 0.1, 0)[1]) == 1  # at least one validation patch
    assert len(split_indices(5, 0.0, 0)[1]) == 0


def test_black_level_offset_cancels_in_standardisation():
    # The team's claim: per-channel (x - E[x]) / sqrt(Var[x]), with E and Var estimated from
    # the data itself, does not see a constant black-level offset c.
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 0.02, size=(8, 4, 16, 16))
    c = 4096 / 65535

    def standardise(batch):
        mean = batch.mean(axis=(0, 2, 3), keepdims=True)
        std = batch.std(axis=(0, 2, 3), keepdims=True)
        return (batch - mean) / std

    np.testing.assert_allclose(standardise(x + c), standardise(x), atol=1e-10)
    assert not np.allclose(standardise(x * 1.5), standardise(x) * 1.5)  # a scale is not an offset


# ----------------------------------------------------------------------------- dihedral

def _mosaic_transform(x, k):
    """The k-th dihedral transform applied to the mosaic itself (..., H, W)."""
    y = np.rot90(x, k % 4, axes=(-2, -1))
    return y[..., ::-1] if k >= 4 else y


def _cfa_labels(h, w):
    return 2 * (np.arange(h)[:, None] % 2) + np.arange(w)[None, :] % 2  # 0 R, 1 Gr, 2 Gb, 3 B


@pytest.mark.parametrize("k", range(8))
def test_dihedral_packed_is_mosaic_transform_with_phase_restored(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(2, 8, 12))
    # where R landed after the mosaic transform: (row, col) parity p; shifting back by p is
    # the channel permutation c -> c XOR p in the packed domain
    labels = pack_bayer(_mosaic_transform(_cfa_labels(8, 12), k))
    assert np.all(labels == labels[:, :1, :1])  # every plane is one CFA site
    p = int(np.flatnonzero(labels[:, 0, 0] == 0)[0])
    packed = pack_bayer(np.ascontiguousarray(_mosaic_transform(x, k)))
    restored = packed[..., [c ^ p for c in range(4)], :, :]
    np.testing.assert_array_equal(restored, dihedral_packed(pack_bayer(x), k))
    # R stays in channel 0 and B in channel 3; the greens may swap (a transpose swaps them)
    site = labels[[c ^ p for c in range(4)], 0, 0]
    assert site[0] == 0 and site[3] == 3 and sorted(site[1:3]) == [1, 2]
    np.testing.assert_array_equal(dihedral_packed_inverse(dihedral_packed(pack_bayer(x), k), k), pack_bayer(x))


def _mosaic(scene):
    """RGGB mosaic of an (H, W, 3) scene."""
    m = scene[..., 1].copy()
    m[0::2, 0::2] = scene[0::2, 0::2, 0]
    m[1::2, 1::2] = scene[1::2, 1::2, 2]
    return m


@pytest.mark.parametrize("k", range(8))
def test_dihedral_packed_keeps_colours_on_their_sites(k):
    # constant R, G, B planes: every colour must stay on its own Bayer site
    scene = np.empty((8, 8, 3))
    scene[:] = (10.0, 20.0, 30.0)
    out = unpack_bayer(dihedral_packed(pack_bayer(_mosaic(scene)), k))
    np.testing.assert_array_equal(out, _mosaic(scene))
    # a scene constant within each 2x2 cell: the result is the mosaic of the transformed scene
    cells = np.random.default_rng(k).uniform(size=(4, 6, 3))
    scene = cells.repeat(2, axis=0).repeat(2, axis=1)
    out = unpack_bayer(dihedral_packed(pack_bayer(_mosaic(scene)), k))
    expected = _mosaic(np.ascontiguousarray(_mosaic_transform(scene.transpose(2, 0, 1), k).transpose(1, 2, 0)))
    np.testing.assert_array_equal(out, expected)


def test_dihedral_rejects_bad_k():
    with pytest.raises(ValueError):
        dihedral_packed(np.zeros((4, 2, 2)), 8)


# ------------------------------------------------------------------------ files, stats, batches

@pytest.fixture
def pair(tmp_path):
    """10 patches: the clean top half sits at the black level 4096, the bottom half is
    4096 + row*100 + col + 7*patch; noisy = clean + 300."""
    rows, cols = np.mgrid[0:256, 0:256]
    clean = np.stack([4096 + (rows >= 128) * (rows * 100 + cols + 7 * i) for i in range(10)]).astype(np.uint16)
    noisy = (clean + 300).astype(np.uint16)
    write_bin(tmp_path / FILE_NAMES["train_input"], noisy)
    write_bin(tmp_path / FILE_NAMES["train_gt"], clean)
    return tmp_path / FILE_NAMES["train_input"], tmp_path / FILE_NAMES["train_gt"], noisy, clean


@pytest.fixture
def positions(tmp_path):
    """6 patches whose clean value is its own position, row*256 + col; noisy = 65535 - clean."""
    rows, cols = np.mgrid[0:256, 0:256]
    clean = np.repeat((rows * 256 + cols)[None], 6, axis=0).astype(np.uint16)
    write_bin(tmp_path / "n.bin", 65535 - clean)
    write_bin(tmp_path / "c.bin", clean)
    return tmp_path / "n.bin", tmp_path / "c.bin"


def test_compute_stats(pair):
    npath, cpath, noisy, clean = pair
    s = compute_stats(npath, cpath, val_fraction=0.2, seed=0, chunk=3, progress=False)
    tr, va = split_indices(10, 0.2, 0)
    assert s["split"] == {"val_fraction": 0.2, "seed": 0, "n_train": 8, "n_val": 2}
    packed = pack_bayer(noisy[tr].astype(np.float64)) / 65535
    np.testing.assert_allclose(s["mean"], packed.mean(axis=(0, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(s["std"], packed.std(axis=(0, 2, 3)), atol=1e-6)
    cp = pack_bayer(clean[tr].astype(np.float64)) / 65535
    np.testing.assert_allclose(s["clean_mean"], cp.mean(axis=(0, 2, 3)), atol=1e-6)
    assert s["black_level"]["dn16"] == [4096] * 4
    assert s["black_level"]["unit"] == pytest.approx([4096 / 65535] * 4, abs=1e-6)
    assert s["range_dn16"]["noisy_min"] == [4396] * 4
    assert s["range_dn16"]["noisy_max"][3] == 4096 + 255 * 100 + 255 + 7 * tr[-1] + 300
    assert s["identity_val"]["score"] == pytest.approx(contest_score(noisy[va], clean[va]))


def test_cmd_stats_and_load_stats(pair, capsys):
    npath = pair[0]
    d = npath.parent
    assert main(["data", "stats", "--data-dir", str(d), "--val-fraction", "0.2"]) == 0
    assert "identity prediction" in capsys.readouterr().out
    stats = load_stats(d / "stats.yaml")
    assert len(stats["mean"]) == 4 and stats["split"]["n_val"] == 2
    assert stats["source"]["train_input"]["bytes"] == os.path.getsize(npath)


def test_load_stats_errors(tmp_path):
    with pytest.raises(MegfbError, match="not found.*stats.yaml"):
        load_stats(tmp_path / "stats.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"mean": [0.1, 0.1], "std": [1, 1, 1, 1]}))
    with pytest.raises(MegfbError, match="bad.yaml.*'mean'"):
        load_stats(tmp_path / "bad.yaml")


def test_cmd_stats_bad_files(tmp_path, capsys):
    assert main(["data", "stats", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and FILE_NAMES["train_input"] in err
    write_bin(tmp_path / FILE_NAMES["train_input"], np.zeros((2, 256, 256), np.uint16))
    (tmp_path / FILE_NAMES["train_gt"]).write_bytes(b"\0" * 1234)
    assert main(["data", "stats", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and FILE_NAMES["train_gt"] in err and "1234 bytes" in err
    write_bin(tmp_path / FILE_NAMES["train_gt"], np.zeros((3, 256, 256), np.uint16))
    assert main(["data", "stats", "--data-dir", str(tmp_path)]) == 1
    assert "holds 2 patches" in capsys.readouterr().err
    assert not (tmp_path / "stats.yaml").exists()


def _take(batches, n):
    it = iter(batches)
    return [next(it) for _ in range(n)]


def test_train_batches_deterministic_and_aligned(positions):
    npath, cpath = positions
    args = (npath, cpath, np.array([0, 2, 3, 5]), 32, 3)
    first = _take(TrainBatches(*args, augment=True, seed=7), 4)
    n, c = first[0]
    assert n.shape == c.shape == (3, 4, 16, 16) and n.dtype == c.dtype == np.float32
    assert 0 <= c.min() and n.max() <= 1
    np.testing.assert_allclose(n + c, 1.0, atol=1e-6)  # the pair stays paired under augmentation
    again = _take(TrainBatches(*args, augment=True, seed=7), 4)
    resumed = _take(TrainBatches(*args, augment=True, seed=7, start=2), 2)
    for (a, b), (x, y) in list(zip(first, again)) + list(zip(first[2:], resumed)):
        np.testing.assert_array_equal(a, x)
        np.testing.assert_array_equal(b, y)
    assert not np.array_equal(first[0][0], _take(TrainBatches(*args, augment=True, seed=8), 1)[0][0])
    # every clean value is its source position: R planes must hold (even, even) sites and B
    # planes (odd, odd) for every flip/rotation; the greens hold the two mixed parities
    kinds = set()
    for _, c in first + _take(TrainBatches(*args, augment=True, seed=1), 8):
        v = np.rint(c * 65535).astype(np.int64)
        parity = 2 * (v // 256 % 2) + v % 256 % 2  # (row % 2, col % 2) of each value's source
        for b in range(len(v)):
            assert [set(np.unique(parity[b, ch]).tolist()) for ch in (0, 3)] == [{0}, {3}]
            g = (int(parity[b, 1, 0, 0]), int(parity[b, 2, 0, 0]))
            assert g in ((1, 2), (2, 1)) and np.all(parity[b, 1] == g[0]) and np.all(parity[b, 2] == g[1])
            kinds.add(g)
    assert kinds == {(1, 2), (2, 1)}  # augmentation did transpose sometimes
    # without augmentation a crop is a plain slice at even offsets
    for _, c in _take(TrainBatches(*args, augment=False, seed=3), 3):
        for m in unpack_bayer(np.rint(c * 65535).astype(np.int64)):
            y, x = divmod(int(m[0, 0]), 256)
            assert y % 2 == 0 and x % 2 == 0
            rows, cols = np.mgrid[y:y + 32, x:x + 32]
            np.testing.assert_array_equal(m, rows * 256 + cols)


def test_train_batches_workers_match_serial(positions):
    npath, cpath = positions
    args = (npath, cpath, np.arange(6), 16, 2)
    serial = _take(TrainBatches(*args, augment=True, seed=4, start=3), 5)
    parallel = _take(TrainBatches(*args, augment=True, seed=4, start=3, workers=2), 5)
    for (a, b), (x, y) in zip(serial, parallel):
        np.testing.assert_array_equal(a, x)
        np.testing.assert_array_equal(b, y)


def test_train_batches_bad_input(positions, tmp_path):
    npath, cpath = positions
    with pytest.raises(MegfbError, match="missing.bin"):
        TrainBatches(npath, tmp_path / "missing.bin", [0], 16, 2)
    with pytest.raises(MegfbError, match="crop"):
        TrainBatches(npath, cpath, [0], 15, 2)
    with pytest.raises(MegfbError, match="out of range"):
        TrainBatches(npath, cpath, [6], 16, 2)
