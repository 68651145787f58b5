"""Inference: contest .bin in/out, batching, the CFA-safe self-ensemble, the predict command."""
import argparse

import megengine as mge
import numpy as np
import pytest

from megfb.cli import main
from megfb.data import dihedral_packed
from megfb.infer import cmd_predict, predict_bin, predict_packed
from megfb.io import pack_bayer, read_bin, write_bin
from megfb.layers import set_fast
from megfb.model import build_model

TINY = {"num_feats": 8, "heads": 2, "num_blocks": 3, "num_steps": 2}


def _tiny(seed=0):
    model = build_model(TINY)
    rng = np.random.RandomState(seed)
    model.load_state_dict({
        k: v if k in ("mean", "std") else v + rng.randn(*v.shape).astype(np.float32) * 0.1
        for k, v in model.state_dict().items()})
    return model


def _identity(model):
    """A zeroed last conv makes the model return its input after de-standardisation."""
    model.conv_out[2].weight[:] = 0
    model.conv_out[2].bias[:] = 0
    return model


def test_batches_match_one_pass():
    model = _tiny()
    x = np.random.RandomState(1).rand(5, 4, 12, 12).astype(np.float32) * 0.3
    y = predict_packed(model, x, batch_size=2, progress=False)
    model.eval()
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, model(mge.tensor(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_tta_of_identity_is_identity():
    x = np.random.RandomState(2).rand(3, 4, 10, 10).astype(np.float32)
    y = predict_packed(_identity(_tiny()), x, batch_size=2, tta=True, progress=False)
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_tta_is_equivariant():
    # averaging over the whole group makes the prediction commute with every CFA-safe transform
    model = _tiny()
    x = np.random.RandomState(3).rand(1, 4, 8, 8).astype(np.float32) * 0.3
    base = predict_packed(model, x, tta=True, progress=False)
    plain = predict_packed(model, x, tta=False, progress=False)
    assert np.abs(base - plain).max() > 1e-5  # the ensemble really averages something
    for k in (1, 5):
        got = predict_packed(model, dihedral_packed(x, k), tta=True, progress=False)
        np.testing.assert_allclose(got, dihedral_packed(base, k), rtol=1e-4, atol=1e-5)


def test_padding_for_down_sampling_models():
    model = build_model({"name": "pmrid"})
    x = np.random.RandomState(4).rand(1, 4, 20, 12).astype(np.float32)
    assert predict_packed(model, x, progress=False).shape == (1, 4, 20, 12)


def test_predict_bin_writes_rounded_uint16(tmp_path):
    rng = np.random.RandomState(5)
    raw = rng.randint(0, 65536, size=(3, 256, 256)).astype(np.uint16)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    write_bin(src, raw)
    assert predict_bin(_identity(_tiny()), src, dst, batch_size=2, progress=False) == 3
    assert dst.stat().st_size == 3 * 256 * 256 * 2
    out = read_bin(dst)
    # the identity model gives the input back up to float rounding before the uint16 round
    assert np.abs(out.astype(np.int64) - raw).max() <= 1


def _args(tmp_path, **kw):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {name: fbrestormer, num_feats: 8, heads: 2, num_blocks: 3, "
                   "num_steps: 2}\n")
    base = dict(ckpt=str(tmp_path / "w.mge"), config=str(cfg), input=str(tmp_path / "in.bin"),
                output=str(tmp_path / "out.bin"), batch_size=2, tta=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cmd_predict_from_plain_state_dict(tmp_path):
    model = _tiny()
    mge.save(model.state_dict(), str(tmp_path / "w.mge"))
    raw = np.random.RandomState(6).randint(0, 4000, size=(3, 256, 256)).astype(np.uint16)
    write_bin(tmp_path / "in.bin", raw)
    args = _args(tmp_path)
    assert not cmd_predict(args)
    out = np.fromfile(args.output, dtype="<u2")
    assert out.size == 3 * 256 * 256
    model.eval()
    x = pack_bayer(raw.astype(np.float32)) / 65535.0
    want = np.rint(np.clip(model(mge.tensor(x)).numpy() * 65535.0, 0, 65535))
    got = pack_bayer(out.reshape(3, 256, 256)).astype(np.float64)
    assert np.abs(got - want).max() <= 1  # float rounding at .5 only


def test_cli_bad_input_leaves_no_output(tmp_path, capsys):
    mge.save(_tiny().state_dict(), str(tmp_path / "w.mge"))
    (tmp_path / "in.bin").write_bytes(b"\0" * 1000)
    a = _args(tmp_path)
    code = main(["predict", "--ckpt", a.ckpt, "--config", a.config, "--input", a.input,
                 "--output", a.output])
    assert code == 1
    assert "in.bin" in capsys.readouterr().err
    assert not (tmp_path / "out.bin").exists()
    with pytest.raises(SystemExit) as exit_info:  # checked while parsing, before any file is read
        main(["predict", "--ckpt", a.ckpt, "--input", a.input, "--output", a.output, "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size: must be at least 1" in capsys.readouterr().err


def test_batching_is_device_aware(monkeypatch):
    """One patch per forward on CPU, whole batches on a GPU, an explicit --batch-size honoured
    on both; the model itself never splits a batch."""
    from megfb import infer

    model = _tiny()
    seen = []
    model.conv_in.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[0]))
    x = np.random.RandomState(7).rand(10, 4, 8, 8).astype(np.float32) * 0.3
    outs = {}
    for device, gpu, batch, expected in (("cpu", False, None, [1] * 10), ("gpu", True, None, [8, 2]),
                                         ("cpu-3", False, 3, [3, 3, 3, 1]), ("gpu-4", True, 4, [4, 4, 2])):
        monkeypatch.setattr(infer, "on_gpu", lambda gpu=gpu: gpu)
        seen.clear()
        outs[device] = predict_packed(model, x, batch_size=batch, progress=False, engine="mge")
        assert seen == expected, device
    for device in ("gpu", "cpu-3", "gpu-4"):
        np.testing.assert_allclose(outs[device], outs["cpu"], rtol=1e-5, atol=1e-6)
    seen.clear()
    model.eval()
    model(mge.tensor(x[:3]))
    assert seen == [3]


def test_lite_engine_equals_the_eager_model():
    """The default CPU engine (the dumped graph in one Lite network per core, patches in
    parallel) gives the eager model's outputs: one by one, batched, with TTA, padded."""
    from megfb import infer, lite

    assert infer.default_engine() == "lite" and lite.default_workers() >= 1
    model = _tiny()
    x = np.random.RandomState(3).rand(5, 4, 12, 12).astype(np.float32) * 0.3
    for batch, tta in ((None, False), (2, False), (None, True)):
        fast = predict_packed(model, x, batch_size=batch, tta=tta, progress=False, engine="lite")
        eager = predict_packed(model, x, batch_size=batch, tta=tta, progress=False, engine="mge")
        np.testing.assert_allclose(fast, eager, rtol=1e-5, atol=1e-6)
    model.eval()
    np.testing.assert_allclose(fast[:1], predict_packed(model, x[:1], tta=True, progress=False), rtol=0, atol=0)
    set_fast(model, False)  # the plain path has ops with naive kernels only: chosen by heuristic
    np.testing.assert_allclose(predict_packed(model, x, progress=False, engine="lite"),
                               predict_packed(model, x, progress=False, engine="mge"), rtol=1e-5, atol=1e-6)
    pmrid = build_model({"name": "pmrid"})  # padded up to its size multiple, cropped after
    x = np.random.RandomState(4).rand(3, 4, 20, 12).astype(np.float32)
    np.testing.assert_allclose(predict_packed(pmrid, x, progress=False, engine="lite"),
                               predict_packed(pmrid, x, progress=False, engine="mge"), rtol=1e-5, atol=1e-6)


def test_lite_networks_agree_and_follow_new_weights():
    """Every network of a runner computes the same numbers (a patch's result does not depend on
    which core ran it), each on its caller's thread (Lite's CPU inplace mode: networks handing
    their kernels to cpu0's worker thread ran one at a time); changed weights build a new
    runner."""
    from megfb import lite

    model = _tiny()
    x = np.random.RandomState(5).rand(1, 4, 8, 8).astype(np.float32)
    runner = lite.runner_for(model, x.shape, workers=2)
    nets = [runner._free.get() for _ in range(2)]
    assert all(net.is_cpu_inplace_mode() for net in nets)
    outs = [lite.LiteRunner._forward(net, x) for net in nets]
    for net in nets:
        runner._free.put(net)
    np.testing.assert_array_equal(outs[0], outs[1])
    with runner.pool() as pool:
        both = list(pool.map(runner, [x, x[:, :, ::-1].copy()]))
    np.testing.assert_array_equal(both[0], outs[0])
    assert lite.runner_for(model, x.shape, workers=2) is runner
    before = predict_packed(model, x, progress=False, engine="lite")
    model.conv_out[2].bias[:] = model.conv_out[2].bias + 0.01
    assert lite.runner_for(model, x.shape, workers=2) is not runner
    after = predict_packed(model, x, progress=False, engine="lite")
    assert np.abs(after - before).min() > 1e-4
    model.eval()  # (the dumped graph's tolerance, megfb/graph.py: kernels chosen by timing differ)
    np.testing.assert_allclose(after, model(mge.tensor(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_lite_engine_stops_on_request():
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(KeyboardInterrupt):
        predict_packed(_tiny(), np.zeros((6, 4, 8, 8), np.float32), progress=False, stop=stop, engine="lite")
    assert len(calls) == 3
