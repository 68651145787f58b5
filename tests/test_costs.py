"""params: the parameter table and limit, the MAC count against a hand formula, graph costs."""
import megengine.functional as F
import megengine.module as M

from megfb.cli import main
from megfb.costs import constant_buffers, graph_costs, model_report, module_stats_conv_macs, parameter_table
from megfb.graph import export_graph_bytes
from megfb.model import build_model, count_parameters

from helpers import TINY, write_config  # noqa: E402


def test_params_over_limit_message(tmp_path, capsys):
    cfg = write_config(tmp_path / "big.yaml", {"name": "fbrestormer", "num_feats": 48, "heads": 4})
    n = count_parameters(build_model({"name": "fbrestormer", "num_feats": 48, "heads": 4}))
    assert main(["params", "--config", cfg, "--no-timing"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megfb: error: model has {n:,} trainable parameters, over the contest limit of 100,000"]


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
    plain = graph_costs(export_graph_bytes(model, (1, 4, 16, 16)))
    assert plain["macs"] == per_pixel * hw == 185512 * hw
    assert plain["matmul_macs"] == 2 * 7 * 512 * hw
    assert plain["flops"] == 2 * plain["macs"]
    # module_stats (hooks Conv2d modules; eager forward computes every step's output head)
    every = graph_costs(export_graph_bytes(model, (1, 4, 16, 16), all_steps=True))
    assert every["conv_macs"] == module_stats_conv_macs(model, (1, 4, 16, 16))
    assert every["conv_macs"] - plain["conv_macs"] == 5024 * hw
    # the fast eval path, per block: attn @ v (256 per pixel) is folded into project_out's
    # weight (one 32x32x32 product), plus the (c/h x 1)(1 x c/h) outer products of the q/k
    # norms, LayerNorm's bias through qkv and project_in (96x32 + 76x32), and the one-hot
    # stride-2 conv that moves the pixels into phases (128 outputs x 4 taps per half-res pixel)
    set_fast(model, True)
    fast = graph_costs(export_graph_bytes(model, (1, 4, 16, 16)))
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

    costs = graph_costs(export_graph_bytes(Toy(), (1, 4, 16, 16)))
    assert costs["conv_macs"] == 8 * 256 * 4 * 9
    assert costs["matmul_macs"] == 8 * 8 * 256
    assert costs["activations"] == 8 * 256 + 8 * 8
    assert costs["peak_bytes"] >= 4 * (4 * 256 + 8 * 256)


def test_parameter_table_and_constants():
    model = build_model({"name": "fbrestormer"})
    rows = dict((name, n) for name, n, _ in parameter_table(model))
    assert rows["conv_in"] + rows["block"] + rows["conv_out"] == count_parameters(model) == 99_156
    assert rows["block.trans_list"] == 7 * 10_640
    const = dict(constant_buffers(model))
    assert sorted(const) == ["mean", "std"] and const["mean"].shape == (1, 4, 1, 1)


def test_params_report_tiny_shape():
    model = build_model(TINY)
    report = model_report(model, timing=True, side=8)
    assert report["params"] == count_parameters(model)
    assert report["module_stats_conv_macs"] == report["plain_all_steps"]["conv_macs"]
    assert report["eager_s"] > 0 and report["graph_s"] > 0
    assert all(m.fast for m in model.modules() if hasattr(m, "fast"))  # paths restored


def test_params_of_a_plain_state_dict_of_another_architecture(tmp_path, capsys):
    """--ckpt with --config: a state dict whose architecture is not the default one."""
    import megengine as mge

    model = build_model(TINY)
    ckpt = tmp_path / "tiny.mge"
    mge.save(model.state_dict(), str(ckpt))
    cfg = write_config(tmp_path / "tiny.yaml", TINY)
    assert main(["params", "--ckpt", str(ckpt), "--config", cfg, "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert f"{'total trainable':<28}{count_parameters(model):>10,}" in out
    assert main(["params", "--ckpt", str(ckpt), "--no-timing"]) == 1  # the default layout does not fit
    assert "missing key" in capsys.readouterr().err
