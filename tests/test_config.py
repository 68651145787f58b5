"""Every bad config value is one line before anything is created (issue 12, item 3)."""
import os
import subprocess

import pytest

from megfb import cli
from megfb.config import DEFAULTS, load_config
from megfb.errors import MegfbError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text", ["1e-4", "5e-4", "1.0e30", "1E-3", "-2e-1"])
def test_exponent_floats_are_numbers(tmp_path, text):
    cfg = load_config(None, [f"optim.lr={text}".replace("=-", "=")])
    assert cfg["optim"]["lr"] == pytest.approx(abs(float(text)))
    path = tmp_path / "c.yaml"
    path.write_text(f"optim: {{lr: {text.lstrip('-')}}}\nschedule: {{min_lr: 1e-9}}\n")
    cfg = load_config(str(path))
    assert isinstance(cfg["optim"]["lr"], float) and cfg["schedule"]["min_lr"] == 1e-9


@pytest.mark.parametrize("override, key", [
    ("train.iterations=ten", "train.iterations"), ("optim.lr=-1", "optim.lr"),
    ("data.batch_size=0", "data.batch_size"), ("data.batch_size=-2", "data.batch_size"),
    ("data.val_fraction=abc", "data.val_fraction"), ("data.val_fraction=0", "data.val_fraction"),
    ("train.val_every=0", "train.val_every"), ("train.log_every=0", "train.log_every"),
    ("train.ckpt_every=0", "train.ckpt_every"), ("data.val_patches=-1", "data.val_patches"),
    ("data.workers=-1", "data.workers"), ("optim.lr=.nan", "optim.lr"), ("data.augment=maybe", "data.augment"),
    ("train.ema_decay=1.5", "train.ema_decay"), ("optim.betas=[0.9]", "optim.betas"),
    ("train.init_from=[a, b]", "train.init_from"), ("train.init_from_sha256=abc", "train.init_from_sha256"),
    ("train.init_strict=yes please", "train.init_strict"), ("name=a/b", "name"),
    ("train.progressive=[{until: 0}]", "train.progressive"), ("schedule.step_size=0", "schedule.step_size"),
])
def test_bad_values_are_one_line_and_nothing_is_created(tmp_path, capsys, override, key):
    out_dir = tmp_path / "runs"
    assert cli.main(["train", "--config", os.path.join(ROOT, "configs", "quickstart.yaml"),
                     f"out_dir={out_dir}", f"data.dir={tmp_path / 'data'}", override]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"megfb: error: config key '{key}' must be ") and len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists() and not (tmp_path / "data").exists()


def test_every_default_passes_its_rule_and_every_leaf_has_one():
    from megfb.config import RULES

    load_config(None)  # the defaults themselves pass
    leaves = {f"{s}.{k}" for s, v in DEFAULTS.items() if isinstance(v, dict) and s != "model" for k in v}
    leaves |= {k for k, v in DEFAULTS.items() if not isinstance(v, dict)}
    assert leaves == set(RULES)


@pytest.mark.parametrize("content, words", [
    ("base: 5\n", "'base' must be the path of another config file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not a text file"),
    ("train: [1, 2]\n", "must be a mapping"),
])
def test_bad_config_files(tmp_path, capsys, content, words):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MegfbError, match=words):
        load_config(str(path))
    assert cli.main(["train", "--config", str(path), "--check-config"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_check_config(tmp_path, capsys):
    good = os.path.join(ROOT, "configs", "quickstart.yaml")
    assert cli.main(["train", "--config", good, "--check-config", f"out_dir={tmp_path}"]) == 0
    assert "every key valid" in capsys.readouterr().out and os.listdir(tmp_path) == []
    assert cli.main(["train", "--config", str(tmp_path / "typo.yaml"), "--check-config"]) == 1
    assert "config file not found" in capsys.readouterr().err
    assert cli.main(["train", "--config", good, "--check-config", "model.num_feats=abc"]) == 1


def test_make_train_checks_the_config_before_generating_data():
    out = subprocess.run(["make", "-n", "train", "CONFIG=typo.yaml", "STAMP=Makefile"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    check = next(i for i, line in enumerate(out) if "--check-config" in line and "typo.yaml" in line)
    synth = next(i for i, line in enumerate(out) if "data synth" in line)
    assert check < synth


def test_text_keys_keep_what_was_typed():
    digits = "1" * 64
    cfg = load_config(None, ["name=2024", f"train.init_from_sha256={digits}", "data.dir=007"])
    assert cfg["name"] == "2024" and cfg["train"]["init_from_sha256"] == digits and cfg["data"]["dir"] == "007"
    assert load_config(None, ["train.init_from_sha256=null"])["train"]["init_from_sha256"] is None
