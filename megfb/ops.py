"""MegEngine op-level tricks behind the fast paths of megfb/layers.py.

layers.py reads like the paper; the arithmetic that makes it fast on MegEngine 1.13's CPU
backend lives here. Every function below computes exactly what its plain counterpart does
(up to float rounding), and tests/test_layers.py proves it through the layers that use them.

- conv2d with a chosen kernel strategy (`conv`), and convs whose gradients are forward convs
  (`same_conv`): MegEngine's CPU ConvolutionBackwardFilter was over half a training step;
- 1x1 convs for training with timed kernels (`pointwise_train`) and for inference with a
  timed kernel and fused bias (`pointwise_eval`);
- depthwise convs by megfb's C++ operators (`depthwise`);
- polyphase sub-images for dilated convs (`space_to_phases` / `phases_to_space`);
- LayerNorm over channels with a hand-written backward (`channel_norm`, `standardise`);
- GELU from vectorised kernels (`fast_gelu`; MegEngine's erf is scalar code), and the gates
  gelu(x1) * x2 and x1 * gelu(x2) (`gated_gelu`), by megfb's operators where available;
- the attention helpers (`head_mask`).
"""
import contextlib
import math

import megengine as mge
import megengine.functional as F
import numpy as np
from megengine.autodiff import Function
from megengine.core._imperative_rt.common import CompNode
from megengine.core._imperative_rt.core2 import apply
from megengine.core.ops import builtin
from megengine.jit.tracing import is_tracing

from . import native

# Kernel choice by timing, among MegEngine's optimised kernels only: on a new shape the timing
# takes 0.1-1.3 s per conv instead of 0.3-14 s for plain PROFILE (which also times the naive
# kernels; 69 s for a first FBRestormer forward), and the chosen kernels run as fast.
TIMED = builtin.Convolution.Strategy.PROFILE | builtin.Convolution.Strategy.OPTIMIZED
HEURISTIC = builtin.Convolution.Strategy.HEURISTIC


def conv(x, w, padding, groups, tune=False):
    """F.conv2d (stride 1, no dilation); with `tune`, MegEngine's kernel is chosen by timing.

    The timing (strategy TIMED) happens once per new shape, and MegEngine keeps the result in
    its persistent cache (~/.cache/megengine), so later processes reuse it. In inference it
    makes the dense 5x5 convs several times faster (conv_out's 32->4: ~30 ms by heuristic,
    ~1-2 ms timed) and the 1x1 convs about 2x. In training it buys nothing measurable but the
    backward's transposed shapes would all be timed, so only eval-mode forward passes use it.
    Set per op, not process-wide via set_execution_strategy: PROFILE breaks MegEngine 1.13's
    BatchedMatrixMul ("needed workspace ...; got: 0") when shapes change. MegEngine caches the
    chosen kernel per shape and parameters but not per strategy: whichever strategy meets a
    shape first decides for the whole process (`bench` clears the cache between paths).
    """
    strategy = TIMED if tune else HEURISTIC
    op = builtin.Convolution(pad_h=int(padding), pad_w=int(padding), strategy=strategy,
                             sparse="dense" if groups == 1 else "group")
    return apply(op, x, w)[0]


_CONSTANTS = {}


def constant(key, make, device=None):
    """A constant Tensor, made once per process and device (None: the default device; a model
    replica on another CPU device, megfb/split.py, gets its own). The modules that use one ask
    for it when they are built: a Tensor created inside a traced function has no data in a
    record-only trace (`megfb params`/`submit` export that way), one made before is captured
    like a parameter. Kept out of the modules themselves, where it would join the state dict."""
    device = mge.get_default_device() if device is None else device
    device = str(CompNode(device) if isinstance(device, str) else device)  # "xpux" -> "xpux:0"
    if (key, device) not in _CONSTANTS:
        _CONSTANTS[key, device] = mge.tensor(make(), device=device)
    return _CONSTANTS[key, device]


def replicate_constants(device):
    """Every constant made so far, also on `device`: before tracing a model copied there from
    another device (megfb/graph.py), whose modules were built, and asked, on that one."""
    for key, source in [(k[0], t) for k, t in _CONSTANTS.items()]:
        constant(key, source.numpy, device)


