"""The podium networks: parameter counts, the published key layouts (state dicts built here in
those layouts, never the teams' files), loading as published, the teams' input scaling and
output rounding, their ensembles, and every fast path against its plain definition."""
import megengine as mge
import megengine.functional as F
import numpy as np
import pytest

from megfb.checkpoint import detect_architecture, model_from_checkpoint
from megfb.data import dihedral_mosaic_packed, dihedral_mosaic_packed_inverse
from megfb.infer import predict_mosaics, predict_packed
from megfb.io import PUBLISHED_MEAN, PUBLISHED_STD, pack_bayer, packed_to_mosaic, unpack_bayer
from megfb.model import build_model, check_param_limit, count_parameters
from megfb.podium import MultiDilationConv, branch_dilations, pack_mosaic, unpack_mosaic

from test_layers import _perturb, _run, assert_fast_equals_plain

# ------------------------------------------------------------- published layouts (the spec)


def feedback_layout():
    """The 1st place's `ema_model` keys and shapes, written out from shared/spec/podium.md."""
    shapes = {}

    def md(path, weight, bias_channels=None):
        shapes[f"net.{path}.weights"] = (3,)
        shapes[f"net.{path}.op_layer.weight"] = weight
        if bias_channels:
            shapes[f"net.{path}.op_layer.bias"] = (1, bias_channels, 1, 1)

    def conv1x1(path, out, inp):
        shapes[f"net.{path}.weight"] = (out, inp, 1, 1)
        shapes[f"net.{path}.bias"] = (1, out, 1, 1)

    md("pre_conv.0", (32, 4, 5, 5), 32)
    md("pre_conv.1", (32, 1, 1, 5, 5), 32)
    conv1x1("pre_conv.2", 32, 32)
    md("post_conv.0", (32, 1, 1, 5, 5), 32)
    conv1x1("post_conv.1", 32, 32)
    md("post_conv.2", (4, 32, 5, 5), 4)
    for i in range(3):
        md(f"skip_connect_blocks.{i}.dwconv", (32, 1, 1, 3, 3), 32)
        conv1x1(f"skip_connect_blocks.{i}.pwconv", 32, 64)
    for i in range(8):
        b = f"trans_blocks.{i}"
        shapes[f"net.{b}.attn.temperature"] = (4, 1, 1)
        shapes[f"net.{b}.attn.project_out.weight"] = (32, 32, 1, 1)
        shapes[f"net.{b}.attn.qkv.weight"] = (96, 32, 1, 1)
        md(f"{b}.attn.qkv_dwconv", (96, 1, 1, 3, 3))
        md(f"{b}.conv", (32, 1, 1, 5, 5), 32)
        md(f"{b}.ffn.dwconv", (76, 1, 1, 3, 3))
        shapes[f"net.{b}.ffn.project_in.weight"] = (76, 32, 1, 1)
        shapes[f"net.{b}.ffn.project_out.weight"] = (32, 38, 1, 1)
        for n in ("norm1", "norm2"):
            shapes[f"net.{b}.{n}.weight"] = (1, 32, 1, 1)
            shapes[f"net.{b}.{n}.bias"] = (1, 32, 1, 1)
    return shapes


IIL2_LAYOUT = {
    "conv1.0.weight": (58, 1, 3, 3),
    "conv2.0.conv.0.weight": (348, 58, 1, 1), "conv2.0.conv.2.weight": (348, 1, 1, 5, 5),
    "conv2.0.conv.4.weight": (58, 348, 1, 1),
    "conv2.2.conv.0.weight": (348, 58, 1, 1), "conv2.2.conv.2.weight": (348, 1, 1, 5, 5),
    "conv2.2.conv.4.weight": (58, 348, 1, 1),
    "conv3.weight": (1, 58, 3, 3),
}


def _random_state(layout, seed, scale=0.05):
    rng = np.random.RandomState(seed)
    return {k: (rng.randn(*s) * scale).astype(np.float32) for k, s in layout.items()}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, expected", [
    ("feedback_model", 99_553), ("recurrent_mobilenet", 99_180), ("contest_baseline", 93_854)])
def test_parameter_counts_within_the_contest_limit(name, expected):
    model = build_model({"name": name})
    assert count_parameters(model) == expected
    assert check_param_limit(model) == expected


def test_feedback_layout_is_published():
    layout = feedback_layout()
    assert len(layout) == 159
    assert _shapes(build_model({"name": "feedback_model"})) == layout
    # 31 multi-dilation convs, each with its 3 branch coefficients
    assert sum(1 for k in layout if k.endswith(".weights")) == 31


