"""FBRestormer: exact parameter counts, the published layout, save/load, config errors."""
import megengine as mge
import numpy as np
import pytest

from megfb.checkpoint import load_weights
from megfb.errors import MegfbError
from megfb.model import (PUBLISHED_MEAN, PUBLISHED_STD, build_model, count_parameters,
                         resolve_model_config)

# The published feedback_restormer.mge layout (shared/spec/fbrestormer.md), written out by hand.
SPEC_SHAPES = {
    "mean": (1, 4, 1, 1), "std": (1, 4, 1, 1),
    "conv_in.0.weight": (32, 4, 5, 5), "conv_in.0.bias": (1, 32, 1, 1),
    "conv_in.1.weight": (32, 1, 1, 5, 5), "conv_in.1.bias": (1, 32, 1, 1),
    "conv_in.2.weight": (32, 32, 1, 1), "conv_in.2.bias": (1, 32, 1, 1),
    "conv_out.0.weight": (32, 1, 1, 5, 5), "conv_out.0.bias": (1, 32, 1, 1),
    "conv_out.1.weight": (32, 32, 1, 1), "conv_out.1.bias": (1, 32, 1, 1),
    "conv_out.2.weight": (4, 32, 5, 5), "conv_out.2.bias": (1, 4, 1, 1),
    "block.GFM.0.conv1x1.weight": (64, 96, 1, 1), "block.GFM.0.conv1x1.bias": (1, 64, 1, 1),
    "block.GFM.1.weight": (32, 32, 1, 1), "block.GFM.1.bias": (1, 32, 1, 1),
}
for _i in range(3):
    SPEC_SHAPES.update({
        f"block.skip_blocks.{_i}.pwconv.weight": (32, 64, 1, 1),
        f"block.skip_blocks.{_i}.pwconv.bias": (1, 32, 1, 1),
        f"block.skip_blocks.{_i}.dwconv.weight": (32, 1, 1, 3, 3),
        f"block.skip_blocks.{_i}.dwconv.bias": (1, 32, 1, 1),
    })
for _i in range(7):
    _p = f"block.trans_list.{_i}."
    SPEC_SHAPES.update({
        _p + "norm1.weight": (1, 32, 1, 1), _p + "norm1.bias": (1, 32, 1, 1),
        _p + "norm2.weight": (1, 32, 1, 1), _p + "norm2.bias": (1, 32, 1, 1),
        _p + "attn.temperature": (4, 1, 1),
        _p + "attn.qkv.weight": (96, 32, 1, 1),
        _p + "attn.qkv_dwconv.weight": (96, 1, 1, 3, 3),
        _p + "attn.project_out.weight": (32, 32, 1, 1),
        _p + "ffn.project_in.weight": (76, 32, 1, 1),
        _p + "ffn.dwconv.weight": (76, 1, 1, 5, 5),
        _p + "ffn.project_out.weight": (32, 38, 1, 1),
    })


def _x(b=2, h=16, w=16, seed=0):
    return mge.tensor(np.random.RandomState(seed).rand(b, 4, h, w).astype(np.float32) * 0.3)


def _randomise(model, seed=1):
    """Non-trivial weights (fresh models have all-ones temperatures etc.)."""
    rng = np.random.RandomState(seed)
    state = {k: v + rng.randn(*v.shape).astype(np.float32) * 0.05 if k not in ("mean", "std") else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("cfg, expected", [
    ({}, 99_156),
    ({"num_reroute_feats": 1}, 95_060),
    ({"num_reroute_feats": 2}, 97_108),
    ({"num_reroute_feats": 3}, 99_156),
    ({"num_steps": 1}, 91_892),
    ({"num_steps": 3}, 99_156),
    ({"ffn_kernel": 3, "ffn_dilation": 1}, 90_644),
    ({"reroute": "bottom"}, 99_156),
    ({"step_input": False}, 99_156),
])
def test_parameter_counts(cfg, expected):
    assert count_parameters(build_model(cfg)) == expected


def test_state_dict_is_the_published_layout():
    model = build_model({})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == SPEC_SHAPES
    # mean/std are stored constants, not trained parameters
    assert len(SPEC_SHAPES) - 2 == len(list(model.parameters()))
    np.testing.assert_allclose(model.state_dict()["mean"].ravel(), PUBLISHED_MEAN)
    np.testing.assert_allclose(model.state_dict()["std"].ravel(), PUBLISHED_STD)


def test_single_step_model_has_no_gfm():
    keys = build_model({"num_steps": 1}).state_dict()
    assert not [k for k in keys if "GFM" in k]
    assert len(keys) == len(SPEC_SHAPES) - 4


def test_train_returns_every_step_eval_the_last():
    model = _randomise(build_model({"num_steps": 3}))
    x = _x()
    model.train()
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == (2, 4, 16, 16) for o in outs)
    assert np.abs(outs[0].numpy() - outs[2].numpy()).max() > 1e-4  # the feedback changes the output
    model.eval()
    last = model(x)
    assert isinstance(last, mge.Tensor) and last.shape == (2, 4, 16, 16)
    np.testing.assert_allclose(last.numpy(), outs[-1].numpy(), rtol=1e-5, atol=1e-6)


