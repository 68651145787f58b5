import glob
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from megfb import cli, train as trainer
from megfb.checkpoint import load_checkpoint
from megfb.config import load_config
from megfb.errors import MegfbError
from megfb.io import write_bin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = {"name": "fbrestormer", "num_feats": 8, "num_blocks": 3, "heads": 2}


def write_tiny_data(folder, n=10, sigma=2500.0, seed=0):
    """Smooth clean mosaics above a 4096 black level plus strong Gaussian noise: a tiny model
    learns to smooth it within a few dozen steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    clean = np.stack([4096 + 8000 * (1.2 + np.sin(xx * rng.uniform(2, 6) + yy * rng.uniform(2, 6) + rng.uniform(0, 6)))
                      for _ in range(n)])
    noisy = clean + rng.normal(0, sigma, clean.shape)
    os.makedirs(folder, exist_ok=True)
    for name, x in (("competition_train_input.0.2.bin", noisy), ("competition_train_gt.0.2.bin", clean)):
        write_bin(os.path.join(folder, name), np.clip(x, 0, 65535).round().astype(np.uint16))


def tiny_config(tmp_path, **train):
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        write_tiny_data(data_dir)
    cfg = {
        "seed": 0,
        "out_dir": str(tmp_path / "runs"),
        "data": {"dir": str(data_dir), "crop": 32, "batch_size": 4, "workers": 0, "val_fraction": 0.2},
        "model": dict(TINY_MODEL),
        "optim": {"lr": 1.0e-2},
        "train": {"iterations": 30, "val_every": 30, "log_every": 1, "ckpt_every": 5, "preview_crops": 1, **train},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def weights(path, key="model"):
    return load_checkpoint(path)[key]


def test_schedules():
    sched = {"type": "step", "step_size": 10, "gamma": 0.5, "min_lr": 0.0, "warmup": 0}
    assert [trainer.learning_rate(sched, 1.0, it, 100) for it in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    cos = dict(sched, type="cosine", min_lr=0.1, warmup=4)
    assert [trainer.learning_rate(cos, 1.0, it, 104) for it in (0, 3)] == [0.25, 1.0]
    assert trainer.learning_rate(cos, 1.0, 4, 104) == pytest.approx(1.0)
    assert trainer.learning_rate(cos, 1.0, 54, 104) == pytest.approx(0.55)
    assert trainer.learning_rate(cos, 1.0, 104, 104) == pytest.approx(0.1)
    cfg = {"data": {"crop": 256, "batch_size": 8},
           "train": {"progressive": [{"until": 10, "crop": 64, "batch_size": 32}, {"until": 20, "crop": 128}]}}
    assert [trainer.data_phase(cfg, it) for it in (0, 9, 10, 20)] == [(64, 32), (64, 32), (128, 8), (256, 8)]
    assert trainer.ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert trainer.ema_decay_at(0.999, 10**6) == 0.999


def test_ablation_configs_match_the_reported_parameter_counts():
    from megfb.model import build_model, count_parameters

    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "ablations", "*.yaml")))
    assert len(paths) == 12  # one per row of the team's table
    for path in paths:
        text = open(path).read()
        cfg = load_config(path)
        assert cfg["train"]["iterations"] == 200000 and cfg["data"]["batch_size"] == 8
        reported = re.search(r"([\d,]+) params", text).group(1)
        here = re.search(r"this implementation counts ([\d,]+)", text)
        want = int((here.group(1) if here else reported).replace(",", ""))
        assert count_parameters(build_model(cfg["model"])) == want, path
    final = load_config(os.path.join(ROOT, "configs", "megcup2022.yaml"))
    assert final["data"]["train_on_all"] and final["train"]["iterations"] == 1000000
    assert trainer.learning_rate(final["schedule"], 1e-3, 750000, 1000000) == pytest.approx(1.25e-4)


def test_loss_falls_and_run_directory(tmp_path, capsys):
    cfg = load_config(tiny_config(tmp_path, iterations=40, val_every=20, ema_decay=0.9))
    summary = trainer.train(cfg, gpus=2)
    out = capsys.readouterr().out
    assert "training on CPU in a single process" in out
    assert out.splitlines()[0].startswith("device: CPU")  # the device, first of all
    run = tmp_path / "runs" / "tiny"
    assert sorted(os.listdir(run)) == [".lock", "best.mge", "config.yaml", "curves.png", "latest.mge", "log.jsonl"]
    records = [yaml.safe_load(line) for line in open(run / "log.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40 and all(len(r["loss_steps"]) == 2 for r in records if "loss" in r)
    # the whole run is seeded (init, batches), so these figures are reproducible, not lucky
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    vals = [r for r in records if "val_score" in r]
    assert [r["iteration"] for r in vals] == [20, 40]
    assert summary["best_score"] == max(r["val_score"] for r in vals)
    assert summary["best_score"] > summary["identity_score"] + 0.2
    assert f"gain {summary['gain']:+.4f}" in out
    # the resolved config records the full model kwargs and the data location
    saved = yaml.safe_load(open(run / "config.yaml"))
    assert saved["model"]["num_feats"] == 8 and saved["model"]["ffn_dilation"] == 2
    best = load_checkpoint(str(run / "best.mge"))
    assert best["megfb"] and best["ema"] is not None and best["val"]["best_score"] == summary["best_score"]
    assert len(best["split"]["val_idx"]) == 2 and best["stats"]["mean"][0] > 0
    # the checkpoint is self-contained: the project's loader rebuilds the model from it
    from megfb.checkpoint import model_from_checkpoint

    model, info = model_from_checkpoint(str(run / "best.mge"))
    assert info["weights"] == "ema" and info["iteration"] == summary["best_iteration"]
    # its data's levels, which `megfb denoise` maps a photo's black and white onto
    from megfb.denoise import model_domain

    black, white = model_domain(info)
    assert white == pytest.approx(65472)  # the contest convention: stats.yaml has no white level
    assert black == pytest.approx(info["stats"]["black_level"] * 65535) and 4096 <= black < white


def _cli(config, *extra):
    return [sys.executable, "-m", "megfb.cli", "train", "--config", config, *extra]


def _wait_for_new_checkpoint(proc, path, old_inode=None, timeout=60):
    """Until `path` exists as a different file than `old_inode` (checkpoints are replaced by rename)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if path.exists() and path.stat().st_ino != old_inode:
            return
        time.sleep(0.02)