def test_iil2_layout_is_published():
    assert _shapes(build_model({"name": "recurrent_mobilenet"})) == IIL2_LAYOUT
    # the unrolls share the weights: the count does not depend on them
    assert count_parameters(build_model({"name": "recurrent_mobilenet", "unrolls": 3})) == 99_180


def test_branch_dilations_follow_the_search_rule():
    assert [branch_dilations(d) for d in (1, 2, 3, 4)] == [(1, 2), (1, 2, 3), (2, 3, 4), (2, 4, 6)]


# ------------------------------------------------------------------------- loading as published


def test_feedback_training_dict_loads_its_ema_weights(tmp_path):
    ema = _random_state(feedback_layout(), 0)
    raw = _random_state(feedback_layout(), 1)
    path = str(tmp_path / "model_best.pth")
    mge.save({"config": {}, "epoch": 3, "model": raw, "optimizer": {}, "lr_scheduler": {},
              "ema_model": ema}, path)
    model, info = model_from_checkpoint(path)
    assert type(model).__name__ == "FeedbackModel" and info["weights"] == "ema_model"
    got = model.state_dict()
    for key in ema:
        np.testing.assert_array_equal(got[key], ema[key])


def test_iil2_plain_state_dict_is_recognised(tmp_path):
    path = str(tmp_path / "model_megengine.pth")
    mge.save(_random_state(IIL2_LAYOUT, 2), path)
    model, info = model_from_checkpoint(path)
    assert type(model).__name__ == "RecurrentMobileNet" and model.unrolls == 48
    assert info["weights"] == "model"


def test_architecture_from_keys():
    assert detect_architecture(feedback_layout()) == "feedback_model"
    assert detect_architecture(IIL2_LAYOUT) == "recurrent_mobilenet"
    assert detect_architecture(build_model({"name": "contest_baseline"}).state_dict()) == "contest_baseline"
    assert detect_architecture(build_model({}).state_dict()) == "fbrestormer"
    assert detect_architecture({"foo": 1}) is None


# ------------------------------------------------------ the teams' scaling and output conversion


def _iil2_reference(state, mosaic_u16, unrolls):
    """The 2nd place's inference as the spec states it, written independently of podium.py:
    mosaic / 65536, the network, x 65536, clip, astype(uint16) (truncation)."""
    w = {k: mge.tensor(v) for k, v in state.items()}
    leaky = lambda t: F.leaky_relu(t, 0.1)  # noqa: E731

    def mobile(x, p):
        y = leaky(F.conv2d(x, w[p + "0.weight"]))
        y = leaky(F.conv2d(y, w[p + "2.weight"], padding=2, groups=348))
        return x + F.conv2d(y, w[p + "4.weight"])

    x = mge.tensor(mosaic_u16[:, None].astype(np.float32) / 65536.0)
    a = leaky(F.conv2d(x, w["conv1.0.weight"], padding=1))
    h = a
    for _ in range(unrolls):
        h = leaky(mobile(leaky(mobile(h, "conv2.0.conv.")), "conv2.2.conv.")) + a
    y = F.conv2d(h, w["conv3.weight"], padding=1).numpy()[:, 0]
    return (y * 65536).clip(0, 65535).astype(np.uint16)


@pytest.mark.parametrize("fast", [False, True])
def test_iil2_predictions_equal_the_team_formula(fast):
    state = _random_state(IIL2_LAYOUT, 3, scale=0.08)
    model = build_model({"name": "recurrent_mobilenet", "unrolls": 2, "fast": fast})
    model.load_state_dict(state)
    mosaic = np.random.RandomState(4).randint(0, 65535, size=(2, 32, 48)).astype(np.uint16)
    want = _iil2_reference(state, mosaic, unrolls=2)
    got = predict_mosaics(model, mosaic, progress=False)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert (got == want).mean() > 0.99  # truncation, not rounding: nearly all exactly equal
    rounded = packed_to_mosaic(predict_packed(model, mosaic_to_packed_f(mosaic), progress=False))
    inside = (want > 0) & (want < 65535)
    assert inside.mean() > 0.5
    assert (rounded != want)[inside].mean() > 0.3  # the contest's rounding would differ often


def mosaic_to_packed_f(mosaic):
    return pack_bayer(mosaic.astype(np.float32)) / np.float32(65535)


