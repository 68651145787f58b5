"""Every fast path gives the plain definition's numbers: outputs and parameter/input gradients."""
import math

import megengine as mge
import numpy as np
import pytest
from megengine.autodiff import GradManager

from megfb.baselines import pixel_shuffle, pixel_unshuffle
from megfb.layers import (GDFN, MDTA, Conv2d, DepthwiseConv, LayerNorm, PDConvFuse, Pointwise,
                          TransformerBlock, gelu, set_fast)
from megfb.ops import GELU_LOGIT_POLY, fit_gelu_logit_poly, phases_to_space, space_to_phases
from megfb.model import build_model

RTOL = 1e-5


def _perturb(module, seed=0, scale=0.1):
    rng = np.random.RandomState(seed)
    module.load_state_dict({
        k: v if k in ("mean", "std") else v + rng.randn(*v.shape).astype(np.float32) * scale
        for k, v in module.state_dict().items()})
    return module


def _run(module, x, fast, weights=None):
    """Outputs and gradients (parameters and input) of a fixed random projection of the output."""
    set_fast(module, fast)
    params = list(module.parameters())
    x = mge.Tensor(x)
    gm = GradManager().attach(params + [x])
    with gm:
        outs = module(x)
        outs = outs if isinstance(outs, list) else [outs]
        rng = np.random.RandomState(123)
        loss = sum((o * mge.tensor(rng.randn(*o.shape).astype(np.float32))).sum() for o in outs)
        gm.backward(loss)
    grads = {n: p.grad.numpy() for n, p in module.named_parameters()}
    grads["<input>"] = x.grad.numpy()
    for p in params:
        p.grad = None
    return [o.numpy() for o in outs], grads


def _close(a, b, what):
    scale = max(np.abs(a).max(), 1e-6)
    err = np.abs(a - b).max() / scale
    assert err <= RTOL, f"{what}: relative error {err:.2e}"


def assert_fast_equals_plain(module, x):
    outs_plain, grads_plain = _run(module, x, fast=False)
    outs_fast, grads_fast = _run(module, x, fast=True)
    for i, (a, b) in enumerate(zip(outs_plain, outs_fast)):
        _close(a, b, f"output {i}")
    assert grads_plain.keys() == grads_fast.keys()
    for name in grads_plain:
        _close(grads_plain[name], grads_fast[name], f"gradient of {name}")


def _x(shape, seed=1):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(2, 6, 8, 8), (1, 6, 7, 9)])
def test_dilated_depthwise_polyphase(shape):
    assert_fast_equals_plain(_perturb(DepthwiseConv(6, 5, dilation=2)), _x(shape))


def test_dilation_three_and_no_bias():
    conv = _perturb(DepthwiseConv(4, 3, dilation=3, bias=False))
    assert_fast_equals_plain(conv, _x((2, 4, 10, 11)))


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_backward_as_forward_convs(k):
    assert_fast_equals_plain(_perturb(DepthwiseConv(5, k)), _x((2, 5, 9, 8)))


def test_dense_conv_backward_as_forward_convs():
    assert_fast_equals_plain(_perturb(Conv2d(4, 6, 5)), _x((2, 4, 9, 7)))
    assert_fast_equals_plain(_perturb(Conv2d(6, 4, 5)), _x((2, 6, 8, 8)))


@pytest.mark.parametrize("b", [1, 2])
def test_pointwise_as_timed_convs_and_a_matmul(b):
    assert_fast_equals_plain(_perturb(Pointwise(6, 10)), _x((b, 6, 5, 7)))
    assert_fast_equals_plain(_perturb(Pointwise(6, 3, bias=False)), _x((b, 6, 5, 7)))


def test_layernorm_hand_written_backward():
    x = _x((2, 8, 5, 6)) * 3 + 1
    assert_fast_equals_plain(_perturb(LayerNorm(8)), x)


def test_layernorm_matches_definition():
    x = _x((2, 8, 5, 6))
    ln = _perturb(LayerNorm(8))
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    want = (x - mu) / np.sqrt(var + 1e-5) * ln.weight.numpy() + ln.bias.numpy()
    for fast in (False, True):
        set_fast(ln, fast)
        np.testing.assert_allclose(ln(mge.tensor(x)).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b", [1, 2])
def test_attention_normalised_after_product(b):
    assert_fast_equals_plain(_perturb(MDTA(8, 2)), _x((b, 8, 6, 6)))


def test_attention_zero_vector_clamps_like_normalize():
    # an all-zero q/k row must give the same (clamped) result on both paths
    attn = _perturb(MDTA(8, 2))
    x = _x((1, 8, 4, 4))
    x[:, :, :, :] = 0
    outs = []
    for fast in (False, True):
        set_fast(attn, fast)
        outs.append(attn(mge.tensor(x)).numpy())
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-7)


