"""`megfb data synth --noise-profile`: a given camera's noise (a,b, a DNG's NoiseProfile, or the
phone calibration at one ISO) in the synthetic pairs, recorded in the manifest."""
import os

import numpy as np
import pytest
import yaml

from megfb import synth
from megfb.cli import main
from megfb.errors import MegfbError
from megfb.io import pack_bayer, read_bin

from raw_helpers import make_dng


def test_given_pair():
    p = synth.parse_noise_profile("2e-4,1e-6")
    assert p["a"] == [2e-4] * 4 and p["b"] == [1e-6] * 4 and p["source"] == "given"


@pytest.mark.parametrize("text", ["1,2,3", "x,1", "-1,0", "1,nan"])
def test_bad_pairs(text):
    with pytest.raises(MegfbError, match="--noise-profile"):
        synth.parse_noise_profile(text)


def test_iso_uses_the_phone_calibration():
    p = synth.parse_noise_profile("iso:1600")
    assert p["a"][0] == pytest.approx((0.0005995267 * 1600 + 0.00868861) / 959)
    assert p["b"][0] == pytest.approx((7.11772e-7 * 1600 ** 2 + 6.514934e-4 * 1600 + 0.11492713) / 959 ** 2)
    with pytest.raises(MegfbError, match="iso:N"):
        synth.parse_noise_profile("iso:high")


def test_from_a_dng(tmp_path):
    make_dng(str(tmp_path / "one.dng"), 32, 32, noise_profile=(3e-4, 2e-6))
    p = synth.parse_noise_profile(str(tmp_path / "one.dng"))
    assert p["a"] == [3e-4] * 4 and p["b"] == [2e-6] * 4
    assert p["source"] == str(tmp_path / "one.dng")
    # one pair per colour plane (R, G, B) lands on R, Gr, Gb, B
    make_dng(str(tmp_path / "three.dng"), 32, 32, noise_profile=(1e-4, 1e-6, 2e-4, 2e-6, 3e-4, 3e-6))
    p = synth.parse_noise_profile(str(tmp_path / "three.dng"))
    assert p["a"] == [1e-4, 2e-4, 2e-4, 3e-4] and p["b"] == [1e-6, 2e-6, 2e-6, 3e-6]


def test_files_without_a_profile(tmp_path):
    make_dng(str(tmp_path / "plain.dng"), 32, 32)
    with pytest.raises(MegfbError, match="plain.dng: this DNG has no NoiseProfile tag"):
        synth.parse_noise_profile(str(tmp_path / "plain.dng"))
    (tmp_path / "photo.cr2").write_bytes(b"\0" * 100)
    with pytest.raises(MegfbError, match="photo.cr2 is not a DNG: LibRaw reports a raw file's ISO but no noise"):
        synth.parse_noise_profile(str(tmp_path / "photo.cr2"))
    with pytest.raises(MegfbError, match="not found"):
        synth.parse_noise_profile(str(tmp_path / "missing.dng"))


def test_noise_has_the_profile_variance():
    """On a flat signal the per-channel variance on [0, 1] is a*x + b (within sampling error)."""
    rng = np.random.default_rng(0)
    profile = {"source": "t", "a": [4e-4, 2e-4, 2e-4, 1e-4], "b": [4e-6, 1e-6, 1e-6, 2e-6]}
    x = 0.3
    signal = np.full((16, 64, 64), x * synth.V, np.float32)
    noisy, clean = synth.add_sensor_noise(rng, signal, [profile])
    to_unit = lambda v: (pack_bayer(v.astype(np.float64)) / 64 - synth.BLACK) / synth.V  # noqa: E731
    var = to_unit(noisy).var(axis=(0, 2, 3))
    want = np.array(profile["a"]) * x + np.array(profile["b"])
    assert var == pytest.approx(want, rel=0.05)
    assert to_unit(clean) == pytest.approx(x, abs=1e-4)


def test_synth_records_the_profile(tmp_path, capsys):
    make_dng(str(tmp_path / "cam.dng"), 32, 32, noise_profile=(3e-4, 2e-6))
    data = tmp_path / "data"
    code = main(["data", "synth", "--data-dir", str(data), "--train", "4", "--test", "2",
                 "--noise-profile", str(tmp_path / "cam.dng"), "--noise-profile", "1e-3,1e-5"])
    assert code == 0
    note = yaml.safe_load((data / "synthetic.yaml").read_text())
    profiles = note["noise"]["profiles"]
    assert [p["source"] for p in profiles] == [str(tmp_path / "cam.dng"), "given"]
    assert profiles[0]["a_rggb"] == [3e-4] * 4 and profiles[1]["b_rggb"] == [1e-5] * 4
    assert len(read_bin(data / "competition_train_input.0.2.bin")) == 4
    assert "noise profile" in capsys.readouterr().out


def test_synth_bad_profile_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--data-dir", str(data), "--train", "4", "--test", "2",
                 "--noise-profile", "1,2,3"]) == 1
    assert "--noise-profile 1,2,3" in capsys.readouterr().err
    assert not data.exists() or os.listdir(data) == []


def test_default_noise_is_unchanged_and_recorded(tmp_path):
    note = synth.synthesize(str(tmp_path), 4, 2, seed=0, progress=False)
    assert note["noise"]["model"].startswith("phone calibration")