def test_floor_rounding_truncates():
    y = np.full((1, 4, 2, 2), 1000.7 / 65535, dtype=np.float32)
    assert packed_to_mosaic(y).max() == 1001 and packed_to_mosaic(y, "floor").max() == 1000
    y[:] = 2.0  # clipped first
    assert packed_to_mosaic(y, "floor").min() == 65535
    with pytest.raises(ValueError):
        packed_to_mosaic(y, "ceil")


def test_feedback_standardises_with_the_published_constants():
    model = build_model({"name": "feedback_model"}, mean=[0.5] * 4, std=[2.0] * 4)
    np.testing.assert_allclose(model.mean.numpy().ravel(), PUBLISHED_MEAN)
    np.testing.assert_allclose(model.std.numpy().ravel(), PUBLISHED_STD)
    # a zeroed last conv leaves the residual: out = ((x - mean)/std) * std + mean = x
    model.net.post_conv[2].op_layer.weight[:] = 0
    model.net.post_conv[2].op_layer.bias[:] = 0
    model.eval()
    x = np.random.RandomState(5).rand(1, 4, 12, 12).astype(np.float32)
    np.testing.assert_allclose(model(mge.tensor(x)).numpy(), x, rtol=1e-5, atol=1e-6)


def test_contest_baseline_scales_by_65536():
    model = build_model({"name": "contest_baseline"})
    x = np.random.RandomState(6).rand(1, 4, 8, 8).astype(np.float32)
    first = model.net[0]
    want = F.leaky_relu(F.conv2d(mge.tensor(x * 65535 / 65536), first.weight, first.bias, padding=1),
                        0.125).numpy()
    np.testing.assert_allclose(model.net[1](first(mge.tensor(x * 65535 / 65536))).numpy(), want,
                               rtol=1e-5, atol=1e-7)


def test_unpack_pack_mosaic_match_io():
    x = np.random.RandomState(7).rand(2, 4, 3, 5).astype(np.float32)
    np.testing.assert_array_equal(unpack_mosaic(mge.tensor(x)).numpy()[:, 0], unpack_bayer(x))
    np.testing.assert_array_equal(pack_mosaic(unpack_mosaic(mge.tensor(x))).numpy(), x)


def _close(a, b, what, rtol):
    err = np.abs(a - b).max() / max(np.abs(a).max(), 1e-6)
    assert err <= rtol, f"{what}: relative error {err:.2e}"


# --------------------------------------------------------------------------- the ensembles


def test_mosaic_dihedral_inverse_and_transposes_the_mosaic():
    x = np.random.RandomState(8).rand(2, 4, 6, 6).astype(np.float32)
    for k in range(8):
        np.testing.assert_array_equal(dihedral_mosaic_packed_inverse(dihedral_mosaic_packed(x, k), k), x)
    m = unpack_bayer(x)
    np.testing.assert_array_equal(unpack_bayer(dihedral_mosaic_packed(x, 1)), np.rot90(m, 1, axes=(-2, -1)))
    np.testing.assert_array_equal(unpack_bayer(dihedral_mosaic_packed(x, 4)), m[..., ::-1])


class _PhaseRamp:
    """Not flip-equivariant: adds a different constant to each packed plane."""

    training = False
    ensemble = "mosaic"

    def __call__(self, x):
        return x + mge.tensor(np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1))

    def eval(self):
        pass

    def train(self, mode=True):
        pass


def test_tta_true_takes_the_models_own_ensemble():
    x = np.random.RandomState(9).rand(1, 4, 4, 4).astype(np.float32)
    model = _PhaseRamp()
    own = predict_packed(model, x, tta=True, progress=False, engine="mge")
    mosaic = predict_packed(model, x, tta="mosaic", progress=False, engine="mge")
    cfa = predict_packed(model, x, tta="cfa", progress=False, engine="mge")
    np.testing.assert_array_equal(own, mosaic)
    # by hand: the mosaic flips move the ramp's planes, the CFA-preserving ones keep them
    want = sum(dihedral_mosaic_packed_inverse(model(mge.tensor(dihedral_mosaic_packed(x, k))).numpy(), k)
               for k in range(8)) / 8
    np.testing.assert_allclose(mosaic, want, rtol=1e-6)
    np.testing.assert_allclose(cfa[:, 0] - x[:, 0], 0, atol=1e-6)
    assert np.abs(mosaic - cfa).max() > 0.5
    assert build_model({"name": "recurrent_mobilenet", "unrolls": 1}).ensemble == "mosaic"
    assert build_model({"name": "feedback_model"}).ensemble == "cfa"


# ---------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("k, d, depthwise", [
    (5, 1, False), (5, 2, False), (5, 1, True), (5, 2, True), (5, 3, True), (5, 4, True),
    (3, 1, True), (3, 2, True)])
