import hashlib
import os

import numpy as np
import pytest
import yaml

from megfb import synth
from megfb.cli import main
from megfb.io import FILE_NAMES, read_bin, read_pair

ALL = sorted(list(FILE_NAMES.values()) + [synth.NOTE_NAME])


def _synth(d, *extra, train=6, test=3, seed=1):
    return main(["data", "synth", "--data-dir", str(d), "--train", str(train), "--test", str(test),
                 "--seed", str(seed), *extra])


def _digest(d):
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in FILE_NAMES.values()}


def test_noise_model_constants():
    # PMRID OPPO Reno 10x calibration, by hand at ISO 800 and 6400
    assert synth.system_gain(800) == pytest.approx(0.0005995267 * 800 + 0.00868861)
    assert synth.system_gain(6400) == pytest.approx(3.84565949, rel=1e-9)
    assert synth.read_noise_var(800) == pytest.approx(0.455534 + 0.52119472 + 0.11492713, rel=1e-6)


def test_sensor_noise_statistics(monkeypatch):
    monkeypatch.setitem(synth.SETTINGS, "iso", [1600, 1600])
    signal = np.full((2, 256, 256), 100.0, np.float32)
    noisy, clean = synth.add_sensor_noise(np.random.default_rng(0), signal)
    assert noisy.dtype == clean.dtype == np.uint16
    np.testing.assert_array_equal(clean, (100 + 64) * 64)  # black level 64 DN, x64 to 16 bit
    assert np.all(noisy % 64 == 0)  # integer 10-bit DN, x64
    dn = noisy / 64.0
    k, var_read = 0.0005995267 * 1600 + 0.00868861, 7.11772e-7 * 1600 ** 2 + 6.514934e-4 * 1600 + 0.11492713
    assert dn.mean() == pytest.approx(164, abs=0.1)
    # shot + read + rounding (1/12) variance: 96.80 + 2.98 + 0.08 DN^2
    assert dn.var() == pytest.approx(k * 100 + var_read + 1 / 12, rel=0.02)


def test_photos_disjoint_and_offline():
    assert not set(synth.TRAIN_PHOTOS) & set(synth.TEST_PHOTOS)
    for name in synth.TRAIN_PHOTOS[:2] + synth.TEST_PHOTOS[:1] + ("motorcycle_right", "text"):
        img = synth.load_photo(name)
        assert img.dtype == np.float32 and img.ndim == 3 and 0 <= img.min() and img.max() <= 1


def test_synth_writes_contest_format(tmp_path, capsys):
    assert _synth(tmp_path) == 0
    out = capsys.readouterr().out
    assert "6 train pairs, 3 test patches" in out and "published" in out
    assert sorted(os.listdir(tmp_path)) == ALL
    noisy, clean = read_pair(tmp_path / FILE_NAMES["train_input"], tmp_path / FILE_NAMES["train_gt"])
    assert noisy.shape == (6, 256, 256) and len(read_bin(tmp_path / FILE_NAMES["test_gt"])) == 3
    assert clean.min() >= 64 * 64 and clean.max() <= 1023 * 64
    assert np.all(np.asarray(noisy) % 64 == 0)
    assert 0.065 < noisy.mean() / 65535 < 0.3
    note = yaml.safe_load((tmp_path / synth.NOTE_NAME).read_text())
    assert note["synthetic"] is True and note["seed"] == 1 and note["counts"] == {"train": 6, "test": 3}
    assert note["files"][FILE_NAMES["train_input"]]["bytes"] == 6 * 256 * 256 * 2
    assert synth.classify(str(tmp_path))[0] == "generated"


def test_synth_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _synth(a) == 0 and _synth(b) == 0 and _synth(c, seed=2) == 0
    assert _digest(a) == _digest(b)
    assert _digest(a)[FILE_NAMES["train_input"]] != _digest(c)[FILE_NAMES["train_input"]]
    # one thread or two: same bytes
    one = list(synth.generate(70, synth.TEST_PHOTOS, 5, 1, threads=1))
    two = list(synth.generate(70, synth.TEST_PHOTOS, 5, 1, threads=2))
    assert [len(n) for n, _ in one] == [64, 6]
    for (n1, c1), (n2, c2) in zip(one, two):
        np.testing.assert_array_equal(n1, n2)
        np.testing.assert_array_equal(c1, c2)


def test_synth_skips_existing_set_unless_forced(tmp_path, capsys):
    assert _synth(tmp_path) == 0
    before = _digest(tmp_path)
    assert _synth(tmp_path, seed=3) == 0
    assert "already in" in capsys.readouterr().out
    assert _digest(tmp_path) == before
    assert _synth(tmp_path, "--force", seed=3) == 0
    assert _digest(tmp_path) != before and sorted(os.listdir(tmp_path)) == ALL
    # a copied set (new mtimes) is still recognised, by its hashes
    os.utime(tmp_path / FILE_NAMES["train_gt"], (1, 1))
    assert synth.classify(str(tmp_path))[0] == "generated"


