"""megfb's own CPU operators (megfb/native.py): equal to MegEngine's fallback and to float64."""
import os

import numpy as np
import pytest

from helpers import TINY

native = pytest.importorskip("megfb.native")


def _loaded():
    if not native.load():
        pytest.skip(f"megfb's operators are not available here: {native.reason()}")


def _truth(x, dy, k, pad):
    """float64 dw[c, i, j] = sum x_pad[b, c, y + i, x + j] * dy[b, c, y, x]."""
    h, w = x.shape[2:]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    return np.stack([np.einsum("bchw,bchw->c", xp[:, :, i:i + h, j:j + w], dy.astype(np.float64))
                     for i in range(k) for j in range(k)], axis=1)


@pytest.mark.parametrize("shape,k", [((2, 3, 7, 9), 3), ((3, 5, 16, 13), 5), ((1, 4, 5, 21), 7),
                                     ((2, 6, 11, 10), 1), ((4, 2, 3, 3), 5)])
def test_depthwise_wgrad_equals_float64_and_the_fallback(shape, k):
    import megengine as mge

    from megfb import ops

    _loaded()
    rng = np.random.default_rng(k)
    x, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    pad, (b, c, h, w) = (k - 1) // 2, shape
    got = native.depthwise_wgrad(mge.tensor(x), mge.tensor(dy), k, pad).numpy()
    truth = _truth(x, dy, k, pad)
    scale = np.abs(truth).max()
    assert got.shape == (c, k * k)
    assert np.abs(got - truth).max() <= 1e-6 * scale
    # the MegEngine fallback of megfb/ops.py: a grouped conv with dy as the filter
    xt = mge.tensor(x).transpose(1, 0, 2, 3).reshape(1, c * b, h, w)
    dyt = mge.tensor(dy).transpose(1, 0, 2, 3).reshape(c, 1, b, h, w)
    fallback = ops.conv(xt, dyt, pad, c).reshape(c, k * k).numpy()
    assert np.abs(got - fallback).max() <= 1e-5 * scale


@pytest.mark.parametrize("shape,k,share", [((2, 3, 7, 9), 3, 1), ((3, 5, 16, 13), 5, 1), ((1, 4, 5, 21), 7, 1),
                                           ((2, 6, 11, 10), 1, 1), ((4, 2, 3, 3), 5, 1), ((2, 8, 6, 35), 5, 4),
                                           ((1, 6, 9, 17), 3, 2)])