def elemwise(mode, *inputs):
    return apply(builtin.Elemwise(mode=mode), *inputs)[0]


def reduce(mode, x, axis):
    return apply(builtin.Reduce(mode=mode, axis=axis, keepdim=True), x)[0]


# ------------------------------------------------------------------------------------ convs


_NATIVE = {"on": True, "graph": False}


def use_native(enabled):
    """Turn megfb's own CPU operators (megfb/native.py) on or off; returns the previous setting.
    Off, every op is MegEngine's (the fallback the native ones are tested against)."""
    previous, _NATIVE["on"] = _NATIVE["on"], bool(enabled)
    return previous


def native_ops():
    """True when megfb's operators (the depthwise conv and its gradients, the training LayerNorm,
    the gates and GELU, the polyphase split) run instead of MegEngine's (built on first use). Never
    inside a trace: a dumped graph holds MegEngine's operators only, except the graph of
    megfb's own Lite runner (native_in_graph)."""
    return _NATIVE["on"] and not is_tracing() and native.load()


def native_graph_usable(enabled=True):
    """Whether native_in_graph(enabled) would record megfb's operators: asked for, not turned
    off (use_native), and loadable."""
    return bool(enabled) and _NATIVE["on"] and native.load()


@contextlib.contextmanager
def native_in_graph(enabled=True):
    """Inside the block, a traced eval-mode forward records megfb's inference operators (the
    gates and GELU, the polyphase split and merge, the depthwise convs, the LayerNorm's
    standardisation) instead of
    MegEngine's: for the graph megfb's own Lite runner loads in this process, where the library
    is loaded (megfb/lite.py). Graphs for anyone else (the submission's model.mge) are traced
    outside it and hold MegEngine's operators only. Does nothing when the operators cannot be
    loaded (native_graph_usable)."""
    previous = _NATIVE["graph"]
    _NATIVE["graph"] = native_graph_usable(enabled)
    try:
        yield _NATIVE["graph"]
    finally:
        _NATIVE["graph"] = previous


_TRAIN = {"pointwise": "conv", "depthwise": "native"}


@contextlib.contextmanager
def training_paths(pointwise="conv", depthwise="native"):
    """Inside the block, the 1x1 convs run as pointwise_matmul ("matmul") or pointwise_train
    ("conv", the default), the depthwise convs as MegEngine's convs ("megengine"; their weight
    gradient stays megfb's operator) or megfb's ("native", the default): for measuring the
    paths against each other (docs/measure_train_paths.py)."""
    if pointwise not in ("conv", "matmul") or depthwise not in ("native", "megengine"):
        raise ValueError(f"training_paths: unknown pointwise={pointwise!r} or depthwise={depthwise!r}")
    previous = dict(_TRAIN)
    _TRAIN.update(pointwise=pointwise, depthwise=depthwise)
    try:
        yield
    finally:
        _TRAIN.update(previous)


def native_graph():
    """True while tracing inside native_in_graph()."""
    return _NATIVE["graph"] and is_tracing()


