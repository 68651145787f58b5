"""submit: the parameter-limit refusal before inference, input validation, the zip's
contents, and the dumped graph against the eager model."""
import json
import os
import zipfile

import megengine as mge
import numpy as np
import pytest

from megfb.checkpoint import save_checkpoint
from megfb.cli import main
from megfb.graph import DumpedGraph
from megfb.infer import predict_mosaics
from megfb.io import mosaic_to_packed
from megfb.model import build_model, count_parameters

from helpers import TINY, make_input, write_config  # noqa: E402


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
        graph = DumpedGraph(z.read("model.mge"))
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
    expected = predict_mosaics(model, tiny["noisy"], progress=False)
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


def test_submit_refuses_truncated_input(tiny, tmp_path, capsys):
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(open(tiny["input"], "rb").read()[:-100])
    out = tmp_path / "submit"
    rc = main(["submit", "--ckpt", tiny["ckpt"], "--config", tiny["config"], "--input", str(bad),
               "--out", str(out)])
    assert rc == 1
    assert zips(out) == []
    assert "truncated.bin" in capsys.readouterr().err