def test_gdfn_and_fusion():
    assert_fast_equals_plain(_perturb(GDFN(8, 1.2)), _x((2, 8, 8, 8)))
    assert_fast_equals_plain(_perturb(GDFN(8, 1.2, 3, 1)), _x((2, 8, 8, 8)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (1, 8, 7, 5)])
def test_transformer_block_ffn_on_phases(shape):
    assert_fast_equals_plain(_perturb(TransformerBlock(8, 2, 1.2)), _x(shape))


def test_skip_fusion():
    class Fuse(PDConvFuse):
        def forward(self, x):
            return super().forward(x[:, :4], x[:, 4:])

    assert_fast_equals_plain(_perturb(Fuse(4)), _x((2, 8, 6, 6)))


@pytest.mark.parametrize("cfg", [{}, {"reroute": "bottom", "step_input": False}])
def test_whole_model_fast_equals_plain(cfg):
    model = _perturb(build_model(cfg), scale=0.05)
    model.train()
    assert_fast_equals_plain(model, np.abs(_x((2, 4, 16, 16))) * 0.2)


@pytest.mark.parametrize("y_shape, bias_shape",
                         [((2, 5, 6, 7), (1, 5, 1, 1)), ((3, 4, 5), (3, 1, 5))])
def test_add_bias_equals_the_broadcast_add(y_shape, bias_shape):
    """ops.add_bias (a bias added to a custom Function's output) gives y + bias and MegEngine's
    own gradients for it: bit-equal for a conv's (1, C, 1, 1) bias, whose sum runs in the same
    order as MegEngine's reduce, close for any other broadcast."""
    from megfb.ops import add_bias

    y0, b0 = _x(y_shape), _x(bias_shape, seed=2)
    results = []
    for add in (lambda y, b: y + b, add_bias):
        y, b = mge.tensor(y0), mge.tensor(b0)
        gm = GradManager().attach([y, b])
        with gm:
            out = add(y, b)
            gm.backward((out * mge.tensor(_x(out.shape, seed=3))).sum())
        results.append([out.numpy(), y.grad.numpy(), b.grad.numpy()])
    for what, a, b in zip(("output", "gradient of y", "gradient of bias"), *results):
        assert a.shape == b.shape, what
        if len(y_shape) == 4:
            np.testing.assert_array_equal(a, b, err_msg=what)
        else:
            _close(a, b, what)
    assert add_bias(mge.tensor(y0), None).numpy().tobytes() == y0.tobytes()


def test_repeated_backwards_give_equal_gradients_on_a_worker_device():
    """The same training forward and backward, repeated on a CPU device with a worker thread
    ("xpux"), gives the same gradients every time. With MegEngine's own bias add after the 1x1
    and depthwise convs' custom Functions (before ops.add_bias), 1-2% of these backwards gave a
    wrong bias gradient (slightly off, 1e35 or NaN; docs/measure_bias_grads.py): 400 of them
    catch it 99% of the time at 1.1%."""
    from megfb import native

    with native.default_device("xpux"):
        mge.random.seed(0)
        model = build_model({"num_feats": 8, "num_blocks": 3})
        model.train()
        x = mge.tensor(np.random.default_rng(0).random((2, 4, 16, 16), dtype=np.float32))
        gm = GradManager().attach(model.parameters())
        first, differing = None, {}
        for i in range(400):
            with gm:
                gm.backward(sum(o.mean() for o in model(x)))
            grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
            for p in model.parameters():
                p.grad = None
            if first is None:
                first = grads
            for name, g in grads.items():
                if not np.array_equal(g, first[name]):
                    differing.setdefault(name, []).append(i)
    assert not differing, f"gradients unlike the first backward's (at backward #): {differing}"


def test_whole_model_odd_size_eval():
    model = _perturb(build_model({}), scale=0.05)
    model.eval()
    x = mge.tensor(np.abs(_x((1, 4, 9, 7))) * 0.2)
    outs = []
    for fast in (False, True):
        set_fast(model, fast)
        outs.append(model(x).numpy())
    _close(outs[0], outs[1], "odd-size output")


def test_set_fast_keeps_state_dict():
    model = build_model({"fast": True})
    keys = {k: v.shape for k, v in model.state_dict().items()}
    set_fast(model, False)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert not any(getattr(m, "fast", False) for m in model.modules())
    assert all(m.fast for m in build_model({}).modules() if hasattr(m, "fast"))
    assert not any(m.fast for m in build_model({"fast": False}).modules() if hasattr(m, "fast"))


