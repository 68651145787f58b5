"""eval / params / submit: the parameter-limit refusal, input validation, the zip's contents,
the dumped graph against the eager model, and the MAC count against a hand formula."""
import json
import os
import zipfile

import megengine as mge
import megengine.functional as F
import megengine.module as M
import numpy as np
import pytest
import yaml

from megfb import submit
from megfb.checkpoint import save_checkpoint
from megfb.cli import main
from megfb.errors import MegfbError
from megfb.io import mosaic_to_packed
from megfb.metrics import contest_score
from megfb.model import build_model, count_parameters

TINY = {"name": "fbrestormer", "num_feats": 8, "heads": 2, "num_blocks": 3, "num_steps": 2}


def write_config(path, model_cfg, **extra):
    path.write_text(yaml.safe_dump({"model": model_cfg, **extra}))
    return str(path)


def make_input(path, n=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(2000, 60000, size=(n, 256, 256)).astype("<u2")
    x.tofile(path)
    return x


@pytest.fixture
def tiny(tmp_path):
    """A tiny FBRestormer saved as a plain state dict, its config, and a 2-patch test input."""
    mge.random.seed(0)
    model = build_model(TINY)
    ckpt = tmp_path / "tiny.mge"
    save_checkpoint(model.state_dict(), str(ckpt))
    cfg = write_config(tmp_path / "tiny.yaml", TINY)
    inp = tmp_path / "test_input.bin"
    noisy = make_input(inp)
    return {"ckpt": str(ckpt), "config": cfg, "input": str(inp), "noisy": noisy, "model": model}


def zips(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_submit_zip_members_and_graph(tiny, tmp_path):
    out = tmp_path / "submit"
    rc = main(["submit", "--ckpt", tiny["ckpt"], "--config", tiny["config"], "--input", tiny["input"],
               "--out", str(out), "--batch-size", "2"])
    assert rc == 0
    names = zips(out)
    assert len(names) == 1 and names[0].startswith("tiny-") and names[0].endswith(".zip")  # nothing else left
    with zipfile.ZipFile(out / names[0]) as z:
        assert sorted(z.namelist()) == ["manifest.json", "model.mge", "result.bin"]
        assert z.testzip() is None
        result = np.frombuffer(z.read("result.bin"), dtype="<u2")
        manifest = json.loads(z.read("manifest.json"))
        graph = submit.DumpedGraph(z.read("model.mge"))
    assert result.size == 2 * 256 * 256
    import hashlib

    assert manifest["result_sha256"] == hashlib.sha256(result.tobytes()).hexdigest()
    assert manifest["result_shape"] == [2, 256, 256]
    assert manifest["trainable_parameters"] == count_parameters(tiny["model"])
    assert manifest["validation_score"] is None and manifest["tta"] is False
    assert manifest["checkpoint_kind"] == "state_dict"
    # result.bin is the eager model's prediction, rounded as the contest stores it
    model = tiny["model"]
    model.eval()
    expected = submit.predict_mosaics(model, tiny["noisy"], progress=False)
    # Eval-mode convs pick MegEngine kernels by timing, and two equally exact kernels can
    # round the last float bit differently: a few values may land 1 DN apart, never more.
    diff = np.abs(result.reshape(2, 256, 256).astype(np.int64) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # the dumped graph, loaded back, reproduces the eager output
    x = mosaic_to_packed(tiny["noisy"])
    eager = model(mge.tensor(x)).numpy()
    for i in range(2):  # the graph takes one patch at a time, the contest's inference shape
        assert np.abs(graph(x[i:i + 1]) - eager[i:i + 1]).max() < 1e-4
    assert manifest["graph_input"]["shape"] == [1, 4, 128, 128]


def test_submit_refuses_model_over_limit_before_inference(tmp_path, monkeypatch):
    big = {"name": "fbrestormer", "num_feats": 48, "heads": 4}
    model = build_model(big)
    assert count_parameters(model) > 100_000
    ckpt = tmp_path / "big.mge"
    save_checkpoint(model.state_dict(), str(ckpt))
    cfg = write_config(tmp_path / "big.yaml", big)
    inp = tmp_path / "in.bin"
    make_input(inp)

    def no_inference(*a, **k):
        raise AssertionError("inference ran before the parameter check")

    monkeypatch.setattr("megfb.infer.predict_packed", no_inference)
    out = tmp_path / "submit"
    assert main(["submit", "--config", cfg, "--ckpt", str(ckpt), "--input", str(inp), "--out", str(out)]) == 1
    assert zips(out) == []
    assert main(["params", "--config", cfg, "--no-timing"]) == 1


def test_params_over_limit_message(tmp_path, capsys):
    cfg = write_config(tmp_path / "big.yaml", {"name": "fbrestormer", "num_feats": 48, "heads": 4})
    n = count_parameters(build_model({"name": "fbrestormer", "num_feats": 48, "heads": 4}))
    assert main(["params", "--config", cfg, "--no-timing"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megfb: error: model has {n:,} trainable parameters, over the contest limit of 100,000"]


def test_submit_refuses_truncated_input(tiny, tmp_path, capsys):
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(open(tiny["input"], "rb").read()[:-100])
    out = tmp_path / "submit"
    rc = main(["submit", "--ckpt", tiny["ckpt"], "--config", tiny["config"], "--input", str(bad),
               "--out", str(out)])
    assert rc == 1
    assert zips(out) == []
    assert "truncated.bin" in capsys.readouterr().err


def test_default_checkpoint_is_newest_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["submit"]) == 1
    assert "no trained run under runs/: run `make train` or pass --ckpt" in capsys.readouterr().err
    for i, name in enumerate(["old", "new"]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "best.mge").write_bytes(b"x")
        os.utime(tmp_path / "runs" / name / "best.mge", (1000 + i, 1000 + i))
    assert submit.newest_run_checkpoint("runs") == os.path.join("runs", "new", "best.mge")


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


def test_mac_count_matches_hand_formula():
    """FBRestormer MACs per packed pixel, counted by hand from the spec (eval: the last step's
    output head only): conv_in 5024; per step 7 blocks x (10508 conv + 512 attention matmul)
    + 3 skip fusions x 2336; GFM 7168 at step 2; conv_out 5024."""
    model = build_model({"name": "fbrestormer"})
    model.eval()
    hw = 16 * 16
    per_pixel = 5024 + 2 * (7 * (10508 + 512) + 3 * 2336) + 7168 + 5024
    from megfb.layers import set_fast

    set_fast(model, False)
    plain = submit.graph_costs(submit.export_graph_bytes(model, (1, 4, 16, 16)))
    assert plain["macs"] == per_pixel * hw == 185512 * hw
    assert plain["matmul_macs"] == 2 * 7 * 512 * hw
    assert plain["flops"] == 2 * plain["macs"]
    # module_stats (hooks Conv2d modules; eager forward computes every step's output head)
    every = submit.graph_costs(submit.export_graph_bytes(model, (1, 4, 16, 16), all_steps=True))
    assert every["conv_macs"] == submit.module_stats_conv_macs(model, (1, 4, 16, 16))
    assert every["conv_macs"] - plain["conv_macs"] == 5024 * hw
    # the fast eval path, per block: attn @ v (256 per pixel) is folded into project_out's
    # weight (one 32x32x32 product), plus the (c/h x 1)(1 x c/h) outer products of the q/k
    # norms, LayerNorm's bias through qkv and project_in (96x32 + 76x32), and the one-hot
    # stride-2 conv that moves the pixels into phases (128 outputs x 4 taps per half-res pixel)
    set_fast(model, True)
    fast = submit.graph_costs(submit.export_graph_bytes(model, (1, 4, 16, 16)))
    per_block = -256 * hw + 32 ** 3 + 4 * 8 * 8 + (96 + 76) * 32 + 128 * (hw // 4) * 4
    assert fast["macs"] == plain["macs"] + 2 * 7 * per_block


def test_graph_costs_toy_exact():
    class Toy(M.Module):
        def __init__(self):
            super().__init__()
            self.conv = M.Conv2d(4, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x).reshape(1, 8, 256)
            return F.matmul(y, y, transpose_b=True)

    costs = submit.graph_costs(submit.export_graph_bytes(Toy(), (1, 4, 16, 16)))
    assert costs["conv_macs"] == 8 * 256 * 4 * 9
    assert costs["matmul_macs"] == 8 * 8 * 256
    assert costs["activations"] == 8 * 256 + 8 * 8
    assert costs["peak_bytes"] >= 4 * (4 * 256 + 8 * 256)


def test_parameter_table_and_constants():
    model = build_model({"name": "fbrestormer"})
    rows = dict((name, n) for name, n, _ in submit.parameter_table(model))
    assert rows["conv_in"] + rows["block"] + rows["conv_out"] == count_parameters(model) == 99_156
    assert rows["block.trans_list"] == 7 * 10_640
    const = dict(submit.constant_buffers(model))
    assert sorted(const) == ["mean", "std"] and const["mean"].shape == (1, 4, 1, 1)


def test_params_report_tiny_shape():
    model = build_model(TINY)
    report = submit.model_report(model, timing=True, side=8)
    assert report["params"] == count_parameters(model)
    assert report["module_stats_conv_macs"] == report["plain_all_steps"]["conv_macs"]
    assert report["eager_s"] > 0 and report["graph_s"] > 0
    assert all(m.fast for m in model.modules() if hasattr(m, "fast"))  # paths restored