def test_synth_never_touches_real_files(tmp_path, capsys):
    real = tmp_path / FILE_NAMES["train_input"]
    real.write_bytes(b"\1" * 2 * 256 * 256 * 2)
    assert _synth(tmp_path) == 0
    assert "real contest files found" in capsys.readouterr().out
    assert os.listdir(tmp_path) == [real.name]
    assert _synth(tmp_path, "--force") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to overwrite" in err and real.name in err
    assert os.listdir(tmp_path) == [real.name] and real.read_bytes() == b"\1" * 2 * 256 * 256 * 2
    # a generated set whose file was replaced by a real one: that file is real now
    other = tmp_path / "other"
    assert _synth(other) == 0
    (other / FILE_NAMES["test_input"]).write_bytes(b"\2" * 256 * 256 * 2)
    assert _synth(other, "--force") == 1
    assert FILE_NAMES["test_input"] in capsys.readouterr().err


def test_synth_all_or_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(f, array):
        calls.append(1)
        if len(calls) == 3:  # after the training pair, while writing the test files
            raise OSError("disk full")
        f.write(array.tobytes())

    monkeypatch.setattr(synth, "write_patches", failing_write)
    with pytest.raises(OSError):
        synth.synthesize(str(tmp_path), 4, 2, seed=0, progress=False)
    assert os.listdir(tmp_path) == []


def test_synth_bad_counts(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing, before any work
        _synth(tmp_path, train=0)
    assert exit_info.value.code == 2
    assert "--train" in capsys.readouterr().err
    assert not tmp_path.exists() or os.listdir(tmp_path) == []


def _photo(path, h=300, w=320, seed=0, bits=8):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(xx * rng.uniform(3, 9) + c) * 0.4 + 0.5 + yy * 0.1 for c in range(3)], -1)
    top = 65535 if bits == 16 else 255
    import cv2

    assert cv2.imwrite(str(path), np.clip(img * top, 0, top).astype(np.uint16 if bits == 16 else np.uint8))
    return path


def test_photos_become_the_clean_content(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (ext, bits) in enumerate([("png", 8), ("jpg", 8), ("tif", 16), ("PNG", 8), ("bmp", 8),
                                     ("tiff", 16), ("jpeg", 8), ("png", 16), ("png", 8)]):
        _photo(photos / f"p{i}.{ext}", seed=i, bits=bits)
    (photos / "notes.txt").write_text("not a photo")  # other files are ignored
    out = tmp_path / "data"
    assert _synth(out, "--photos", str(photos), "--procedural", "0", train=8, test=4) == 0
    assert "8 photos for the training file, 1 for the test file" in capsys.readouterr().out
    note = yaml.safe_load((out / synth.NOTE_NAME).read_text())
    files = note["photos"]["files"]
    assert note["photos"]["source"] == "--photos" and len(files) == 9
    assert {f["split"] for f in files} == {"train", "test"}
    for f in files:  # every photo listed with its hash
        assert f["sha256"] == hashlib.sha256(open(f["path"], "rb").read()).hexdigest()
    train = {f["path"] for f in files if f["split"] == "train"}
    test = {f["path"] for f in files if f["split"] == "test"}
    assert not train & test and len(train) + len(test) == 9
    noisy, clean = read_pair(out / FILE_NAMES["train_input"], out / FILE_NAMES["train_gt"])
    assert noisy.shape == (8, 256, 256) and clean.min() >= 64 * 64


def test_photo_split_is_disjoint_and_by_content(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(20):
        _photo(photos / f"p{i:02d}.png", seed=i)
    train, test, entries = synth.split_photos([str(photos)])
    assert len(test) == 2 and len(train) == 18 and not set(train) & set(test)
    # the split follows the files' contents, not their names
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for e in entries:
        os.link(e["path"], renamed / ("x" + e["sha256"][:8] + ".png"))
    _, test2, entries2 = synth.split_photos([str(renamed)])
    assert sorted(e["sha256"] for e in entries2 if e["split"] == "test") == \
        sorted(e["sha256"] for e in entries if e["split"] == "test")


def test_16_bit_photos_keep_their_precision(tmp_path):
    import cv2

    ramp = (np.arange(256 * 256, dtype=np.uint32) % 65536).astype(np.uint16).reshape(256, 256)
    path = tmp_path / "ramp16.tif"
    cv2.imwrite(str(path), np.stack([ramp] * 3, -1))
    linear = synth.read_photo_file(str(path))
    assert linear.dtype == np.float32
    # 65536 distinct codes stay distinct (an 8-bit read would leave 256)
    assert len(np.unique(linear[..., 0])) == 65536


def test_photo_errors_name_the_file_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "data"
    cases = {}
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty"] = (empty, "holds no photos")
    small = tmp_path / "small"
    small.mkdir()
    _photo(small / "a.png")
    _photo(small / "tiny.png", h=200, w=500)
    cases["small"] = (small, "tiny.png is 500x200, smaller than one 256x256 crop")
    broken = tmp_path / "broken"
    broken.mkdir()
    _photo(broken / "a.png")
    _photo(broken / "b.jpg")
    data = (broken / "b.jpg").read_bytes()
    (broken / "b.jpg").write_bytes(data[:40])
    cases["broken"] = (broken, "b.jpg cannot be read")
    one = tmp_path / "one"
    one.mkdir()
    _photo(one / "a.png")
    cases["one"] = (one, "at least 2 photos")
    cases["missing"] = (tmp_path / "nowhere", "is not a folder")
    for name, (folder, message) in cases.items():
        capsys.readouterr()
        assert _synth(out, "--photos", str(folder)) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (name, err)
        assert not out.exists() or os.listdir(out) == [], name
