"""`megfb compare`: the four-model table, its JSON and chart, scores from given checkpoints."""
import json

import cv2
import megengine as mge
import numpy as np

from megfb.cli import main
from megfb.io import contest_paths, write_bin
from megfb.model import build_model


def _data(tmp_path, n=2):
    rng = np.random.RandomState(0)
    clean = rng.randint(3000, 9000, size=(n, 256, 256)).astype(np.uint16)
    noisy = np.clip(clean + rng.randint(-400, 400, size=clean.shape), 0, 65535).astype(np.uint16)
    paths = contest_paths(tmp_path)
    write_bin(paths["test_input"], noisy)
    write_bin(paths["test_gt"], clean)
    return noisy, clean


def test_compare_table_json_chart_and_score(tmp_path, capsys):
    _data(tmp_path)
    ckpt = str(tmp_path / "baseline.mge")
    mge.save(build_model({"name": "contest_baseline"}).state_dict(), ckpt)
    out, png = str(tmp_path / "c.json"), str(tmp_path / "c.png")
    assert main(["compare", "--size", "16", "--repeats", "1", "--data", str(tmp_path), "--patches", "2",
                 "--ckpt", ckpt, "--out", out, "--chart", png]) == 0
    text = capsys.readouterr().out
    res = json.load(open(out))
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == ["feedback_model", "recurrent_mobilenet", "fbrestormer", "contest_baseline"]
    assert [rows[k]["params"] for k in rows] == [99_553, 99_180, 99_156, 93_854]
    assert rows["contest_baseline"]["macs"] == 1_533_542_400  # six 3x3 convs on 128x128
    assert 300e9 < rows["recurrent_mobilenet"]["macs"] < 320e9  # "about 310 G"
    assert rows["fbrestormer"]["score"] is None and rows["contest_baseline"]["score"] is not None
    assert rows["contest_baseline"]["max_dn_fast_vs_plain"] <= 1
    assert all(r["sec_plain"] > 0 and r["sec_fast"] > 0 for r in res["rows"])
    assert res["timed_raw_size"] == 16 and "times per 16x16 patch" in text
    assert "organisers' baseline" in text and "9.00798" in text
    img = cv2.imread(png)
    assert img is not None and img.shape[1] > img.shape[0]  # two panels side by side


def test_compare_data_without_targets_writes_nothing(tmp_path, capsys):
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["compare", "--size", "16", "--data", str(tmp_path), "--out", str(out),
                 "--chart", str(png)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "competition_test_input" in err
    assert not out.exists() and not png.exists()