def test_output_is_destandardised_residual():
    # a zeroed final conv makes every step the identity: out = ((x-mean)/std)*std + mean = x
    model = build_model({}, mean=[0.1, 0.2, 0.3, 0.4], std=[0.5, 0.6, 0.7, 0.8])
    model.conv_out[2].weight[:] = 0
    model.conv_out[2].bias[:] = 0
    model.eval()
    x = _x()
    np.testing.assert_allclose(model(x).numpy(), x.numpy(), rtol=1e-5, atol=1e-6)


def test_save_load_strict_round_trip(tmp_path):
    model = _randomise(build_model({}, mean=[0.1] * 4, std=[0.2] * 4))
    model.eval()
    x = _x()
    path = str(tmp_path / "w.mge")
    mge.save(model.state_dict(), path)
    fresh = build_model({})
    load_weights(fresh, mge.load(path), path)
    fresh.eval()
    np.testing.assert_allclose(fresh.state_dict()["mean"].ravel(), [0.1] * 4)
    np.testing.assert_array_equal(fresh(x).numpy(), model(x).numpy())


def test_variants_run_and_differ():
    # the same random weights under each wiring: rerouting and step input change the output
    x = _x(1, 8, 8)
    outs = {}
    variants = {"top": {}, "bottom": {"reroute": "bottom"}, "nostep": {"step_input": False},
                "r1": {"num_reroute_feats": 1}, "orig_ffn": {"ffn_kernel": 3, "ffn_dilation": 1}}
    for name, cfg in variants.items():
        model = _randomise(build_model(cfg), 1)
        model.eval()
        outs[name] = model(x).numpy()
        assert outs[name].shape == (1, 4, 8, 8) and np.isfinite(outs[name]).all()
    assert np.abs(outs["top"] - outs["bottom"]).max() > 1e-5
    assert np.abs(outs["top"] - outs["nostep"]).max() > 1e-5


def test_odd_sizes_work():
    model = build_model({})
    model.eval()
    assert model(_x(1, 7, 9)).shape == (1, 4, 7, 9)


def test_wrong_shape_and_missing_key_are_named(tmp_path):
    model = build_model({})
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    bad = dict(state)
    bad["block.trans_list.3.ffn.dwconv.weight"] = np.zeros((76, 1, 1, 3, 3), np.float32)
    with pytest.raises(MegfbError, match=r"block\.trans_list\.3\.ffn\.dwconv\.weight"):
        load_weights(build_model({}), bad, "bad.mge")
    missing = dict(state)
    del missing["block.GFM.1.bias"]
    with pytest.raises(MegfbError, match=r"block\.GFM\.1\.bias"):
        load_weights(build_model({}), missing, "missing.mge")


def test_config_errors_name_the_key():
    with pytest.raises(MegfbError, match=r"'model\.num_feets'"):
        build_model({"num_feets": 16})
    with pytest.raises(MegfbError, match=r"'model\.name'"):
        build_model({"name": "unet"})
    with pytest.raises(MegfbError, match=r"'model\.reroute'"):
        build_model({"reroute": "middle"})
    with pytest.raises(MegfbError, match=r"'model\.num_steps'"):
        build_model({"num_steps": 0})
    with pytest.raises(MegfbError, match=r"'model\.fast'"):
        build_model({"fast": "yes"})


def test_resolve_model_config_fills_defaults():
    cfg = resolve_model_config({"name": "fbrestormer", "num_steps": 3})
    assert cfg["num_steps"] == 3 and cfg["num_feats"] == 32 and cfg["ffn_kernel"] == 5
    assert cfg["ffn_dilation"] == 2 and cfg["fast"] is True and cfg["reroute"] == "top"
    assert build_model(cfg).num_steps == 3  # a resolved config builds again


def test_baselines_interface():
    pmrid = build_model({"name": "pmrid"})
    assert count_parameters(pmrid) == 88_576 < 100_000
    assert pmrid.size_multiple == 16
    x = _x(1, 16, 16)
    pmrid.train()
    out = pmrid(x)
    assert isinstance(out, list) and len(out) == 1 and out[0].shape == (1, 4, 16, 16)
    pmrid.eval()
    assert pmrid(x).shape == (1, 4, 16, 16)
    assert "mean" in pmrid.state_dict() and "std" in pmrid.state_dict()


def test_full_restormer():
    model = build_model({"name": "restormer"})
    n = count_parameters(model)
    assert n == 26_127_940 and 26_000_000 <= n <= 26_200_000
    assert model.size_multiple == 8
    model.eval()
    assert model(_x(1, 8, 8)).shape == (1, 4, 8, 8)