def test_depthwise_conv_equals_megengines_conv(shape, k, share):
    """megfb's depthwise conv (kernels as written and rotated; `share` maps per kernel) equals
    MegEngine's grouped conv with the kernels broadcast; its weight gradient with `share` equals
    float64 summed over the maps that share a kernel."""
    import megengine as mge

    from megfb import ops

    _loaded()
    rng = np.random.default_rng(k + share)
    x, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    g, pad = shape[1], (k - 1) // 2
    w = rng.standard_normal((g // share, k * k)).astype(np.float32)
    for flip in (False, True):
        kernels = w.reshape(-1, k, k)[:, ::-1, ::-1] if flip else w.reshape(-1, k, k)
        full = np.ascontiguousarray(np.repeat(kernels, share, axis=0)).reshape(g, 1, 1, k, k)
        want = ops.conv(mge.tensor(x), mge.tensor(full), pad, g).numpy()
        got = native.depthwise_conv(mge.tensor(x), mge.tensor(w), k, pad, share=share, flip=flip).numpy()
        assert got.shape == x.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), f"flip={flip}"
    truth = _truth(x, dy, k, pad).reshape(g // share, share, k * k).sum(axis=1)
    got = native.depthwise_wgrad(mge.tensor(x), mge.tensor(dy), k, pad, share=share).numpy()
    assert got.shape == (g // share, k * k)
    assert np.abs(got - truth).max() <= 1e-6 * np.abs(truth).max()


def test_depthwise_wgrad_refuses_a_conv_that_is_not_same():
    import megengine as mge

    _loaded()
    x = mge.tensor(np.ones((1, 2, 6, 6), dtype=np.float32))
    with pytest.raises(ValueError, match="odd k"):
        native.depthwise_wgrad(x, x, 5, 1).numpy()


def test_training_gradients_with_and_without_the_native_operator():
    """A training step's every gradient is the same whether the depthwise convs' weight
    gradients come from megfb's operator or from MegEngine's kernels."""
    import megengine as mge
    from megengine.autodiff import GradManager

    from megfb import ops
    from megfb.losses import supervised_loss
    from megfb.model import build_model

    _loaded()
    rng = np.random.default_rng(0)
    noisy, clean = (rng.random((3, 4, 16, 16), dtype=np.float32) for _ in range(2))
    grads = {}
    for on in (True, False):
        previous = ops.use_native(on)
        try:
            mge.random.seed(0)
            model = build_model(TINY)
            model.train()
            gm = GradManager().attach(model.parameters())
            with gm:
                loss, _ = supervised_loss(model(mge.tensor(noisy)), mge.tensor(clean),
                                          {"type": "weighted_l1", "steps": "all"})
                gm.backward(loss)
            grads[on] = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        finally:
            ops.use_native(previous)
    depthwise = [n for n in grads[True] if grads[True][n].ndim == 5]
    assert depthwise, "the tiny model has depthwise convs"
    for name, g in grads[False].items():
        np.testing.assert_allclose(grads[True][name], g, rtol=0, atol=1e-5 * np.abs(g).max() + 1e-12,
                                   err_msg=name)


def test_native_off_by_environment(monkeypatch):
    """MEGFB_NATIVE=0: nothing is built or loaded and the reason says why."""
    monkeypatch.setattr(native, "_STATE", {"loaded": None, "error": None})
    monkeypatch.setenv("MEGFB_NATIVE", "0")
    assert native.load() is False
    assert native.reason() == "MEGFB_NATIVE=0"


def test_a_failed_build_leaves_no_library(monkeypatch, tmp_path):
    """No compiler: load() says False with the reason, and the cache holds no half-built file."""
    monkeypatch.setattr(native, "_STATE", {"loaded": None, "error": None})
    monkeypatch.setenv("MEGFB_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("MEGFB_NATIVE", raising=False)
    assert native.load() is False
    assert "no-such-compiler" in native.reason()
    assert not list((tmp_path / "native").glob("*.so"))


def test_builds_from_source_into_an_empty_cache(tmp_path, monkeypatch):
    """The library builds from megfb/csrc with the machine's compiler (what a fresh machine does
    on first use); the result is a shared object under its final name, no temporary left."""
    import shutil

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler here: megfb uses MegEngine's kernels instead")
    monkeypatch.setenv("MEGFB_CACHE", str(tmp_path))
    target = native._library_path()
    assert target.startswith(str(tmp_path))
    native._build(target)
    with open(target, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert [p.name for p in (tmp_path / "native").iterdir()] == [os.path.basename(target)]


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (3, 32, 8, 16), (1, 3, 1, 70)])
def test_channel_norm_forward_and_backward_equal_megengines(shape):
    """The training LayerNorm as megfb's operators: y, and the gradients of x, weight and
    bias, equal to the same LayerNorm through MegEngine's operators (megfb/ops.py)."""
    import megengine as mge
    from megengine.autodiff import GradManager

    from megfb import ops

    _loaded()
    rng = np.random.default_rng(shape[1])
    c = shape[1]
    x0 = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    w0 = rng.standard_normal((1, c, 1, 1)).astype(np.float32)
    b0 = rng.standard_normal((1, c, 1, 1)).astype(np.float32)
    up = rng.standard_normal(shape).astype(np.float32)
    out = {}
    for on in (True, False):
        previous = ops.use_native(on)
        try:
            x, w, b = mge.Parameter(x0), mge.Parameter(w0), mge.Parameter(b0)
            gm = GradManager().attach([x, w, b])
            with gm:
                y = ops.channel_norm(x, w, b, training=True)
                gm.backward((y * mge.tensor(up)).sum())
            out[on] = [t.numpy().copy() for t in (y, x.grad, w.grad, b.grad)]
        finally:
            ops.use_native(previous)
    # the definition itself, in float64
    xd = x0.astype(np.float64)
    ref = (xd - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-5) * w0 + b0
    assert np.abs(out[True][0] - ref).max() <= 1e-5 * np.abs(ref).max()
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), out[True], out[False]):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max() + 1e-7, err_msg=name)


