import math

import numpy as np
import pytest

from megfb.cli import main
from megfb.io import write_bin
from megfb.metrics import contest_score, psnr


def test_contest_score_hand_computed():
    gt = np.array([np.full((2, 2), 4.0), np.full((2, 2), 16.0)])
    pred = gt.copy()
    pred[0] += 2  # |diff| 2 everywhere, weight (1/4)^0.5 = 0.5 -> 1.0
    pred[1, 0, 1] += 4  # mean |diff| 1, weight (1/16)^0.5 = 0.25 -> 0.25
    # mean over patches 0.625; 5 * log10(100 / 0.625) = 5 * log10(160)
    assert contest_score(pred, gt) == pytest.approx(11.020599913279625, abs=1e-12)
    assert contest_score(pred.astype(np.uint16), gt.astype(np.uint16)) == pytest.approx(11.020599913279625)


def test_contest_score_uint16_no_wraparound_and_chunks():
    # uint16 subtraction would wrap; the score must work on values taken as float
    gt = np.full((300, 4, 4), 100, np.uint16)
    pred = np.full((300, 4, 4), 90, np.uint16)
    # every patch: |diff| 10, weight 0.1 -> 1.0; 5 * log10(100) = 10
    assert contest_score(pred, gt) == pytest.approx(10.0, abs=1e-12)
    assert contest_score(gt, pred) == pytest.approx(5 * math.log10(100 / (10 / 90 ** 0.5)))


def test_psnr_hand_computed():
    gt = np.full((2, 4, 4), 1000, np.uint16)
    pred = gt + np.uint16(1)
    assert psnr(pred, gt) == pytest.approx(96.32946, abs=1e-4)  # 20 log10(65535), MSE 1
    assert psnr(pred.astype(float) + 1, gt, peak=2.0) == pytest.approx(10 * math.log10(4 / 4))


def test_cmd_score(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gt = rng.integers(1000, 60000, size=(2, 256, 256), dtype=np.uint16)
    pred = gt.copy()
    pred[:, :, :128] += 64
    write_bin(tmp_path / "gt.bin", gt)
    write_bin(tmp_path / "pred.bin", pred)
    assert main(["score", str(tmp_path / "pred.bin"), str(tmp_path / "gt.bin")]) == 0
    out = capsys.readouterr().out
    assert f"score {contest_score(pred, gt):.5f}" in out and "2 patches" in out


def test_cmd_score_mismatch(tmp_path, capsys):
    write_bin(tmp_path / "gt.bin", np.ones((2, 256, 256), np.uint16))
    write_bin(tmp_path / "pred.bin", np.ones((1, 256, 256), np.uint16))
    assert main(["score", str(tmp_path / "pred.bin"), str(tmp_path / "gt.bin")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pred.bin holds 1 patches" in err and "gt.bin holds 2" in err
    (tmp_path / "bad.bin").write_bytes(b"\0" * 1000)
    assert main(["score", str(tmp_path / "bad.bin"), str(tmp_path / "gt.bin")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.bin has 1000 bytes" in err