def test_multi_dilation_conv_fast_equals_plain(k, d, depthwise):
    conv = _perturb(MultiDilationConv(6, 6 if depthwise else 5, k, d, depthwise=depthwise))
    conv.weights[:] = mge.tensor(np.array([0.4, -1.3, 0.8], dtype=np.float32))
    x = np.random.RandomState(10).randn(2, 6, 13, 14).astype(np.float32)  # sizes not multiples of 2
    conv.train()
    assert_fast_equals_plain(conv, x)
    conv.eval()
    conv.fast = False
    plain = conv(mge.tensor(x)).numpy()
    conv.fast = True
    np.testing.assert_allclose(conv(mge.tensor(x)).numpy(), plain, rtol=1e-5, atol=1e-5)


def test_multi_dilation_conv_is_the_branch_formula():
    conv = _perturb(MultiDilationConv(3, 3, 3, 2, depthwise=True), scale=0.5)
    conv.weights[:] = mge.tensor(np.array([1.0, -2.0, 1.0], dtype=np.float32))
    x = np.random.RandomState(11).randn(1, 3, 9, 9).astype(np.float32)
    w, b = conv.op_layer.weight, conv.op_layer.bias
    want = sum(a * F.conv2d(mge.tensor(x), w, b, padding=r, dilation=r, groups=3).numpy()
               for a, r in zip((0.25, 0.5, 0.25), (1, 2, 3)))
    conv.eval()
    for fast in (False, True):
        conv.fast = fast
        np.testing.assert_allclose(conv(mge.tensor(x)).numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, cfg", [
    ("feedback_model", {}), ("recurrent_mobilenet", {"unrolls": 2, "channels": 6, "expanded": 12}),
    ("contest_baseline", {"width": 6})])
