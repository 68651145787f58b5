"""A run is one experiment; bad data is one line (issue 12, items 2 and 3)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from megfb import cli, train as trainer
from megfb.checkpoint import load_checkpoint
from megfb.config import load_config
from megfb.data import TrainBatches
from megfb.errors import MegfbError
from megfb.io import write_bin
from test_train import tiny_config, write_tiny_data


def _err(capsys):
    err = capsys.readouterr().err
    assert err.startswith("megfb: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    config = tiny_config(tmp_path, iterations=4, val_every=4)
    assert cli.main(["train", "--config", config]) == 0
    run = tmp_path / "runs" / "tiny"
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "optim.lr=1e-3", "data.crop=16", "train.iterations=6"]) == 1
    err = _err(capsys)
    assert "optim.lr 0.01 -> 0.001" in err and "data.crop 32 -> 16" in err and "train.iterations" not in err
    assert "--restart" in err and "name=" in err
    assert (run / "config.yaml").read_text() == before  # still describes what ran
    assert load_checkpoint(str(run / "latest.mge"))["iteration"] == 4
    # extending the run (and its cadence) is the same experiment: allowed, said and logged
    assert cli.main(["train", "--config", config, "train.iterations=6", "train.log_every=2"]) == 0
    assert "train.iterations 4 -> 6" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["iterations"] == 6
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"iteration": 4, "resumed_with": {"train.iterations": [4, 6], "train.log_every": [1, 2]}} in logged
    # another name is a new run
    assert cli.main(["train", "--config", config, "optim.lr=1e-3", "name=other", "train.iterations=2"]) == 0


def test_resume_onto_a_smaller_data_set_is_refused(tmp_path, capsys):
    config = tiny_config(tmp_path, iterations=3, val_every=3)
    assert cli.main(["train", "--config", config]) == 0
    write_tiny_data(tmp_path / "data", n=3, seed=1)
    (tmp_path / "data" / "stats.yaml").unlink()
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "train.iterations=5"]) == 1
    err = _err(capsys)
    assert "is another experiment" in err and "competition_train_input.0.2.bin: 1310720 -> 393216 bytes" in err


def test_a_second_trainer_on_the_same_run_is_refused_a_killed_one_leaves_no_lock(tmp_path, capsys):
    config = tiny_config(tmp_path, iterations=2, val_every=2)
    run = tmp_path / "runs" / "tiny"
    holder = trainer.RunLock(str(run)).acquire()  # a trainer that is still running
    try:
        assert cli.main(["train", "--config", config]) == 1
        assert "is in use by another `megfb train` (pid" in _err(capsys)
        assert not (run / "config.yaml").exists()
    finally:
        holder.release()
    # a trainer killed with SIGKILL while holding the lock
    code = f"from megfb.train import RunLock; import os; RunLock({str(run)!r}).acquire(); os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert (run / ".lock").exists()
    assert cli.main(["train", "--config", config]) == 0


def test_stats_from_other_data_are_refused(tmp_path, capsys):
    config = tiny_config(tmp_path, iterations=2, val_every=2)
    data = tmp_path / "data"
    assert cli.main(["data", "stats", "--data-dir", str(data)]) == 0
    stats = (data / "stats.yaml").read_text()
    write_tiny_data(data, n=12, seed=3)  # the data changed under the statistics
    capsys.readouterr()
    assert cli.main(["train", "--config", config]) == 1
    assert "was computed from competition_train_input.0.2.bin of 1310720 bytes" in _err(capsys)
    assert not (tmp_path / "runs").exists()
    broken = yaml.safe_load(stats)
    del broken["source"]
    (data / "stats.yaml").write_text(yaml.safe_dump(broken))
    assert cli.main(["train", "--config", config]) == 1
    assert "does not record the data it was computed from" in _err(capsys)


def test_one_patch_and_empty_validation_split_one_rule(tmp_path, capsys):
    config = tiny_config(tmp_path)
    write_tiny_data(tmp_path / "data", n=1)
    assert cli.main(["train", "--config", config]) == 1
    train_err = _err(capsys)
    assert cli.main(["data", "stats", "--data-dir", str(tmp_path / "data")]) == 1
    stats_err = _err(capsys)
    assert "holds 1 patch: at least 2 are needed" in train_err and "holds 1 patch: at least 2 are needed" in stats_err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data" / "stats.yaml").exists()
    write_tiny_data(tmp_path / "data", n=4)
    for args in (["data", "stats", "--data-dir", str(tmp_path / "data"), "--val-fraction", "0"],
                 ["train", "--config", config, "data.val_fraction=0"]):
        assert cli.main(args) == 1
        assert "must be a number in (0, 1), got 0" in _err(capsys)


def test_constant_data_is_explained_once(tmp_path, capsys):
    config = tiny_config(tmp_path)
    for name in ("competition_train_input.0.2.bin", "competition_train_gt.0.2.bin"):
        write_bin(tmp_path / "data" / name, np.zeros((4, 256, 256), np.uint16))
    assert cli.main(["data", "stats", "--data-dir", str(tmp_path / "data")]) == 1
    assert "has the value 0 (constant data, std 0)" in _err(capsys)
    assert cli.main(["train", "--config", config]) == 1
    assert "has the value 0 (constant data, std 0)" in _err(capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data" / "stats.yaml").exists()


def test_log_is_strict_json_and_no_best_is_claimed(tmp_path, monkeypatch, capsys):
    config = tiny_config(tmp_path, iterations=2, val_every=1)
    monkeypatch.setattr(trainer, "score", lambda pred, clean: (float("nan"), float("-inf")))
    summary = trainer.train(load_config(config))
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny"
    assert "no best.mge was written" in out and "best.mge)" not in out
    assert not (run / "best.mge").exists() and summary["best_iteration"] is None

    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    lines = [json.loads(line, parse_constant=refuse) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["val_score"] for r in lines if "val_score" in r] == [None, None]


def test_data_truncated_while_training_is_named(tmp_path):
    write_tiny_data(tmp_path, n=4)
    noisy = tmp_path / "competition_train_input.0.2.bin"
    batches = TrainBatches(noisy, tmp_path / "competition_train_gt.0.2.bin", [0, 1, 2, 3], crop=32, batch_size=8)
    batches.batch(0)
    os.truncate(noisy, 256 * 256 * 2)  # another program rewrites the file mid-run
    with pytest.raises(MegfbError, match="competition_train_input.0.2.bin is now 131072 bytes.*truncated"):
        for t in range(1, 20):
            batches.batch(t)


def test_nan_before_the_first_checkpoint_says_so(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, iterations=5, val_every=5, ckpt_every=5)
    real = trainer.supervised_loss
    monkeypatch.setattr(trainer, "supervised_loss",
                        lambda o, c, cfg: (lambda t: (t[0] * float("nan"), t[1]))(real(o, c, cfg)))
    with pytest.raises(MegfbError, match=r"no checkpoint was written yet \(.*latest.mge does not exist\)"):
        trainer.train(load_config(config))


def test_restart_sweeps_a_killed_save(tmp_path):
    from megfb.atomic import temp_name

    config = tiny_config(tmp_path, iterations=2, val_every=2)
    assert cli.main(["train", "--config", config]) == 0
    stale = tmp_path / "runs" / "tiny" / temp_name("latest.mge", pid=2 ** 22 + 3)
    stale.write_bytes(b"half a checkpoint")
    assert cli.main(["train", "--config", config, "--restart"]) == 0
    assert not stale.exists()


def test_defaults_leave_no_loader_processes():
    assert load_config(None)["data"]["workers"] == 0


def test_os_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from megfb import data

    write_tiny_data(tmp_path, n=4)

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "stats.yaml"))

    monkeypatch.setattr(data, "write_stats", full)
    assert cli.main(["data", "stats", "--data-dir", str(tmp_path)]) == 1
    assert "stats.yaml: No space left on device" in _err(capsys)
    assert cli.main(["score", str(tmp_path), str(tmp_path)]) == 1
    _err(capsys)


def test_statistics_and_validation_reads_name_a_truncated_file(tmp_path, monkeypatch):
    """Statistics, the trainer's and eval's validation sets read with pread too: a file cut
    short under them is one line naming it (a memmap read would end the process with SIGBUS)."""
    from megfb import data
    from megfb.io import read_patches

    write_tiny_data(tmp_path, n=4)
    gt = tmp_path / "competition_train_gt.0.2.bin"
    np.testing.assert_array_equal(read_patches(gt, [2, 0])[1], np.fromfile(gt, "<u2")[:256 * 256].reshape(256, 256))
    real = data.read_patches

    def truncated_after_counting(path, idx):
        os.truncate(gt, 256 * 256 * 2)  # cut short after the sizes were checked
        return real(path, idx)

    monkeypatch.setattr(data, "read_patches", truncated_after_counting)
    with pytest.raises(MegfbError, match="competition_train_gt.0.2.bin is now 131072 bytes, too short"):
        data.compute_stats(str(tmp_path / "competition_train_input.0.2.bin"), str(gt), 0.25, 0, progress=False)