def _with_and_without_native(x0, forward):
    """{True: [...], False: [...]}: forward(x)'s outputs and x's gradient of sum(outputs[-1])
    with megfb's operators on and off (x a Parameter made from x0)."""
    import megengine as mge
    from megengine.autodiff import GradManager

    from megfb import ops

    out = {}
    for on in (True, False):
        previous = ops.use_native(on)
        try:
            x = mge.Parameter(x0)
            gm = GradManager().attach([x])
            with gm:
                outputs = forward(x)
                gm.backward(outputs[-1].sum())
            out[on] = [t.numpy().copy() for t in (*outputs, x.grad)]
        finally:
            ops.use_native(previous)
    return out


@pytest.mark.parametrize("shape,swap", [((2, 6, 7, 9), False), ((3, 76, 8, 16), False), ((1, 2, 1, 70), False),
                                        ((2, 6, 7, 9), True), ((1, 64, 5, 8), True)])
def test_gated_gelu_forward_and_backward_equal_float64_and_megengines(shape, swap):
    """GDFN's gate gelu(x1) * x2 (swap: the GFM's x1 * gelu(x2)) as megfb's operators: y and dx
    equal to the erf definition in float64 and to the same gate through MegEngine's operators
    (megfb/ops.py), over the whole range GELU meets (saturated tails included)."""
    import math

    import megengine as mge

    from megfb import ops

    _loaded()
    rng = np.random.default_rng(shape[1])
    n = int(np.prod(shape))
    x0 = rng.permutation(np.concatenate([np.linspace(-60, 60, n // 2), rng.standard_normal(n - n // 2) * 3]))
    x0 = x0.reshape(shape).astype(np.float32)
    h = shape[1] // 2
    up = rng.standard_normal((shape[0], h) + shape[2:]).astype(np.float32)
    def forward(x):
        y = ops.gated_gelu(x, swap=swap)
        return y, y * mge.tensor(up)  # the gradient of the last one's sum is dx

    out = {on: [y, dx] for on, (y, _, dx) in _with_and_without_native(x0, forward).items()}
    if swap:  # the same formulas with the halves' roles exchanged
        out = {on: [y, np.concatenate([dx[:, h:], dx[:, :h]], axis=1)] for on, (y, dx) in out.items()}
    xd = x0.astype(np.float64)
    x1, x2 = (xd[:, h:], xd[:, :h]) if swap else (xd[:, :h], xd[:, h:])
    cdf = 0.5 * np.vectorize(math.erfc)(-x1 / math.sqrt(2))
    pdf = np.exp(-x1 ** 2 / 2) / math.sqrt(2 * math.pi)
    truth = [x1 * cdf * x2, np.concatenate([up * x2 * (cdf + x1 * pdf), up * x1 * cdf], axis=1)]
    scales = [np.maximum(np.abs(x1 * x2), 1.0), np.maximum(np.abs(np.concatenate([up * x2, up * x1], axis=1)), 1.0)]
    for name, got, want, fallback, scale in zip(("y", "dx"), out[True], truth, out[False], scales):
        assert got.shape == want.shape, name
        assert np.max(np.abs(got - want) / scale) < 1e-6, name
        assert np.max(np.abs(got - fallback) / scale) < 1e-6, name


def test_gated_gelu_refuses_an_odd_channel_count():
    import megengine as mge

    _loaded()
    with pytest.raises(ValueError, match="even channel count"):
        native.gated_gelu_forward(mge.tensor(np.ones((1, 3, 4, 4), dtype=np.float32)))


@pytest.mark.parametrize("shape,d", [((2, 3, 8, 6), 2), ((1, 4, 9, 12), 3), ((2, 2, 4, 4), 1)])
def test_polyphase_split_and_merge_equal_megengines_relayout(shape, d):
    """megfb's polyphase operators: the split and the merge bit-identical to MegEngine's 6-d
    transpose (megfb/ops.py without them), and each one's gradient the other."""
    import megengine as mge

    from megfb import ops

    _loaded()
    rng = np.random.default_rng(d)
    x0 = rng.standard_normal(shape).astype(np.float32)
    b, c, h, w = shape
    up = rng.standard_normal((b, c, h * d, w // d)).astype(np.float32)
    def forward(x):
        phases = ops.space_to_phases(x, d)
        return phases, ops.phases_to_space(phases * mge.tensor(up), d)

    out = _with_and_without_native(x0, forward)
    for name, got, want in zip(("phases", "merged", "grad"), out[True], out[False]):
        np.testing.assert_array_equal(got, want, err_msg=name)
    # phase (i, j) of row y, column x is pixel (y d + i, x d + j)
    np.testing.assert_array_equal(out[True][0][:, :, (d - 1) * (h // d):d * (h // d)], x0[:, :, 0::d, d - 1::d])
    with pytest.raises(ValueError, match="does not divide"):
        native.space_to_phases(mge.tensor(x0[:, :, :, :w - 1]), 2 if d == 1 else d)


def test_operators_read_strided_views_on_a_worker_device():
    """Each operator given strided views (slices) on MegEngine's default device, whose kernels
    run on a worker thread: equal to the same operator on contiguous copies, every time.
    MegEngine makes such inputs contiguous with a kernel it queues on the worker and then runs
    the operator at once; without megfb's copy and wait (native._ready) the gate read zeros."""
    import megengine as mge

    _loaded()
    rng = np.random.default_rng(3)
    big = rng.standard_normal((2, 12, 13, 11)).astype(np.float32)
    view = (slice(None), slice(None), slice(2, 11), slice(1, 10))
    w, b = (mge.tensor(rng.standard_normal(12).astype(np.float32)) for _ in range(2))
    ops_ = {
        "gated_gelu_forward": lambda t: native.gated_gelu_forward(t),
        "gated_gelu_backward": lambda t: native.gated_gelu_backward(t[:, :6], t),
        "channel_norm_forward": lambda t: native.channel_norm_forward(t, w, b)[0],
        "depthwise_wgrad": lambda t: native.depthwise_wgrad(t, t, 3, 1),
        "depthwise_conv": lambda t: native.depthwise_conv(t, t[0, :, :3, :3], 3, 1),
        "phases_to_space": lambda t: native.phases_to_space(t[:, :, :8], 2),
    }
    want = {name: op(mge.tensor(np.ascontiguousarray(big[view]))).numpy() for name, op in ops_.items()}
    for _ in range(10):
        strided = mge.tensor(big)[view]
        for name, op in ops_.items():
            np.testing.assert_allclose(op(strided).numpy(), want[name], rtol=0, atol=1e-6, err_msg=name)


def test_operators_split_over_threads_equal_one_thread(monkeypatch):
    """On the inline device the operators split their maps (or pixel tiles) over
    MEGFB_THREADS threads: the outputs equal one thread's (the sums over maps to rounding), for
    an uneven split too; traced, or on a worker device, they keep to one thread."""
    import megengine as mge

    _loaded()
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 10, 12, 20)).astype(np.float32)
    dy = rng.standard_normal((3, 10, 12, 20)).astype(np.float32)
    c = rng.standard_normal(10).astype(np.float32)
    cases = {
        "depthwise_conv": lambda t, d: native.depthwise_conv(t, t[0, :, :5, :5], 5, 2),
        "depthwise_conv shared": lambda t, d: native.depthwise_conv(t, t[0, :5, :3, :3], 3, 1, share=2, flip=True),
        "depthwise_wgrad": lambda t, d: native.depthwise_wgrad(t, d, 3, 1),
        "depthwise_wgrad shared": lambda t, d: native.depthwise_wgrad(t, d, 5, 2, share=5),
        "channel_norm_forward": lambda t, d: native.channel_norm_forward(t, mge.tensor(c), mge.tensor(c))[0],
        "channel_norm_backward": lambda t, d: native.channel_norm_backward(d, t, t[:, :1], mge.tensor(c))[0],
        "channel_norm_backward dweight": lambda t, d: native.channel_norm_backward(d, t, t[:, :1], mge.tensor(c))[1],
        "gated_gelu_forward": lambda t, d: native.gated_gelu_forward(t),
        "gated_gelu_backward": lambda t, d: native.gated_gelu_backward(d[:, :5], t),
        "gated_gelu_backward swapped": lambda t, d: native.gated_gelu_backward(d[:, :5], t, swap=True),
        "gelu_forward": lambda t, d: native.gelu_forward(t),
        "gelu_backward": lambda t, d: native.gelu_backward(d, t),
        "space_to_phases": lambda t, d: native.space_to_phases(t, 2),
        "phases_to_space": lambda t, d: native.phases_to_space(t, 2),
    }
    with native.default_device(native.INLINE_DEVICE):
        results = {}
        for n in ("1", "2", "3"):
            monkeypatch.setenv("MEGFB_THREADS", n)
            assert native._threads(mge.tensor(x)) == int(n)
            results[n] = {name: op(mge.tensor(x), mge.tensor(dy)).numpy() for name, op in cases.items()}
    for n in ("2", "3"):
        for name, want in results["1"].items():
            np.testing.assert_allclose(results[n][name], want, rtol=1e-6, atol=1e-6, err_msg=f"{name}, {n} threads")
    assert native._threads(mge.tensor(x)) == 1  # a worker device
    monkeypatch.setenv("MEGFB_THREADS", "many")
    with native.default_device(native.INLINE_DEVICE), pytest.raises(ValueError, match="MEGFB_THREADS"):
        native._threads(mge.tensor(x))


def test_no_native_operator_in_a_dumped_graph():
    """Export traces the model (train mode too, for `params`): the graph holds MegEngine's
    operators only, so Lite and the contest's loader can run it."""
    from megfb.graph import export_graph_bytes
    from megfb.model import build_model

    _loaded()
    model = build_model(TINY)
    for all_steps in (False, True):
        graph = export_graph_bytes(model, (1, 4, 16, 16), all_steps=all_steps)
        assert b"Megfb" not in graph


def test_lite_graph_with_the_inference_operators_equals_the_eager_model():
    """megfb's own Lite runner traces its graph with the gate, the polyphase split/merge, the
    depthwise convs and the LayerNorm's standardisation as megfb's operators (ops.native_in_graph): they are in its
    graph, its outputs equal the MegEngine-only graph's and the eager model's, and the graph
    traced for anyone else (the default export) still holds none of them."""
    import megengine as mge

    from megfb import lite, ops
    from megfb.graph import export_graph_bytes
    from megfb.model import build_model

    _loaded()
    mge.random.seed(3)
    model = build_model(TINY)
    model.eval()
    x = np.random.RandomState(6).rand(1, 4, 16, 12).astype(np.float32)
    eager = model(mge.tensor(x)).numpy()
    with_ops = lite.LiteRunner(model, x.shape, workers=1)
    without = lite.LiteRunner(model, x.shape, workers=1, native_ops=False)
    assert with_ops.native_ops and not without.native_ops
    for name in (b"MegfbGatedGeluForward", b"MegfbSpaceToPhases", b"MegfbPhasesToSpace",
                 b"MegfbChannelNormForward", b"MegfbDepthwiseConv", b"MegfbGeluForward"):
        assert name in with_ops.graph and name not in without.graph, name
    np.testing.assert_allclose(with_ops(x), without(x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(with_ops(x), eager, rtol=0, atol=1e-5)
    assert b"Megfb" not in export_graph_bytes(model, x.shape)
    previous = ops.use_native(False)
    try:
        assert not lite.LiteRunner(model, x.shape, workers=1).native_ops
    finally:
        ops.use_native(previous)


def test_inline_device_steps_equal_the_worker_device_without_waiting(monkeypatch):
    """On MegEngine's inline CPU device (the trainer's) the operators run without waiting for
    the devices, and several training steps' gradients equal those on the default device (whose
    operator calls wait); large enough maps that a missing wait would read unfinished inputs."""
    import megengine as mge
    from megengine.autodiff import GradManager

    from megfb.losses import supervised_loss
    from megfb.model import build_model

    _loaded()
    rng = np.random.default_rng(1)
    batches = [[rng.random((4, 4, 48, 48), dtype=np.float32) for _ in range(2)] for _ in range(3)]
    waits = {"n": 0}
    real_sync = mge._full_sync

    def counted():
        waits["n"] += 1
        real_sync()

    monkeypatch.setattr(mge, "_full_sync", counted)
    grads, counts = {}, {}
    for device in ("xpux", native.INLINE_DEVICE):
        with native.default_device(device):
            mge.random.seed(0)
            model = build_model(dict(TINY, num_feats=16))
            model.train()
            assert {str(p.device) for p in model.parameters()} == {str(mge.tensor(0.0).device)}
            opt = mge.optimizer.SGD(model.parameters(), lr=1e-2)
            gm = GradManager().attach(model.parameters())
            waits["n"] = 0
            for noisy, clean in batches:
                with gm:
                    loss, _ = supervised_loss(model(mge.tensor(noisy)), mge.tensor(clean),
                                              {"type": "weighted_l1", "steps": "all"})
                    gm.backward(loss)
                grads[device] = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
                opt.step().clear_grad()
            counts[device] = waits["n"]
    assert counts[native.INLINE_DEVICE] == 0 and counts["xpux"] > 0, counts
    for name, g in grads["xpux"].items():
        np.testing.assert_array_equal(grads[native.INLINE_DEVICE][name], g, err_msg=name)


def test_a_model_on_the_inline_device_exports_the_same_graph():
    """Validation during training exports the trained model, which lives on the inline device:
    the dumped graph is byte for byte the default-device model's (no "cpu:default" in it)."""
    import megengine as mge

    from megfb.graph import DumpedGraph, export_graph_bytes
    from megfb.model import build_model

    mge.random.seed(0)
    model = build_model(TINY)
    with native.default_device(native.INLINE_DEVICE):
        twin = build_model(TINY)
    twin.load_state_dict(model.state_dict())
    assert native.on_inline_device(twin) and not native.on_inline_device(model)
    x = np.random.default_rng(2).random((1, 4, 16, 16), dtype=np.float32)
    graphs = [export_graph_bytes(m, (1, 4, 16, 16)) for m in (model, twin)]
    assert b"cpu:default" not in graphs[1]
    assert graphs[1] == graphs[0], "the same graph, weights named alike"
    assert native.on_inline_device(twin), "the exported model itself stays where it was"
    np.testing.assert_array_equal(DumpedGraph(graphs[1])(x), DumpedGraph(graphs[0])(x))