class _SameConv(Function):
    """Stride-1 "same" conv (dense or depthwise) whose backward is written as forward convs.

    MegEngine 1.13's CPU ConvolutionBackwardFilter is the training bottleneck (over half of a
    training step): a 5x5 depthwise conv on 8x32x64x64 spends ~180 ms in backward. Both
    gradients are correlations, so they run as ordinary forward convs (~9x faster there):
    dx = conv(dy, flipped w), and dw = conv of the batch-transposed input with dy as the
    kernel (the batch becomes the reduction axis).
    """

    def __init__(self, padding, groups, tune=False):
        super().__init__()
        self.padding, self.groups, self.tune = padding, groups, tune

    def forward(self, x, w):
        self.x, self.w = x, w
        return conv(x, w, self.padding, self.groups, self.tune)

    def backward(self, dy):
        x, w, p, g = self.x, self.w, self.padding, self.groups
        b, c, h, wd = x.shape
        flipped = w[..., ::-1, ::-1].flatten().reshape(w.shape)  # conv2d needs a contiguous filter
        if g == 1:
            dx = conv(dy, flipped.transpose(1, 0, 2, 3), p, 1)
            xt, dyt = x.transpose(1, 0, 2, 3), dy.transpose(1, 0, 2, 3)
            if dy.shape[1] >= c:
                dw = conv(xt, dyt, p, 1)  # (c_in, c_out, k, k)
                return dx, dw.transpose(1, 0, 2, 3)
            # fewer outputs than inputs (conv_out's 32 -> 4): the same correlation with the
            # roles swapped has c_in output channels, where MegEngine's kernel is ~5x faster;
            # it gives the weight gradient rotated by 180 degrees
            dw = conv(dyt, xt, p, 1)  # (c_out, c_in, k, k), rotated
            return dx, dw[..., ::-1, ::-1]
        dx = conv(dy, flipped, p, g)
        k = w.shape[-1]
        if g == c and w.shape[-2] == k and 2 * p == k - 1 and native_ops():
            return dx, native.depthwise_wgrad(x, dy, k, p).reshape(w.shape)
        xt = x.transpose(1, 0, 2, 3).reshape(1, c * b, h, wd)
        dyt = dy.transpose(1, 0, 2, 3).reshape(c, 1, b, dy.shape[2], dy.shape[3])
        return dx, conv(xt, dyt, p, g).reshape(w.shape)


class _BiasAdd(Function):
    """y + bias, the bias's gradient summed here over the axes it broadcasts along.

    MegEngine 1.13's own `y + bias`, after the fast paths' custom Functions (1x1 and depthwise
    convs), gave a wrong bias gradient now and then on a CPU device with a worker thread: in
    1-2% of a tiny model's repeated backwards on "xpux", one bias's gradient slightly off, 1e35
    or NaN; never one summed here, in 2,000 (`python docs/measure_bias_grads.py`;
    tests/test_layers.py repeats 400 backwards). The same sums as MegEngine's, so the gradients
    are bit-equal to its correct ones."""

    def forward(self, y, bias):
        self.bias_shape = bias.shape
        return y + bias

    def backward(self, dy):
        if len(dy.shape) == 4 and tuple(self.bias_shape) == (1, dy.shape[1], 1, 1):
            # a conv's bias: the same sums in the same order as MegEngine's own reduce to the
            # bias's shape (bit-equal gradients), and faster than dy.sum over (0, 2, 3)
            b, c, h, w = dy.shape
            return dy, dy.reshape(b, c, h * w).sum(2).sum(0).reshape(self.bias_shape)
        axes = tuple(i for i, (a, b) in enumerate(zip(dy.shape, self.bias_shape)) if a != b)
        return dy, dy.sum(axis=axes, keepdims=True) if axes else dy


def add_bias(y, bias):
    """y + bias (bias broadcast, e.g. (1, C, 1, 1)) for a custom Function's output y (_BiasAdd);
    y itself when bias is None."""
    return y if bias is None else _BiasAdd()(y, bias)


def same_conv(x, w, bias, padding, groups, tune=False):
    """Stride-1 "same" conv plus bias, gradients as forward convs (_SameConv); a depthwise conv
    with a square kernel by megfb's operator where it is available (depthwise)."""
    k = w.shape[-1]
    if groups == x.shape[1] and w.shape[-2] == k and 2 * padding == k - 1 and w.shape[0] == groups:
        y = depthwise(x, w, k)
        if y is not None:
            return add_bias(y, bias)
    y = _SameConv(padding, groups, tune)(x, w)
    return add_bias(y, bias)