# the split variant: the known intermittent failure of the experimental split step (see
# test_split_step_equals_the_one_device_step below; seen again on 2026-12-06, one fresh-clone
# CI run in four, a resumed split run off by up to 7e-3 in one bias)
_SPLIT_RACE = pytest.mark.xfail(strict=False, reason="experimental split step: intermittent cross-device race")


@pytest.mark.parametrize("cpu_devices", [1, pytest.param(2, marks=_SPLIT_RACE)], ids=["one-device", "split"])
def test_sigterm_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, cpu_devices):
    """Ctrl-C, then a power cut, then a resume: the same weights as one uninterrupted run, on
    one device and with the step split over two (megfb/split.py)."""
    config = tiny_config(tmp_path, iterations=24, val_every=12, ckpt_every=4, ema_decay=0.9)
    # The fast paths let MegEngine pick conv kernels by timing (strategy PROFILE), so two
    # processes may run different kernels and drift apart by float rounding; the plain path's
    # kernels are fixed, which makes a resumed run bit-identical to an uninterrupted one.
    cfg = yaml.safe_load(open(config))
    cfg["model"]["fast"] = False
    cfg["train"]["cpu_devices"] = cpu_devices
    open(config, "w").write(yaml.safe_dump(cfg))
    latest = tmp_path / "runs" / "tiny" / "latest.mge"
    # SIGTERM (like Ctrl-C): finish the step, save latest, exit 130
    proc = subprocess.Popen(_cli(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_new_checkpoint(proc, latest)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate()[0]
    assert proc.returncode == 130, out
    termed_at = load_checkpoint(str(latest))["iteration"]
    assert f"interrupted: saved {latest} at iteration {termed_at}" in out
    assert 4 <= termed_at < 24
    # SIGKILL (power cut): no chance to save, the previous checkpoint must do
    proc = subprocess.Popen(_cli(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_new_checkpoint(proc, latest, latest.stat().st_ino)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    snapshot = load_checkpoint(str(latest))
    killed_at = snapshot["iteration"]
    assert termed_at < killed_at < 24

    # what a resumed run loads is exactly the checkpoint (weights, optimizer, EMA, iteration)
    from megfb.model import build_model

    cfg = load_config(config)
    model = build_model(cfg["model"])
    opt = trainer.make_optimizer(cfg["optim"], model.parameters())
    ema, it = trainer.restore(snapshot, model, opt, True, str(latest))
    assert it == killed_at
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, snapshot["model"][key])
        np.testing.assert_array_equal(ema[key], snapshot["ema"][key])
    saved_opt = snapshot["optimizer"]["state"]
    for pid, st in opt.state_dict()["state"].items():
        np.testing.assert_array_equal(st["exp_avg"], saved_opt[pid]["exp_avg"])

    done = subprocess.run(_cli(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout
    assert f"resuming from {latest} at iteration {killed_at}" in done.stdout
    resumed = load_checkpoint(str(latest))
    assert resumed["iteration"] == 24
    log = [yaml.safe_load(line) for line in open(latest.parent / "log.jsonl")]
    assert [r["iteration"] for r in log if "loss" in r] == list(range(1, 25))  # no gap, no duplicate

    straight = trainer.train(load_config(config, ["name=straight"]))
    assert straight["iterations"] == 24
    reference = load_checkpoint(str(tmp_path / "runs" / "straight" / "latest.mge"))
    # resumed == uninterrupted, bit for bit (plain path: fixed CPU kernels, deterministic)
    for key in ("model", "ema"):
        for name, value in reference[key].items():
            np.testing.assert_array_equal(resumed[key][name], value, err_msg=f"{key}.{name}")


def test_truncated_checkpoint_is_refused(tmp_path, capsys):
    config = tiny_config(tmp_path, iterations=5, val_every=5)
    assert cli.main(["train", "--config", config]) == 0
    latest = tmp_path / "runs" / "tiny" / "latest.mge"
    blob = latest.read_bytes()
    latest.write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()
    assert cli.main(["train", "--config", config, "train.iterations=8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("megfb: error: ") and "corrupt or truncated" in err and str(latest) in err
    assert len(err.strip().splitlines()) == 1
    assert len(latest.read_bytes()) == len(blob) // 2  # left for the user to inspect, not overwritten
    # --restart ignores it and trains from scratch
    assert cli.main(["train", "--config", config, "train.iterations=6", "--restart"]) == 0
    assert load_checkpoint(str(latest))["iteration"] == 6


def test_unknown_config_key_and_missing_data(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert cli.main(["train", "--config", config, "train.iteratons=5"]) == 1
    err = capsys.readouterr().err
    assert "unknown config key 'train.iteratons'" in err
    assert cli.main(["train", "--config", config, f"data.dir={tmp_path / 'nothing'}"]) == 1
    err = capsys.readouterr().err
    assert "training data not found" in err and "megfb data synth" in err
    assert not (tmp_path / "runs").exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    # one device: the split step (the CPU default) calls the loss once per share
    config = tiny_config(tmp_path, iterations=12, val_every=100, ckpt_every=4, cpu_devices=1)
    calls = {"n": 0}
    real = trainer.supervised_loss

    def poisoned(outputs, clean, loss_cfg):
        calls["n"] += 1
        total, per_step = real(outputs, clean, loss_cfg)
        return (total * float("nan"), per_step) if calls["n"] == 7 else (total, per_step)

    monkeypatch.setattr(trainer, "supervised_loss", poisoned)
    with pytest.raises(MegfbError, match=r"the loss is nan at iteration 7; .*latest.mge is intact"):
        trainer.train(load_config(config))
    ckpt = load_checkpoint(str(tmp_path / "runs" / "tiny" / "latest.mge"))
    assert ckpt["iteration"] == 4
    assert all(np.isfinite(v).all() for v in ckpt["model"].values())


def _reference_state(tmp_path, model_cfg=None, seed=5):
    """A published-layout state dict with random weights and its own mean/std constants."""
    import megengine as mge

    from megfb.model import build_model

    model = build_model(dict(TINY_MODEL, **(model_cfg or {})), mean=[0.2, 0.3, 0.31, 0.25], std=[0.1, 0.2, 0.21, 0.15])
    rng = np.random.RandomState(seed)
    state = {k: v if k in ("mean", "std") else v + rng.randn(*v.shape).astype(np.float32) * 0.05
             for k, v in model.state_dict().items()}
    path = tmp_path / "published.mge"
    mge.save(state, str(path))
    return str(path), state


def test_init_from_first_forward_equals_the_loaded_model(tmp_path, monkeypatch, capsys):
    import hashlib

    import megengine as mge

    from megfb.model import build_model

    path, state = _reference_state(tmp_path)
    config = tiny_config(tmp_path, iterations=2, val_every=2, cpu_devices=1)  # sees whole batches
    seen = {}
    real_loss, real_batches = trainer.supervised_loss, trainer.train_batches

    def loss(outputs, clean, cfg):
        seen.setdefault("outputs", [o.numpy() for o in outputs])
        return real_loss(outputs, clean, cfg)

    def batches(*args, **kwargs):
        for noisy, clean in real_batches(*args, **kwargs):
            seen.setdefault("noisy", noisy.copy())
            yield noisy, clean

    monkeypatch.setattr(trainer, "supervised_loss", loss)
    monkeypatch.setattr(trainer, "train_batches", batches)
    trainer.train(load_config(config, [f"train.init_from={path}"]))
    assert f"initialised from {path} (state_dict weights" in capsys.readouterr().out
    reference = build_model(TINY_MODEL)
    reference.load_state_dict(state)
    reference.train()
    want = [o.numpy() for o in reference(mge.tensor(seen["noisy"]))]
    for got, ref in zip(seen["outputs"], want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # the run keeps the checkpoint's constants (not the data's) and records the file
    run = tmp_path / "runs" / "tiny"
    ckpt = load_checkpoint(str(run / "latest.mge"))
    np.testing.assert_allclose(ckpt["model"]["mean"], state["mean"])
    np.testing.assert_allclose(ckpt["stats"]["std"], np.ravel(state["std"]), rtol=1e-6)
    saved = yaml.safe_load(open(run / "config.yaml"))["train"]
    assert saved["init_from"] == path
    assert saved["init_from_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    # resuming a fine-tune continues from latest.mge; nothing is loaded again
    trainer.train(load_config(config, [f"train.init_from={path}", "train.iterations=3"]))
    out = capsys.readouterr().out
    assert "resuming from" in out and "initialised from" not in out
    assert yaml.safe_load(open(run / "config.yaml"))["train"]["init_from_sha256"] == saved["init_from_sha256"]


def test_init_from_strict_and_lenient(tmp_path, capsys):
    path, state = _reference_state(tmp_path, {"num_steps": 1})  # no GFM in a one-step model
    config = tiny_config(tmp_path, iterations=1, val_every=1)
    with pytest.raises(MegfbError, match=r"published\.mge: missing key 'block\.GFM\.0\.conv1x1\.bias'"):
        trainer.train(load_config(config, [f"train.init_from={path}"]))
    assert not (tmp_path / "runs" / "tiny" / "latest.mge").exists()
    trainer.train(load_config(config, [f"train.init_from={path}", "train.init_strict=false"]))
    out = capsys.readouterr().out
    assert "not loaded: block.GFM.0.conv1x1.bias, block.GFM.0.conv1x1.weight, block.GFM.1.bias, block.GFM.1.weight" in out
    (tmp_path / "full").mkdir()
    bad = dict(_reference_state(tmp_path / "full")[1])
    bad["block.trans_list.0.ffn.dwconv.weight"] = np.zeros((9, 1, 1, 5, 5), np.float32)
    import megengine as mge

    mge.save(bad, str(tmp_path / "bad.mge"))
    with pytest.raises(MegfbError, match=r"key 'block\.trans_list\.0\.ffn\.dwconv\.weight' has shape \(9, 1, 1, 5, 5\)"):
        trainer.train(load_config(config, [f"train.init_from={tmp_path / 'bad.mge'}", "name=bad"]))
    with pytest.raises(MegfbError, match="not the train.init_from_sha256 ffff"):
        trainer.train(load_config(config, [f"train.init_from={path}", f"train.init_from_sha256={'f' * 64}",
                                           "train.init_strict=false", "name=hash"]))


# The experimental split step (off by default, train.cpu_devices) is known to come out wrong
# now and then: this test failed once in five full-suite runs, and a resumed split run was
# once not bit-identical to an uninterrupted one (a MegEngine cross-device race suspected).
# Until that is explained it is recorded here as a known failure rather than hidden.
@_SPLIT_RACE
@pytest.mark.parametrize("batch", [4, 3])
def test_split_step_equals_the_one_device_step(batch):
    """The batch split over cpu0/cpu1 (megfb/split.py) gives the one-device step's loss,
    gradients and update, and the replica follows the updated weights. (The update is checked
    with SGD: Adam's first step is lr * sign(g), which turns float-rounding noise in a gradient
    that is ~0 into a full step either way, on one device as well.)"""
    import megengine as mge
    from megengine.autodiff import GradManager

    from megfb.losses import supervised_loss
    from megfb.model import build_model
    from megfb.split import SplitStep, shares

    assert shares(3, 2) == [2, 1] and shares(8, 2) == [4, 4] and shares(1, 2) == [1, 0]
    assert shares(8, 2, 1.5) == [5, 3] and shares(4, 2, 1.5) == [2, 2] and shares(7, 3, 1.5) == [3, 2, 2]
    rng = np.random.default_rng(batch)
    noisy = rng.random((batch, 4, 16, 16), dtype=np.float32) * 0.5 + 0.1
    clean = rng.random((batch, 4, 16, 16), dtype=np.float32) * 0.5 + 0.1
    loss_cfg = {"type": "weighted_l1", "steps": "all"}
    from megfb import native

    home = native.INLINE_DEVICE  # the trainer's first device
    results = {}
    for how in ("one", "split"):
        with native.default_device(home):
            mge.random.seed(0)
            model = build_model(TINY_MODEL)
            model.train()
            opt = mge.optimizer.SGD(model.parameters(), lr=0.1)
            if how == "split":
                step = SplitStep(model, [home, "cpu1"])
                loss, per_step = step(noisy, clean, lambda out, gt: supervised_loss(out, gt, loss_cfg))
            else:
                gm = GradManager().attach(model.parameters())
                with gm:
                    loss, per_step = supervised_loss(model(mge.tensor(noisy)), mge.tensor(clean), loss_cfg)
                    gm.backward(loss)
            grads = [p.grad.numpy().copy() for p in model.parameters()]
            opt.step().clear_grad()
            if how == "split":
                step.sync_weights()
                replica = step.replicas[1]
                assert all(str(p.device).startswith("cpu1") for p in replica.parameters())
                for a, b in zip(model.parameters(), replica.parameters()):
                    np.testing.assert_array_equal(a.numpy(), b.numpy())
            results[how] = (float(loss.item()), [float(s.item()) for s in per_step], grads,
                            [p.numpy().copy() for p in model.parameters()])
    one, split = results["one"], results["split"]
    assert split[0] == pytest.approx(one[0], rel=1e-5)
    assert split[1] == pytest.approx(one[1], rel=1e-5)
    for a, b in zip(one[2], split[2]):  # each gradient to 1e-5 of its largest element
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max() + 1e-12)
    for a, b in zip(one[3], split[3]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_training_cpu_devices():
    from megfb.config import DEFAULTS
    from megfb.lite import default_workers
    from megfb.train import training_cpu_devices

    assert training_cpu_devices(DEFAULTS) == ["cpu:default"]  # one device unless asked (experimental split)
    assert len(training_cpu_devices({"model": {"name": "fbrestormer"}, "train": {"cpu_devices": None}})) == default_workers()
    fb = {"name": "fbrestormer"}
    assert training_cpu_devices({"model": fb, "train": {"cpu_devices": 1}}) == ["cpu:default"]
    assert training_cpu_devices({"model": fb, "train": {"cpu_devices": 2}}) == ["cpu:default", "cpu1"]
    for bad in (0, "two", 1.5, True):
        with pytest.raises(MegfbError, match="train.cpu_devices"):
            training_cpu_devices({"model": fb, "train": {"cpu_devices": bad}})
    # architectures whose constants live on the default device only train on one device
    other = {"name": "feedback_model"}
    assert training_cpu_devices({"model": other, "train": {"cpu_devices": None}}) == ["cpu:default"]
    with pytest.raises(MegfbError, match="trains on one device only"):
        training_cpu_devices({"model": other, "train": {"cpu_devices": 2}})