def test_phase_and_pixel_shuffles_are_inverses():
    x = mge.tensor(_x((2, 3, 6, 8)))
    np.testing.assert_array_equal(phases_to_space(space_to_phases(x, 2), 2).numpy(), x.numpy())
    np.testing.assert_array_equal(pixel_shuffle(pixel_unshuffle(x)).numpy(), x.numpy())
    # phase (i, j) fills rows [(2i + j) * H/2, (2i + j + 1) * H/2)
    np.testing.assert_array_equal(space_to_phases(x, 2).numpy()[:, :, 2 * 3:3 * 3],
                                  x.numpy()[:, :, 1::2, 0::2])
    # torch's PixelUnshuffle channel order: c*4 + 2i + j
    np.testing.assert_array_equal(pixel_unshuffle(x).numpy()[:, 2 * 4 + 1],
                                  x.numpy()[:, 2, 0::2, 1::2])


def _assert_eval_fast_equals_plain(module, x):
    """Eval mode has its own fast paths (1x1 convs with fused bias, LayerNorm folded into the
    next 1x1 conv, one-hot phase convs, attention folded into project_out)."""
    module.eval()
    outs = []
    for fast in (False, True):
        set_fast(module, fast)
        outs.append(module(mge.tensor(x)).numpy())
    _close(outs[0], outs[1], "eval output")


@pytest.mark.parametrize("b", [1, 2])
def test_eval_paths_equal_plain(b):
    _assert_eval_fast_equals_plain(_perturb(TransformerBlock(8, 2, 1.2)), _x((b, 8, 8, 6)))
    _assert_eval_fast_equals_plain(_perturb(TransformerBlock(8, 2, 1.2)), _x((b, 8, 7, 5)))
    _assert_eval_fast_equals_plain(_perturb(MDTA(8, 2, bias=True)), _x((b, 8, 6, 6)))
    _assert_eval_fast_equals_plain(_perturb(Pointwise(6, 10)), _x((b, 6, 5, 7)))
    _assert_eval_fast_equals_plain(_perturb(DepthwiseConv(6, 5, dilation=2)), _x((b, 6, 9, 8)))
    model = _perturb(build_model({}), scale=0.05)
    _assert_eval_fast_equals_plain(model, np.abs(_x((b, 4, 12, 10))) * 0.2)


def test_phase_convs_move_pixels_bit_exactly():
    for shape in [(1, 32, 16, 12), (2, 5, 6, 4)]:
        x = mge.tensor(_x(shape))
        phases = space_to_phases(x, 2)
        np.testing.assert_array_equal(space_to_phases(x, 2, by_conv=True).numpy(), phases.numpy())
        np.testing.assert_array_equal(phases_to_space(phases, 2, by_conv=True).numpy(), x.numpy())


def _gelu_reference(x):
    return np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])


@pytest.mark.parametrize("native", [True, False])
def test_fast_gelu_matches_erf_definition(native):
    """The fast GELU, by megfb's operator and by MegEngine's (use_native(False))."""
    from megfb.ops import use_native

    previous = use_native(native)
    try:
        x = np.concatenate([np.linspace(-60, 60, 24001), np.linspace(-6, 6, 12001)]).astype(np.float32)
        ref = _gelu_reference(x)
        fast = gelu(mge.tensor(x), fast=True).numpy()
        plain = gelu(mge.tensor(x), fast=False).numpy()
        scale = np.maximum(np.abs(x), 1.0)
        # as close to the float64 truth as MegEngine's own erf-based GELU (both ~5e-7 here)
        assert np.max(np.abs(fast - ref) / scale) < 2e-7 * 4
        assert np.max(np.abs(fast - ref) / scale) <= 2 * np.max(np.abs(plain - ref) / scale) + 1e-7
        # gradient: the exact derivative Phi(x) + x * pdf(x)
        xt = mge.tensor(x)
        gm = GradManager().attach([xt])
        with gm:
            gm.backward(gelu(xt, fast=True).sum())
        x64 = x.astype(np.float64)
        want = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x64]) + x64 * np.exp(-x64 ** 2 / 2) / math.sqrt(2 * math.pi)
        assert np.max(np.abs(xt.grad.numpy() - want)) < 1e-6
    finally:
        use_native(previous)


def test_gelu_polynomial_is_the_documented_fit():
    coef = fit_gelu_logit_poly()
    np.testing.assert_allclose(np.float32(coef), np.float32(GELU_LOGIT_POLY), rtol=1e-4)
    # no clamp needed: past the fitted range x * poly(x*x) keeps sigmoid saturated at 1
    x = np.linspace(5.3, 1e4, 200001)
    assert (x * np.polyval(np.array(GELU_LOGIT_POLY[::-1]), x * x)).min() > 16