class _Depthwise(Function):
    """Stride-1 same depthwise conv by megfb's operators (csrc/depthwise.cpp): the forward, the
    input gradient (the same operator with rotated kernels) and the weight gradient; `share`
    maps in a row use one kernel (w: (G / share, ...))."""

    def __init__(self, k, share):
        super().__init__()
        self.k, self.share = k, share

    def forward(self, x, w):
        self.x, self.w = x, w
        return native.depthwise_conv(x, w, self.k, self.k // 2, self.share)

    def backward(self, dy):
        k, s = self.k, self.share
        dx = native.depthwise_conv(dy, self.w, k, k // 2, s, flip=True)
        return dx, native.depthwise_wgrad(self.x, dy, k, k // 2, s).reshape(self.w.shape)


def depthwise(x, w, k, share=1):
    """A stride-1 same depthwise conv of x (B, G, H, W) with odd square kernels w (G / share
    kernels, any shape holding k*k each; map g uses kernel g // share) by megfb's operators, in
    training and eval and in the graph of megfb's Lite runner (native_in_graph); None where they
    are not in use (the caller runs MegEngine's conv) or training_paths(depthwise="megengine")."""
    if _TRAIN["depthwise"] != "native":
        return None
    if native_ops():
        return _Depthwise(k, share)(x, w)
    if native_graph():
        return native.depthwise_conv(x, w, k, k // 2, share)
    return None


def pointwise_eval(x, weight, bias=None):
    """1x1 conv for inference: kernel chosen by timing, bias fused (ConvBias) when there is one.

    The timed 1x1 conv kernel runs at ~80-120 GFLOP/s on this CPU, F.matmul at ~45 (96x32 on
    128x128: 1.2 vs 2.3 ms); with a bias it is one ConvBias op instead of a conv and an add.
    """
    if bias is None:
        return conv(x, weight, 0, 1, tune=True)
    op = builtin.ConvBias(nonlineMode="IDENTITY", strategy=TIMED, dtype=x.dtype)
    return apply(op, x, weight, bias)[0]


def pointwise_matmul(x, weight, bias=None):
    """1x1 conv as a matrix product (megfb's training path before pointwise_train, kept for
    comparison: training_paths(pointwise="matmul")): MegEngine's CPU Conv2d weight gradient is
    the bottleneck (a 152->152 1x1 conv on 8x64x64: 1.9 s forward+backward as Conv2d, 0.24 s
    as a matmul). One patch: a plain GEMM beats the broadcast batched one (~1.5x)."""
    b, c, h, w = x.shape
    out = weight.shape[0]
    weight = weight.reshape(out, c)
    if b == 1:
        y = F.matmul(weight, x.reshape(c, h * w))
    else:
        y = F.matmul(weight, x.reshape(b, c, h * w))
    y = y.reshape(b, out, h, w)
    return y if bias is None else y + bias


class _PointwiseConv(Function):
    """1x1 conv for training whose products run where MegEngine is fastest on CPU: the forward
    and the input gradient (a 1x1 conv with the transposed weight) as convs with kernels chosen
    by timing (100-150 GFLOP/s on FBRestormer's 8x64x64 training maps, against 60-100 for the
    batched matmul of pointwise_matmul), the weight gradient as a matmul
    (MegEngine's own Conv2d weight gradient is its slow ConvolutionBackwardFilter: a 152->152
    1x1 conv on 8x64x64 took 1.9 s forward+backward as Conv2d, 0.24 s with matmuls)."""

    def forward(self, x, w):
        self.x, self.w = x, w
        return conv(x, w, 0, 1, tune=True)

    def backward(self, dy):
        x, w = self.x, self.w
        b, c, h, wd = x.shape
        out = w.shape[0]
        wt = w.reshape(out, c).transpose(1, 0).reshape(c, out, 1, 1)
        dx = conv(dy, wt, 0, 1, tune=True)
        if b == 1:
            dw = F.matmul(dy.reshape(out, h * wd), x.reshape(c, h * wd), transpose_b=True)
        else:
            dw = F.matmul(dy.reshape(b, out, h * wd), x.reshape(b, c, h * wd), transpose_b=True).sum(0)
        return dx, dw.reshape(w.shape)


def pointwise_train(x, weight, bias=None):
    """1x1 conv for training (_PointwiseConv: timed convs forward and for the input gradient,
    a matmul for the weight gradient; pointwise_matmul under training_paths(pointwise="matmul"))."""
    if _TRAIN["pointwise"] == "matmul":
        return pointwise_matmul(x, weight, bias)
    y = _PointwiseConv()(x, weight)
    return add_bias(y, bias)


def pointwise_matmul_per_sample(x, weight, bias=None):
    """A 1x1 conv whose (out, in) weight differs per sample: weight (b, out, in), x (b, in, h, w).
    One patch: a plain GEMM (see pointwise_matmul)."""
    b, c, h, w = x.shape
    out = weight.shape[1]
    if b == 1:
        y = F.matmul(weight.reshape(out, c), x.reshape(c, h * w))
    else:
        y = F.matmul(weight, x.reshape(b, c, h * w))
    y = y.reshape(b, out, h, w)
    return y if bias is None else y + bias


# ------------------------------------------------------------------------------ polyphase


def space_to_phases(x, d, by_conv=False):
    """(B,C,H,W) -> (B, C, d*d*H/d, W/d): the d x d polyphase sub-images stacked along the rows.

    Phase (i, j) occupies rows [(i*d + j)*H/d, (i*d + j + 1)*H/d). Stacked in the rows, not
    the batch, so per-pixel layers see one image (a single GEMM for one patch) and the
    conv on the phases is a reshape away: (B, C*d*d, H/d, W/d) is the same memory.

    by_conv: move the pixels with a stride-d grouped conv whose kernels are one-hot (each
    output is 1 * x + exact zeros, so bit-identical). MegEngine's strided-copy relayout of the
    6-d transpose is ~10x slower than a plain copy; the conv is ~3x faster than it (eval mode,
    kernel chosen by timing; it has no backward). Otherwise megfb's row-copy operators
    (native.space_to_phases, each direction the other's gradient) where they are available,
    else the relayout. Traced inside native_in_graph, megfb's operator either way.
    """
    b, c, h, w = x.shape
    if native_graph():
        return native.space_to_phases(x, d)
    if by_conv:
        op = builtin.Convolution(stride_h=d, stride_w=d, sparse="group", strategy=TIMED)
        return apply(op, x, phase_picker(c, d, x.device))[0].reshape(b, c, h * d, w // d)
    if native_ops():
        return _Phases(d, split=True)(x)
    return relayout_to_phases(x, d)


def relayout_to_phases(x, d):
    """space_to_phases through MegEngine's relayout of a 6-d transpose (autodiff's backward)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // d, d, w // d, d).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c, h * d, w // d)


def phases_to_space(x, d, by_conv=False):
    """Inverse of space_to_phases (by_conv: the transposed one-hot conv, bit-identical too)."""
    b, c, hd, w = x.shape
    h = hd // (d * d)
    if native_graph():
        return native.phases_to_space(x, d)
    if by_conv:
        op = builtin.ConvolutionBackwardData(stride_h=d, stride_w=d, sparse="group",
                                             strategy=TIMED)
        return apply(op, phase_picker(c, d, x.device), x.reshape(b, c * d * d, h, w))[0]
    if native_ops():
        return _Phases(d, split=False)(x)
    return relayout_to_space(x, d)


def relayout_to_space(x, d):
    """phases_to_space through MegEngine's relayout of a 6-d transpose (autodiff's backward)."""
    b, c, hd, w = x.shape
    h = hd // (d * d)
    x = x.reshape(b, c, d, d, h, w).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h * d, w * d)


class _Phases(Function):
    """space_to_phases (split) or phases_to_space by megfb's operators (csrc/phases.cpp),
    each the other's gradient: row copies instead of MegEngine's 6-d transpose relayout."""

    def __init__(self, d, split):
        super().__init__()
        self.d, self.split = d, split

    def forward(self, x):
        return (native.space_to_phases if self.split else native.phases_to_space)(x, self.d)

    def backward(self, dy):
        return (native.phases_to_space if self.split else native.space_to_phases)(dy, self.d)


def phase_picker(c, d, device=None):
    """Group conv weight (c, d*d, 1, d, d): output k = i*d + j of each group picks pixel (i, j)."""
    pick = np.eye(d * d, dtype=np.float32).reshape(1, d * d, 1, d, d)
    return constant(("phase_picker", int(c), int(d)),
                    lambda: np.ascontiguousarray(np.broadcast_to(pick, (c, d * d, 1, d, d))), device)


def depthwise_on_phases(x, weight, bias, d, tune=False):
    """A depthwise k x k conv with dilation d, on input already split by space_to_phases(., d):
    output pixel (i, j) only sees inputs of its own phase, so it is the undilated conv on
    each phase (padding (k-1)/2), one group per (channel, phase) sharing the channel's kernel."""
    k = weight.shape[-1]
    if d == 1:
        return same_conv(x, weight, bias, (k - 1) // 2, weight.shape[0], tune)
    b, c, hd, w = x.shape
    dd = d * d
    y = depthwise(x.reshape(b, c * dd, hd // dd, w), weight, k, share=dd)
    if y is not None:
        y = y.reshape(b, c, hd, w)
        return add_bias(y, bias)
    phased = F.broadcast_to(weight.reshape(c, 1, 1, 1, k, k), (c, dd, 1, 1, k, k))
    y = same_conv(x.reshape(b, c * dd, hd // dd, w), phased.reshape(c * dd, 1, 1, k, k), None,
                  (k - 1) // 2, c * dd, tune)
    y = y.reshape(b, c, hd, w)
    return add_bias(y, bias)


# ------------------------------------------------------------------------------ LayerNorm


def standardise(x):
    """LayerNorm without its affine part: ((x - mean) * rstd, rstd), rstd = 1/sqrt(var + 1e-5)
    over channels; the variance is one SUM_SQR reduction (no POW)."""
    d = x - F.mean(x, axis=1, keepdims=True)
    rstd = 1.0 / F.sqrt(reduce("SUM_SQR", d, axis=1) * (1.0 / x.shape[1]) + 1e-5)
    return d * rstd, rstd


class _ChannelNorm(Function):
    """LayerNorm over channels with a hand-written backward (autodiff's graph of ~20 full-size
    elementwise ops, including a slow POW, becomes ~10). The forward makes three full-size
    passes: x - mean, times 1/std, and one fused multiply-add for weight and bias."""

    def __init__(self, use_native=False):
        super().__init__()
        self.native = use_native

    def forward(self, x, weight, bias):
        self.weight = weight
        if self.native:
            y, self.xhat, self.rstd = native.channel_norm_forward(x, weight, bias)
            return y
        self.xhat, self.rstd = standardise(x)
        return elemwise("FUSE_MUL_ADD3", self.xhat, weight, bias)

    def backward(self, dy):
        if self.native:
            dx, dweight, dbias = native.channel_norm_backward(dy, self.xhat, self.rstd, self.weight)
            return dx, dweight.reshape(self.weight.shape), dbias.reshape(self.weight.shape)
        xhat = self.xhat
        g = dy * self.weight
        dx = (g - F.mean(g, axis=1, keepdims=True)
              - xhat * F.mean(g * xhat, axis=1, keepdims=True)) * self.rstd
        dweight = F.sum(dy * xhat, axis=(0, 2, 3), keepdims=True)
        dbias = F.sum(dy, axis=(0, 2, 3), keepdims=True)
        return dx, dweight, dbias


def channel_norm(x, weight, bias, training=False):
    """LayerNorm over the channel axis (population variance, eps 1e-5), fast backward; in
    training, megfb's own operators (megfb/native.py) compute it where they are available."""
    return _ChannelNorm(training and native_ops())(x, weight, bias)


def norm_folded_into_pointwise(x, norm_weight, norm_bias, weight, bias=None):
    """pointwise(layernorm(x)) for inference, LayerNorm's affine part folded into the 1x1 conv:
    W (g * xhat + b) + c = (W diag g) xhat + (W b + c), so the affine pass over the map
    disappears into the conv's fused bias. Traced inside native_in_graph, the standardised
    map comes from megfb's LayerNorm operator (one pass instead of ~5)."""
    c = x.shape[1]
    folded = weight * norm_weight.reshape(1, c, 1, 1)
    shift = F.matmul(weight.reshape(-1, c), norm_bias.reshape(c, 1)).reshape(1, -1, 1, 1)
    if bias is not None:
        shift = shift + bias
    if native_graph():  # (y, xhat, rstd): the standardised map is the second output
        xhat = native.channel_norm_forward(x, norm_weight, norm_bias)[1]
    else:
        xhat = standardise(x)[0]
    return pointwise_eval(xhat, folded, shift)


# ------------------------------------------------------------------------------------ GELU


def fit_gelu_logit_poly(degree=6, x_max=6.0, n=20000, rounds=80):
    """Coefficients c_0..c_degree with logit(Phi(x)) ~= x * sum_k c_k (x*x)**k on [0, x_max].

    logit(Phi) is odd, so one side suffices. The error is weighted by x^2 Phi (1 - Phi), the
    sensitivity of gelu(x) = x Phi(x) to it, and Lawson's reweighting turns the least-squares
    fit into a near-minimax one. This is how GELU_LOGIT_POLY below was obtained (a test re-runs
    it). No clamp is needed past x_max: the fitted polynomial stays above c_0 for every x*x >= 0,
    so x * poly keeps growing and sigmoid saturates (Phi(5.3) is already 1 in float32).
    """
    xs = np.linspace(x_max / n, x_max, n)
    upper = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in xs])  # Phi(x)
    lower = np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in xs])  # 1 - Phi(x), no cancellation
    target = (np.log(upper) - np.log(lower)) / xs
    weight = xs * xs * upper * lower
    vander = np.vander(xs * xs, degree + 1, increasing=True)
    focus = np.ones_like(xs)
    for _ in range(rounds):
        coef = np.linalg.lstsq(vander * (weight * focus)[:, None], target * weight * focus,
                               rcond=None)[0]
        err = np.abs(vander @ coef - target) * weight
        focus = focus * np.sqrt(err / err.max()) + 1e-15
        focus /= focus.max()
    return coef


GELU_LOGIT_POLY = (1.5957685, 0.072668567, -6.6259374e-05, -0.0001104805, 7.9382444e-06,
                   -2.6689435e-07, 3.6112671e-09)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class _GELU(Function):
    """gelu(x) = x Phi(x) from vectorised kernels: Phi(x) = sigmoid(x * poly(x*x)).

    MegEngine 1.13's CPU GELU (and ERF, GELU_GRAD) evaluates erf one element at a time: ~10x
    slower than SIGMOID or a fused multiply-add on the same map, and a fifth of a fast-path
    forward pass. With the fitted polynomial (GELU_LOGIT_POLY) the formula is within 7e-8 of
    gelu in float64; evaluated in float32 it is as close to the erf definition as MegEngine's
    own GELU (tests/test_layers.py). The backward is the exact derivative
    Phi(x) + x * exp(-x^2/2) / sqrt(2 pi), with EXP (vectorised) for the normal density.
    """

    def forward(self, x):
        t = x * x
        c = GELU_LOGIT_POLY
        # numpy scalars, not Tensors, for record-only traces (see constant)
        p = elemwise("FUSE_MUL_ADD3", t, np.float32(c[-1]), np.float32(c[-2]))
        for coef in c[-3::-1]:
            p = elemwise("FUSE_MUL_ADD3", p, t, np.float32(coef))
        self.x = x
        self.phi = F.sigmoid(p * x)
        return x * self.phi

    def backward(self, dy):
        x = self.x
        density = F.exp(x * x * -0.5) * _INV_SQRT_2PI
        return dy * elemwise("FUSE_MUL_ADD3", x, density, self.phi)


class _NativeGELU(Function):
    """gelu(x) by megfb's operators (csrc/gated_gelu.cpp): _GELU's formula in one pass each way."""

    def forward(self, x):
        self.x = x
        return native.gelu_forward(x)

    def backward(self, dy):
        return native.gelu_backward(dy, self.x)


def fast_gelu(x):
    """F.gelu through vectorised kernels: megfb's operator where it is available (and in the
    graph of megfb's Lite runner, native_in_graph), else _GELU's MegEngine operators."""
    if native_ops() and x.ndim <= 4:
        return _NativeGELU()(x)
    if native_graph() and x.ndim <= 4:
        return native.gelu_forward(x)
    return _GELU()(x)


class _GatedGELU(Function):
    """gelu(x1) * x2 over the channel halves of x by megfb's operators (csrc/gated_gelu.cpp;
    swap: x1 * gelu(x2)): the formula of _GELU in one pass each way; the backward recomputes
    Phi from x."""

    def __init__(self, swap=False):
        super().__init__()
        self.swap = swap

    def forward(self, x):
        self.x = x
        return native.gated_gelu_forward(x, self.swap)

    def backward(self, dy):
        return native.gated_gelu_backward(dy, self.x, self.swap)


def gated_gelu(x, swap=False):
    """GDFN's gate gelu(x1) * x2, x1 and x2 the channel halves of x (B, 2H, h, w) (swap: the
    GFM's x1 * gelu(x2)), in training and eval alike; megfb's own operators compute it where
    they are available (and in the graph of megfb's Lite runner, native_in_graph), else _GELU
    and F.split (whose gradient is one concat; slicing's is a fill and a set for each half)."""
    if native_ops():
        return _GatedGELU(swap)(x)
    if native_graph():
        return native.gated_gelu_forward(x, swap)
    return gate_by_megengine(x, swap)


def gate_by_megengine(x, swap=False):
    """gated_gelu through MegEngine's operators: _GELU on one half, F.split."""
    x1, x2 = F.split(x, 2, axis=1)
    return x1 * _GELU()(x2) if swap else _GELU()(x1) * x2


# ------------------------------------------------------------------------------- attention


def head_mask(heads, device=None):
    """(1, heads, 1, heads, 1) identity: keeps head i's block on the diagonal of a (c x c) map."""
    return constant(("head_mask", int(heads)),
                    lambda: np.eye(heads, dtype=np.float32).reshape(1, heads, 1, heads, 1), device)


def l2_norms(t, axis):
    """|t| along `axis` (kept), clamped at 1e-12 exactly like F.normalize (= torch's)."""
    return F.maximum(F.sqrt(reduce("SUM_SQR", t, axis=axis)), 1e-12)


# ------------------------------------------------------------------- multi-dilation convs


def dilation_placement(k, dilations):
    """(n, k*k, S*S) one-hot: tap (u, v) of a k x k kernel dilated by dilations[i] sits at
    (c + (u - m) r, c + (v - m) r) of the S x S combined kernel, S = (k-1) max(r) + 1,
    m = (k-1)/2, c = (S-1)/2 (all branches share their centre: "same" padding r (k-1)/2)."""
    def make():
        side = (k - 1) * max(dilations) + 1
        c, m = (side - 1) // 2, (k - 1) // 2
        p = np.zeros((len(dilations), k * k, side * side), dtype=np.float32)
        for i, r in enumerate(dilations):
            for u in range(k):
                for v in range(k):
                    p[i, u * k + v, (c + (u - m) * r) * side + c + (v - m) * r] = 1.0
        return p

    return constant(("dilation_placement", int(k), tuple(int(r) for r in dilations)), make)


def multi_dilation_kernel(weight, coefficients, k, dilations):
    """sum_i coefficients[i] * dilate(weight, dilations[i]) as one S x S kernel (same leading
    shape as weight): weight's taps times the coefficient-weighted placement matrix, a product
    autodiff differentiates in both weight and coefficients. Exact: each combined tap is a sum
    of at most len(dilations) products a_i w (taps of different branches may coincide)."""
    placement = dilation_placement(k, dilations)
    n, kk, ss = placement.shape
    mix = F.matmul(coefficients.reshape(1, n), placement.reshape(n, kk * ss)).reshape(kk, ss)
    lead = weight.shape[:-2]
    side = int(round(ss ** 0.5))
    return F.matmul(weight.reshape(-1, kk), mix).reshape(*lead, side, side)


def leaky_relu(x, slope):
    """max(x, slope * x) for 0 < slope < 1: two vectorised passes (MUL, MAX). MegEngine 1.13's
    CPU F.leaky_relu runs as PRELU, several times slower than that on a 348-channel map; the
    2nd place's network applies it 5 times per unroll (a third of its plain forward time)."""
    return F.maximum(x, x * slope)


def settle():
    """Wait for every queued kernel, in eager execution only (a no-op while tracing).

    MegEngine's asynchronous dispatch lets Python queue a whole forward pass ahead of the
    kernels, and the queued ops' maps pile up meanwhile: the 2nd place's 48 unrolls grew by
    ~76 MB per unroll on a 64x64 patch (1.2 GB for 16 unrolls; 21 MB with synchronous
    dispatch), which at 256x256 is tens of GB. Settling once per unroll bounds it to one
    unroll's maps and costs nothing measurable (the kernels dominate)."""
    from megengine.jit.tracing import is_tracing

    if not is_tracing():
        mge._full_sync()