def test_whole_model_fast_equals_plain(name, cfg):
    model = _perturb(build_model({"name": name, **cfg}), scale=0.05)
    x = np.random.RandomState(12).rand(1, 4, 12, 12).astype(np.float32)
    model.train()
    outs_plain, grads_plain = _run(model, x, fast=False)
    outs_fast, grads_fast = _run(model, x, fast=True)
    _close(outs_plain[0], outs_fast[0], "output", 1e-5)
    # 1e-4 for the gradients: the branch coefficients' gradients are differences of nearly
    # equal terms (the coefficients sum to 1) accumulated through 8 blocks in float32
    for key in grads_plain:
        _close(grads_plain[key], grads_fast[key], f"gradient of {key}", 1e-4)
    model.eval()
    from megfb.layers import set_fast

    set_fast(model, False)
    plain = model(mge.tensor(x)).numpy()
    set_fast(model, True)
    np.testing.assert_allclose(model(mge.tensor(x)).numpy(), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("slope", [0.1, 0.125])
def test_leaky_relu_fast_equals_plain(slope):
    from megfb.layers import LeakyReLU

    x = np.random.RandomState(13).randn(2, 5, 7, 7).astype(np.float32)
    layer = LeakyReLU(slope)
    layer.train()
    assert_fast_equals_plain(layer, x)


# ------------------------------------------------------------------ the teams' training recipes


def test_linear_schedule_decays_to_zero():
    from megfb.train import learning_rate

    sched = {"type": "linear", "warmup": 0}
    assert [learning_rate(sched, 2e-4, it, 100) for it in (0, 50, 100)] == pytest.approx([2e-4, 1e-4, 0.0])


def test_mosaic_augmentation_flips_the_mosaic(tmp_path):
    from megfb.data import TrainBatches, make_batch
    from megfb.io import write_bin

    rng = np.random.RandomState(14)
    noisy = rng.randint(0, 60000, size=(2, 256, 256)).astype(np.uint16)
    write_bin(tmp_path / "n.bin", noisy)
    write_bin(tmp_path / "c.bin", noisy)
    files = TrainBatches(str(tmp_path / "n.bin"), str(tmp_path / "c.bin"), np.arange(2), 16, 4,
                         augment="mosaic").files
    a, _ = make_batch(files, np.arange(2), 16, 64, "mosaic", 0, 0)
    b, _ = make_batch(files, np.arange(2), 16, 64, False, 0, 0)
    # same picks and offsets: each mosaic crop is one of the 8 flips of the unaugmented one
    for x, y in zip(a, b):
        assert any(np.array_equal(x, dihedral_mosaic_packed(y, k)) for k in range(8))
    cfa = make_batch(files, np.arange(2), 16, 64, True, 0, 0)[0]
    assert not all(np.array_equal(x, y) for x, y in zip(a, cfa))


def test_augment_config_is_checked():
    from megfb.config import load_config
    from megfb.errors import MegfbError

    assert load_config(None, ["data.augment=mosaic"])["data"]["augment"] == "mosaic"
    with pytest.raises(MegfbError, match="data.augment"):
        load_config(None, ["data.augment=sideways"])


@pytest.mark.parametrize("recipe, model_overrides", [
    ("contest_baseline.yaml", {"width": 8}),
    ("feedback_model_cpu.yaml", {}),
    ("recurrent_mobilenet_cpu.yaml", {"unrolls": 1, "channels": 6, "expanded": 12}),
])
def test_podium_recipes_train_and_reload(tmp_path, recipe, model_overrides):
    """Each team's recipe file runs through the one trainer (shrunk here to a few steps on tiny
    data) and its checkpoint reloads as the team's architecture."""
    import json
    import os

    import yaml

    from megfb import train as trainer
    from megfb.checkpoint import model_from_checkpoint
    from megfb.config import load_config
    from test_train import ROOT, write_tiny_data

    write_tiny_data(tmp_path / "data", n=6)
    base = load_config(os.path.join(ROOT, "configs", "podium", recipe))
    cfg = {"base": os.path.join(ROOT, "configs", "podium", recipe), "name": "tiny",
           "out_dir": str(tmp_path / "runs"),
           "data": {"dir": str(tmp_path / "data"), "crop": 32, "batch_size": 2, "workers": 0,
                    "val_fraction": 0.34, "val_patches": 1, "train_on_all": False},
           "model": {"name": base["model"]["name"], **model_overrides},
           "train": {"iterations": 4, "val_every": 4, "log_every": 1, "ckpt_every": 2,
                     "preview_crops": 1}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    resolved = load_config(str(tmp_path / "tiny.yaml"))
    assert resolved["schedule"]["type"] == base["schedule"]["type"]
    assert resolved["loss"]["type"] == base["loss"]["type"]
    assert resolved["data"]["augment"] == base["data"]["augment"]
    summary = trainer.train(resolved)
    assert np.isfinite(summary["best_score"])
    model, info = model_from_checkpoint(str(tmp_path / "runs" / "tiny" / "best.mge"))
    assert info["config"]["model"]["name"] == base["model"]["name"]
    assert type(model) is type(build_model({"name": base["model"]["name"]}))
    records = [json.loads(line) for line in open(tmp_path / "runs" / "tiny" / "log.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    if base["schedule"]["type"] == "linear":  # the recipe's decay reaches 0 at the last step
        lrs = [r["lr"] for r in records if "lr" in r]
        assert lrs[0] == pytest.approx(base["optim"]["lr"], rel=1e-6)
        assert lrs[-1] == pytest.approx(base["optim"]["lr"] / 4, rel=1e-6)


def test_cli_predict_takes_the_published_training_dict(tmp_path, capsys):
    from megfb.cli import build_parser, main
    from megfb.io import read_bin, write_bin

    path = str(tmp_path / "model_best.pth")
    mge.save({"model": _random_state(feedback_layout(), 1), "epoch": 1,
              "ema_model": _random_state(feedback_layout(), 0, scale=0.02)}, path)
    raw = np.random.RandomState(15).randint(4000, 20000, size=(1, 256, 256)).astype(np.uint16)
    write_bin(tmp_path / "in.bin", raw)
    assert main(["predict", "--ckpt", path, "--input", str(tmp_path / "in.bin"),
                 "--output", str(tmp_path / "out.bin")]) == 0
    assert "ema_model weights" in capsys.readouterr().out
    model, _ = model_from_checkpoint(path)
    np.testing.assert_array_equal(read_bin(tmp_path / "out.bin"), predict_mosaics(model, raw, progress=False))
    # --tta alone: the model's own ensemble; or named
    parse = build_parser().parse_args
    common = ["predict", "--ckpt", path, "--input", "a", "--output", "b"]
    assert parse(common + ["--tta"]).tta is True
    assert parse(common + ["--tta", "mosaic"]).tta == "mosaic"
    assert parse(common).tta is False


def test_params_report_skips_the_module_stats_check_for_functional_convs():
    from megfb.costs import model_report

    report = model_report(build_model({"name": "feedback_model"}), timing=False)
    assert report["params"] == 99_553 and report["module_stats_conv_macs"] is None
    assert report["plain"]["macs"] > report["plain"]["conv_macs"] > 0
