"""eval: which checkpoint, the checkpoint's own validation split, the identity score."""
import json
import os
import zipfile

import numpy as np

from megfb import train as trainer
from megfb.checkpoint import load_model, newest_run_checkpoint, save_checkpoint
from megfb.cli import main
from megfb.config import load_config
from megfb.evaluate import score_rows, validation_patches, validation_split
from megfb.io import read_pair
from megfb.metrics import contest_score
from megfb.model import build_model

from helpers import TINY, make_input, write_config  # noqa: E402


def zips(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_default_checkpoint_is_newest_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["submit"]) == 1
    assert "no trained run under runs/: run `make train` or pass --ckpt" in capsys.readouterr().err
    for i, name in enumerate(["old", "new"]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "best.mge").write_bytes(b"x")
        os.utime(tmp_path / "runs" / name / "best.mge", (1000 + i, 1000 + i))
    assert newest_run_checkpoint("runs") == os.path.join("runs", "new", "best.mge")


def test_eval_trainer_checkpoint(tmp_path, capsys):
    """A fake trainer checkpoint: eval scores its own validation split; identity score beside it."""
    data = tmp_path / "data"
    data.mkdir()
    clean = make_input(data / "competition_train_gt.0.2.bin", n=4, seed=1)
    noisy = np.clip(clean.astype(np.int64) + np.random.default_rng(2).integers(-900, 900, clean.shape),
                    0, 65535).astype("<u2")
    noisy.tofile(data / "competition_train_input.0.2.bin")
    from megfb.config import load_config

    cfg = load_config(write_config(tmp_path / "run.yaml", TINY, data={"dir": str(data)}))
    model = build_model(TINY)
    payload = {"megfb": "test", "config": cfg, "model": model.state_dict(), "ema": None,
               "split": {"val_idx": [1, 3], "train_idx": [0, 2]}, "iteration": 7,
               "val": {"best_score": 1.5}}
    ckpt = tmp_path / "best.mge"
    save_checkpoint(payload, str(ckpt))
    assert main(["eval", "--ckpt", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "2 patches" in out and "the checkpoint's own split" in out
    identity = contest_score(noisy[[1, 3]], clean[[1, 3]])
    line = [l for l in out.splitlines() if "identity" in l][0]
    assert f"{identity:.4f}" in line
    assert main(["eval", "--ckpt", str(ckpt), "--patches", "1"]) == 0  # the trainer's val_patches subset
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if "identity" in l][0]
    assert "the first 1 of 2 patches" in out and f"{contest_score(noisy[[1]], clean[[1]]):.4f}" in line
    # the same checkpoint submitted with TTA: run name from its config, its validation score kept
    out_dir = tmp_path / "submit"
    assert main(["submit", "--ckpt", str(ckpt), "--tta", "--input", str(data / "competition_train_input.0.2.bin"),
                 "--out", str(out_dir)]) == 0
    (name,) = zips(out_dir)
    assert name.startswith("run-")
    with zipfile.ZipFile(out_dir / name) as z:
        manifest = json.loads(z.read("manifest.json"))
        assert z.getinfo("result.bin").file_size == 4 * 256 * 256 * 2
    assert manifest["validation_score"] == 1.5 and manifest["tta"] is True
    assert manifest["checkpoint_kind"] == "trainer" and manifest["iteration"] == 7


def test_trainer_validation_score_equals_eval(tmp_path, capsys):
    """The trainer validates through the same prediction path and patches as `megfb eval`:
    the score it logs for best.mge is what eval computes from that file."""
    from test_train import tiny_config

    cfg = load_config(tiny_config(tmp_path, iterations=6, val_every=3, ema_decay=0.9), ["data.val_patches=1"])
    trainer.train(cfg)
    run = tmp_path / "runs" / "tiny"
    logged = [r for r in map(json.loads, open(run / "log.jsonl")) if "val_score" in r]
    best = max(logged, key=lambda r: r["val_score"])
    path, model, info = load_model(str(run / "best.mge"))
    assert info["weights"] == "ema" and info["iteration"] == best["iteration"]
    noisy, clean = read_pair(os.path.join(cfg["data"]["dir"], cfg["data"]["train_input"]),
                             os.path.join(cfg["data"]["dir"], cfg["data"]["train_gt"]))
    val_idx, source = validation_split(info, info["config"], len(noisy))
    assert source == "the checkpoint's own split" and len(val_idx) == 2
    idx = validation_patches(val_idx, 1)
    rows = score_rows(model, noisy[idx], clean[idx])
    assert rows["model"][0] == best["val_score"]
    assert rows["identity"][0] == best["identity_score"]
    capsys.readouterr()
    assert main(["eval", "--ckpt", path, "--patches", "1"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("validation  ")][0]
    assert f"{best['val_score']:.4f}" in line
