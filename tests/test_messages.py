"""Messages that point at the real cause; interrupted commands leave nothing behind
(issue 12, items 4 and 5)."""
import glob
import os
import signal
import subprocess
import sys
import time

import megengine as mge
import numpy as np
import pytest

from megfb import cli
from megfb.checkpoint import load_checkpoint, newest_run_checkpoint
from megfb.errors import MegfbError
from megfb.model import build_model
from test_train import tiny_config

from helpers import TINY  # noqa: E402


def _err(capsys):
    err = capsys.readouterr().err
    assert err.startswith("megfb: error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name, content, kind", [
    ("notes.mge", b"just some text\nmore text\n", "a text file"),
    ("config.mge", b"model:\n  name: fbrestormer\n", "a text file (YAML?)"),
    ("patches.bin", np.zeros(100, "<u2").tobytes(), "a raw .bin file"),
])
def test_a_foreign_file_is_not_called_a_corrupt_checkpoint(tmp_path, name, content, kind):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MegfbError) as info:
        load_checkpoint(str(tmp_path / name))
    assert f"is not a MegEngine checkpoint: it is {kind}" in str(info.value)
    assert "corrupt" not in str(info.value)


def test_corrupt_latest_suggests_restart(tmp_path, capsys):
    config = tiny_config(tmp_path, iterations=2, val_every=2)
    assert cli.main(["train", "--config", config]) == 0
    latest = tmp_path / "runs" / "tiny" / "latest.mge"
    latest.write_bytes(latest.read_bytes()[:300])
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "train.iterations=3"]) == 1
    err = _err(capsys)
    assert "corrupt or truncated" in err and "rerun with --restart" in err


def test_a_folder_named_latest_mge(tmp_path, capsys):
    config = tiny_config(tmp_path, iterations=2, val_every=2)
    (tmp_path / "runs" / "tiny" / "latest.mge").mkdir(parents=True)
    assert cli.main(["train", "--config", config]) == 1
    assert "latest.mge is a folder, not a checkpoint file" in _err(capsys)


def test_missing_checkpoint_says_what_exists(tmp_path, capsys):
    (tmp_path / "best.mge").write_bytes(b"\x80")
    with pytest.raises(MegfbError, match=r"checkpoint not found: .*latest.mge \(.* holds best.mge\)"):
        load_checkpoint(str(tmp_path / "latest.mge"))
    with pytest.raises(MegfbError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nowhere" / "latest.mge"))
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "latest.mge").write_bytes(b"x")
    with pytest.raises(MegfbError, match="no best.mge under .*latest.mge exist: pass one with --ckpt"):
        newest_run_checkpoint(str(tmp_path / "runs"))


def test_another_architecture_is_named(tmp_path, capsys):
    mge.save(build_model({"name": "pmrid"}).state_dict(), str(tmp_path / "pmrid.mge"))
    (tmp_path / "in.bin").write_bytes(np.zeros((1, 256, 256), "<u2").tobytes())
    assert cli.main(["predict", "--ckpt", str(tmp_path / "pmrid.mge"), "--input", str(tmp_path / "in.bin"),
                     "--output", str(tmp_path / "out.bin")]) == 1
    assert "it looks like a pmrid checkpoint, this model is fbrestormer" in _err(capsys)
    mge.save(build_model(TINY).state_dict(), str(tmp_path / "tiny.mge"))
    assert cli.main(["predict", "--ckpt", str(tmp_path / "tiny.mge"), "--input", str(tmp_path / "in.bin"),
                     "--output", str(tmp_path / "out.bin")]) == 1
    assert "looks like a fbrestormer of another size" in _err(capsys)


def test_config_with_a_trainer_checkpoint_is_refused(tmp_path, capsys):
    config = tiny_config(tmp_path, iterations=1, val_every=1)
    assert cli.main(["train", "--config", config]) == 0
    (tmp_path / "in.bin").write_bytes(np.zeros((1, 256, 256), "<u2").tobytes())
    capsys.readouterr()
    assert cli.main(["predict", "--ckpt", str(tmp_path / "runs" / "tiny" / "best.mge"), "--config", config,
                     "--input", str(tmp_path / "in.bin"), "--output", str(tmp_path / "out.bin")]) == 1
    assert "is a trainer checkpoint that carries its own config: leave --config out" in _err(capsys)
    assert "refused with a trainer checkpoint" in " ".join(cli.build_parser()._subparsers._group_actions[0]
                                                           .choices["predict"].format_help().split())


def test_synth_checks_free_space_first(tmp_path, capsys):
    assert cli.main(["data", "synth", "--data-dir", str(tmp_path / "d"), "--train", "100000000"]) == 1
    assert "GiB are free; ask for fewer" in _err(capsys)
    assert not (tmp_path / "d").exists()


def test_sigterm_during_synth_leaves_no_temporaries(tmp_path):
    data = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "megfb.cli", "data", "synth", "--data-dir", str(data),
                             "--train", "4096", "--test", "8"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not glob.glob(str(data / ".*.tmp")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:  # a failed check leaves no process behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert os.listdir(data) == []


def test_sigterm_during_submit_leaves_no_temporary_folder(tmp_path):
    mge.save(build_model(TINY).state_dict(), str(tmp_path / "w.mge"))
    (tmp_path / "tiny.yaml").write_text("model: {name: fbrestormer, num_feats: 8, heads: 2, num_blocks: 3, num_steps: 2}\n")
    rng = np.random.default_rng(0)
    (tmp_path / "in.bin").write_bytes(rng.integers(2000, 60000, (4, 256, 256)).astype("<u2").tobytes())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # The signal must land between the temporary folder's creation and the zip: a fast run can
    # finish first, so up to three tries (each must leave no temporary folder either way)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "megfb.cli", "submit", "--ckpt", str(tmp_path / "w.mge"),
                                 "--config", str(tmp_path / "tiny.yaml"), "--input", str(tmp_path / "in.bin"),
                                 "--out", str(tmp_path / "submit")], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=dict(os.environ, TMPDIR=str(tmp)))
        try:
            deadline = time.time() + 120
            while not os.listdir(tmp) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.01)
            names = os.listdir(tmp)
            if names:  # (else the run ended before the folder was seen)
                assert names[0].startswith(f"megfb-submit-{proc.pid}-")
                proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=120)[0].decode()
        finally:
            if proc.poll() is None:  # a failed check leaves no process behind
                proc.kill()
                proc.wait()
        assert os.listdir(tmp) == [], out
        if proc.returncode == 130:
            break
        assert proc.returncode == 0, out  # finished before the signal: its zip, then try again
        for name in os.listdir(tmp_path / "submit"):
            os.remove(tmp_path / "submit" / name)
    assert proc.returncode == 130, out
    assert os.listdir(tmp) == [] and os.listdir(tmp_path / "submit") == []
