"""Building blocks of FBRestormer (and the Restormer it comes from), in plain MegEngine.

Read top-down like the paper: the conv primitives (each with its fast CPU path beside the
plain definition), LayerNorm, MDTA attention, GDFN feed-forward, the TransformerBlock, and the
two fusion blocks of the feedback body. Key names and shapes follow the published checkpoint
(see shared/spec/fbrestormer.md); the fast paths use the very same Parameters, so switching
them (`fast=` at construction, `set_fast(module, enabled)` later) never changes a state dict.

Fast paths (MegEngine 1.13 CPU; measured side by side, see `megfb bench`):
- conv weight/input gradients computed as forward convs (_SameConv): MegEngine's CPU
  ConvolutionBackwardFilter was over half of a training step;
- in eval mode, conv kernels chosen by timing (among MegEngine's optimised kernels, per op);
- a depthwise conv with dilation d runs undilated on the d x d polyphase sub-images (the
  dilated 5x5 conv is ~45x slower); in a TransformerBlock the whole FFN half runs on them, and
  in eval mode one-hot stride-d convs move the pixels (3x faster than the strided relayout);
- a 1x1 conv runs as a matmul in training (its Conv2d weight gradient is ~8x slower on CPU) and
  as a timed-kernel conv with fused bias in eval (~2x faster than the matmul);
- LayerNorm over channels with a hand-written backward (no POW, half the full-size ops); in
  eval its affine part is folded into the 1x1 conv that follows it;
- GELU from vectorised kernels (a fitted sigmoid form; MegEngine's erf is scalar code);
- attention normalises q and k after the q @ k^T product (c x c instead of c x HW) and folds
  the attention matrices into project_out's weight (attn @ v disappears);
- F.split instead of channel slices (the gradient is one concat, not zero-fill + set).
Each is exact up to float rounding; tests/test_layers.py proves it, gradients included.
"""
import contextlib
import math

import megengine as mge
import megengine.functional as F
import megengine.module as M
import numpy as np
from megengine.autodiff import Function
from megengine.core._imperative_rt.core2 import apply
from megengine.core.ops import builtin


def set_fast(module, enabled):
    """Switch every fast path under `module` on or off (the weights stay the same Parameters)."""
    for m in module.modules():
        if hasattr(m, "fast"):
            m.fast = bool(enabled)
    return module


@contextlib.contextmanager
def fast_paths_restored(module):
    """Let a block of code switch fast paths freely; every switch is put back as it was after."""
    switches = [m for m in module.modules() if hasattr(m, "fast")]
    saved = [m.fast for m in switches]
    try:
        yield module
    finally:
        for m, fast in zip(switches, saved):
            m.fast = fast


# Kernel choice by timing, among MegEngine's optimised kernels only: on a new shape the timing
# takes 0.1-1.3 s per conv instead of 0.3-14 s for plain PROFILE (which also times the naive
# kernels; 69 s for a first FBRestormer forward), and the chosen kernels run as fast.
TIMED = builtin.Convolution.Strategy.PROFILE | builtin.Convolution.Strategy.OPTIMIZED
HEURISTIC = builtin.Convolution.Strategy.HEURISTIC


def _conv(x, w, padding, groups, tune=False):
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


def _constant(key, make):
    """A constant Tensor, made once per process. The modules that use one ask for it when they
    are built: a Tensor created inside a traced function has no data in a record-only trace
    (`megfb params`/`submit` export that way), one made before is captured like a parameter.
    Kept out of the modules themselves, where it would join the state dict."""
    if key not in _CONSTANTS:
        _CONSTANTS[key] = mge.tensor(make())
    return _CONSTANTS[key]


def _elemwise(mode, *inputs):
    return apply(builtin.Elemwise(mode=mode), *inputs)[0]


def _reduce(mode, x, axis):
    return apply(builtin.Reduce(mode=mode, axis=axis, keepdim=True), x)[0]


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
        # numpy scalars, not Tensors, for record-only traces (see _constant)
        p = _elemwise("FUSE_MUL_ADD3", t, np.float32(c[-1]), np.float32(c[-2]))
        for coef in c[-3::-1]:
            p = _elemwise("FUSE_MUL_ADD3", p, t, np.float32(coef))
        self.x = x
        self.phi = F.sigmoid(p * x)
        return x * self.phi

    def backward(self, dy):
        x = self.x
        density = F.exp(x * x * -0.5) * _INV_SQRT_2PI
        return dy * _elemwise("FUSE_MUL_ADD3", x, density, self.phi)


def gelu(x, fast=True):
    """F.gelu, or the same function through vectorised kernels (`_GELU`) on the fast path."""
    return _GELU()(x) if fast else F.gelu(x)


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
        return _conv(x, w, self.padding, self.groups, self.tune)

    def backward(self, dy):
        x, w, p, g = self.x, self.w, self.padding, self.groups
        b, c, h, wd = x.shape
        flipped = w[..., ::-1, ::-1].flatten().reshape(w.shape)  # conv2d needs a contiguous filter
        if g == 1:
            dx = _conv(dy, flipped.transpose(1, 0, 2, 3), p, 1)
            dw = _conv(x.transpose(1, 0, 2, 3), dy.transpose(1, 0, 2, 3), p, 1)
            return dx, dw.transpose(1, 0, 2, 3)
        dx = _conv(dy, flipped, p, g)
        xt = x.transpose(1, 0, 2, 3).reshape(1, c * b, h, wd)
        dyt = dy.transpose(1, 0, 2, 3).reshape(c, 1, b, dy.shape[2], dy.shape[3])
        return dx, _conv(xt, dyt, p, g).reshape(w.shape)


def same_conv(x, w, bias, padding, groups, tune=False):
    y = _SameConv(padding, groups, tune)(x, w)
    return y if bias is None else y + bias


class Conv2d(M.Conv2d):
    """Dense k x k "same" convolution (conv_in / conv_out); fast path: _SameConv's backward."""

    def __init__(self, in_channels, out_channels, kernel_size, bias=True, fast=True):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                         bias=bias)
        self.fast = fast

    def forward(self, x):
        if not self.fast:
            return super().forward(x)
        return same_conv(x, self.weight, self.bias, self.padding[0], 1, tune=not self.training)


class Pointwise(M.Conv2d):
    """1x1 convolution. Fast paths: in training the same product as a matmul, in eval mode the
    conv with its kernel chosen by timing.

    MegEngine's CPU Conv2d weight gradient is the training bottleneck (a 152->152 1x1 conv on
    8x64x64: 1.9 s forward+backward as Conv2d, 0.24 s as a matmul). Forward only, the other way
    round: the 1x1 conv kernel chosen by timing runs at ~80-120 GFLOP/s on this CPU, F.matmul at
    ~45 (96x32 on 128x128: 1.2 vs 2.3 ms); with a bias it is one fused ConvBias op.
    """

    def __init__(self, in_channels, out_channels, bias=True, fast=True):
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.fast = fast

    def forward(self, x):
        if not self.fast:
            return super().forward(x)
        if not self.training:
            return pointwise_eval(x, self.weight, self.bias)
        b, c, h, w = x.shape
        weight = self.weight.reshape(self.out_channels, c)
        if b == 1:  # a plain GEMM beats the broadcast batched one (~1.5x, single patches)
            y = F.matmul(weight, x.reshape(c, h * w))
        else:
            y = F.matmul(weight, x.reshape(b, c, h * w))
        y = y.reshape(b, self.out_channels, h, w)
        return y if self.bias is None else y + self.bias


def pointwise_eval(x, weight, bias=None):
    """1x1 conv for inference: kernel chosen by timing, bias fused (ConvBias) when there is one."""
    if bias is None:
        return _conv(x, weight, 0, 1, tune=True)
    op = builtin.ConvBias(nonlineMode="IDENTITY", strategy=TIMED, dtype=x.dtype)
    return apply(op, x, weight, bias)[0]


def space_to_phases(x, d, by_conv=False):
    """(B,C,H,W) -> (B, C, d*d*H/d, W/d): the d x d polyphase sub-images stacked along the rows.

    Phase (i, j) occupies rows [(i*d + j)*H/d, (i*d + j + 1)*H/d). Stacked in the rows, not
    the batch, so per-pixel layers see one image (a single GEMM for one patch) and the
    conv on the phases is a reshape away: (B, C*d*d, H/d, W/d) is the same memory.

    by_conv: move the pixels with a stride-d grouped conv whose kernels are one-hot (each
    output is 1 * x + exact zeros, so bit-identical). MegEngine's strided-copy relayout of the
    6-d transpose is ~10x slower than a plain copy; the conv is ~3x faster than it (eval mode,
    kernel chosen by timing).
    """
    b, c, h, w = x.shape
    if by_conv:
        op = builtin.Convolution(stride_h=d, stride_w=d, sparse="group", strategy=TIMED)
        return apply(op, x, _phase_picker(c, d))[0].reshape(b, c, h * d, w // d)
    x = x.reshape(b, c, h // d, d, w // d, d).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c, h * d, w // d)


def phases_to_space(x, d, by_conv=False):
    """Inverse of space_to_phases (by_conv: the transposed one-hot conv, bit-identical too)."""
    b, c, hd, w = x.shape
    h = hd // (d * d)
    if by_conv:
        op = builtin.ConvolutionBackwardData(stride_h=d, stride_w=d, sparse="group",
                                             strategy=TIMED)
        return apply(op, _phase_picker(c, d), x.reshape(b, c * d * d, h, w))[0]
    x = x.reshape(b, c, d, d, h, w).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h * d, w * d)


def _phase_picker(c, d):
    """Group conv weight (c, d*d, 1, d, d): output k = i*d + j of each group picks pixel (i, j)."""
    pick = np.eye(d * d, dtype=np.float32).reshape(1, d * d, 1, d, d)
    return _constant(("phase_picker", int(c), int(d)),
                     lambda: np.ascontiguousarray(np.broadcast_to(pick, (c, d * d, 1, d, d))))


class DepthwiseConv(M.Conv2d):
    """Depthwise k x k convolution with "same" padding, optionally dilated.

    Fast path for dilation d > 1: output pixel (i, j) only sees inputs of its own phase
    (i mod d, j mod d), so the dilated conv is an undilated conv (padding (k-1)/2) on each of
    the d*d polyphase sub-images - exact, and ~45x cheaper in MegEngine 1.13 on CPU. Sizes not
    divisible by d are zero-padded at the bottom/right and cropped back, which is exact too
    (those zeros are exactly what the plain conv's own padding would read). GDFN skips the
    conversions altogether when its whole input is already split into phases (`on_phases`).
    """

    def __init__(self, channels, kernel_size, dilation=1, bias=True, fast=True):
        pad = dilation * (kernel_size - 1) // 2
        super().__init__(channels, channels, kernel_size, padding=pad, dilation=dilation,
                         groups=channels, bias=bias)
        self.fast = fast
        if dilation > 1:
            _phase_picker(channels, dilation)  # made now, outside any trace (see _constant)

    def on_phases(self, x):
        """The undilated conv on the polyphase sub-images of space_to_phases (B, C, d*d*h, w)."""
        d, k = self.dilation[0], self.kernel_size[0]
        if d == 1:
            return same_conv(x, self.weight, self.bias, (k - 1) // 2, self.groups, tune=not self.training)
        b, c, hd, w = x.shape
        dd = d * d
        # one group per (channel, phase), every phase of a channel sharing its kernel
        weight = F.broadcast_to(self.weight.reshape(c, 1, 1, 1, k, k), (c, dd, 1, 1, k, k))
        y = same_conv(x.reshape(b, c * dd, hd // dd, w), weight.reshape(c * dd, 1, 1, k, k), None,
                      (k - 1) // 2, c * dd, tune=not self.training)
        y = y.reshape(b, c, hd, w)
        return y if self.bias is None else y + self.bias

    def forward(self, x):
        if not self.fast:
            return super().forward(x)
        d = self.dilation[0]
        if d == 1:
            return self.on_phases(x)
        h, w = x.shape[2], x.shape[3]
        ph, pw = -h % d, -w % d
        if ph or pw:
            x = F.nn.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)))
        by_conv = not self.training
        y = phases_to_space(self.on_phases(space_to_phases(x, d, by_conv)), d, by_conv)
        return y[:, :, :h, :w] if ph or pw else y


def _standardise(x):
    """LayerNorm without its affine part: ((x - mean) * rstd, rstd), rstd = 1/sqrt(var + 1e-5)
    over channels; the variance is one SUM_SQR reduction."""
    d = x - F.mean(x, axis=1, keepdims=True)
    rstd = 1.0 / F.sqrt(_reduce("SUM_SQR", d, axis=1) * (1.0 / x.shape[1]) + 1e-5)
    return d * rstd, rstd


class _ChannelNorm(Function):
    """LayerNorm over channels with a hand-written backward (autodiff's graph of ~20 full-size
    elementwise ops, including a slow POW, becomes ~10). The forward makes three full-size
    passes: x - mean, times 1/std, and one fused multiply-add for weight and bias."""

    def forward(self, x, weight, bias):
        self.xhat, self.rstd = _standardise(x)
        self.weight = weight
        return _elemwise("FUSE_MUL_ADD3", self.xhat, weight, bias)

    def backward(self, dy):
        xhat = self.xhat
        g = dy * self.weight
        dx = (g - F.mean(g, axis=1, keepdims=True)
              - xhat * F.mean(g * xhat, axis=1, keepdims=True)) * self.rstd
        dweight = F.sum(dy * xhat, axis=(0, 2, 3), keepdims=True)
        dbias = F.sum(dy, axis=(0, 2, 3), keepdims=True)
        return dx, dweight, dbias


class LayerNorm(M.Module):
    """LayerNorm over the channel axis of an NCHW map (population variance, eps 1e-5)."""

    def __init__(self, dim, fast=True):
        super().__init__()
        self.fast = fast
        self.weight = mge.Parameter(np.ones((1, dim, 1, 1), dtype=np.float32))
        self.bias = mge.Parameter(np.zeros((1, dim, 1, 1), dtype=np.float32))

    def forward(self, x):
        if self.fast:
            return _ChannelNorm()(x, self.weight, self.bias)
        mu = F.mean(x, axis=1, keepdims=True)
        var = F.var(x, axis=1, keepdims=True)
        return (x - mu) / F.sqrt(var + 1e-5) * self.weight + self.bias


def norm_then_pointwise(norm, pointwise, x):
    """pointwise(norm(x)). Fast path in eval mode: LayerNorm's per-channel weight and bias are
    folded into the 1x1 conv after it, W (g * xhat + b) = (W diag g) xhat + W b, so the affine
    pass over the map disappears into the conv's fused bias."""
    if not (norm.fast and pointwise.fast) or norm.training:
        return pointwise(norm(x))
    c = x.shape[1]
    weight = pointwise.weight * norm.weight.reshape(1, c, 1, 1)
    bias = F.matmul(pointwise.weight.reshape(-1, c), norm.bias.reshape(c, 1)).reshape(1, -1, 1, 1)
    if pointwise.bias is not None:
        bias = bias + pointwise.bias
    return pointwise_eval(_standardise(x)[0], weight, bias)


class MDTA(M.Module):
    """Multi-Dconv head Transposed Attention: attention across channels, not pixels.

    The fast path normalises after the product: (q/|q|)(k/|k|)^T = (q k^T) / (|q| |k|^T), so the
    division touches a (c x c) matrix per head instead of two (c x HW) maps (forward and
    backward). Norms are clamped at 1e-12 exactly like F.normalize (= torch's F.normalize).
    It then folds the attention into project_out (`_fast_attention`).
    """

    def __init__(self, dim, heads, bias=False, fast=True):
        super().__init__()
        self.heads = heads
        self.fast = fast
        self.temperature = mge.Parameter(np.ones((heads, 1, 1), dtype=np.float32))
        _head_mask(heads)  # made now, outside any trace (see _constant)
        self.qkv = Pointwise(dim, dim * 3, bias=bias, fast=fast)
        self.qkv_dwconv = DepthwiseConv(dim * 3, 3, bias=bias, fast=fast)
        self.project_out = Pointwise(dim, dim, bias=bias, fast=fast)

    def forward(self, x, norm=None):
        """attn(x), or attn(norm(x)) with `norm` (so its affine part can fold into qkv)."""
        b, c, h, w = x.shape
        qkv = self.qkv(x) if norm is None else norm_then_pointwise(norm, self.qkv, x)
        qkv = self.qkv_dwconv(qkv)
        if self.fast:
            return self._fast_attention(qkv)
        qkv = qkv.reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q = F.normalize(q, ord=2, axis=-1)
        k = F.normalize(k, ord=2, axis=-1)
        attn = F.matmul(q, k, transpose_b=True) * self.temperature
        attn = F.softmax(attn, axis=-1)
        out = F.matmul(attn, v).reshape(b, c, h, w)
        return self.project_out(out)

    def _fast_attention(self, qkv):
        """Same numbers, fewer full-size passes: the per-head attention matrices are laid on the
        diagonal of one (c x c) matrix and multiplied into project_out's weight, so attn @ v and
        project_out become a single 1x1-conv-sized product with v."""
        b, c3, h, w = qkv.shape
        c, heads = c3 // 3, self.heads
        # F.split's gradient is one concat; slicing's is a zero-fill + set per part
        q, k, v = F.split(qkv, 3, axis=1)
        q, k = (t.reshape(b, heads, c // heads, h * w) for t in (q, k))
        qn = F.maximum(F.sqrt(_reduce("SUM_SQR", q, axis=3)), 1e-12)
        kn = F.maximum(F.sqrt(_reduce("SUM_SQR", k, axis=3)), 1e-12)
        scale = self.temperature / F.matmul(qn, kn, transpose_b=True)
        attn = F.softmax(F.matmul(q, k, transpose_b=True) * scale, axis=-1)
        blocks = attn.reshape(b, heads, c // heads, 1, c // heads) * _head_mask(heads)
        mix = F.matmul(self.project_out.weight.reshape(c, c), blocks.reshape(b, c, c))
        bias = self.project_out.bias
        if b == 1 and not self.training:  # one patch: a 1x1 conv, as Pointwise does in eval
            return pointwise_eval(v, mix.reshape(c, c, 1, 1), bias)
        if b == 1:  # a plain GEMM beats the broadcast batched one (see Pointwise)
            out = F.matmul(mix.reshape(c, c), v.reshape(c, h * w))
        else:
            out = F.matmul(mix, v.reshape(b, c, h * w))
        out = out.reshape(b, c, h, w)
        return out if bias is None else out + bias


def _head_mask(heads):
    """(1, heads, 1, heads, 1) identity: keeps head i's block on the diagonal of a (c x c) map."""
    return _constant(("head_mask", int(heads)),
                     lambda: np.eye(heads, dtype=np.float32).reshape(1, heads, 1, heads, 1))


class GDFN(M.Module):
    """Gated-Dconv Feed-forward Network: gelu(x1) * x2 after a depthwise conv.

    FBRestormer widens the receptive field with a 5x5 dilation-2 depthwise conv (kernel 5,
    dilation 2); the original Restormer uses 3x3, dilation 1.
    """

    def __init__(self, dim, expansion, kernel_size=5, dilation=2, bias=False, fast=True):
        super().__init__()
        hidden = int(dim * expansion)
        self.hidden = hidden
        self.fast = fast
        self.project_in = Pointwise(dim, hidden * 2, bias=bias, fast=fast)
        self.dwconv = DepthwiseConv(hidden * 2, kernel_size, dilation, bias=bias, fast=fast)
        self.project_out = Pointwise(hidden, dim, bias=bias, fast=fast)

    def forward(self, x, on_phases=False, norm=None):
        """on_phases: x is already split into the dwconv's polyphase sub-images (fast path);
        norm: run on norm(x) (its affine part can then fold into project_in)."""
        x = self.project_in(x) if norm is None else norm_then_pointwise(norm, self.project_in, x)
        x = self.dwconv.on_phases(x) if on_phases else self.dwconv(x)
        x1, x2 = F.split(x, 2, axis=1) if self.fast else (x[:, :self.hidden], x[:, self.hidden:])
        return self.project_out(gelu(x1, self.fast) * x2)


class TransformerBlock(M.Module):
    """x = x + attn(norm1(x)); x = x + ffn(norm2(x)).

    Fast path with a dilated FFN conv: everything in the FFN half is per pixel except the
    dilated conv, so that whole half runs on the polyphase sub-images - the 32-channel map is
    split once and joined once instead of the 76-channel conv input/output.
    """

    def __init__(self, dim, heads, expansion, ffn_kernel=5, ffn_dilation=2, bias=False, fast=True):
        super().__init__()
        self.fast = fast
        self.norm1 = LayerNorm(dim, fast=fast)
        self.attn = MDTA(dim, heads, bias=bias, fast=fast)
        self.norm2 = LayerNorm(dim, fast=fast)
        self.ffn = GDFN(dim, expansion, ffn_kernel, ffn_dilation, bias=bias, fast=fast)
        if ffn_dilation > 1:
            _phase_picker(dim, ffn_dilation)  # made now, outside any trace (see _constant)

    def forward(self, x):
        x = x + self.attn(x, norm=self.norm1)
        d = self.ffn.dwconv.dilation[0]
        if self.fast and d > 1 and x.shape[2] % d == 0 and x.shape[3] % d == 0:
            by_conv = not self.training  # the one-hot convs need no backward in eval
            x = space_to_phases(x, d, by_conv)
            return phases_to_space(x + self.ffn(x, on_phases=True, norm=self.norm2), d, by_conv)
        return x + self.ffn(x, norm=self.norm2)


class PDConvFuse(M.Module):
    """Skip fusion in the chain: concat(current, skip) -> 1x1 (2C->C) -> GELU -> depthwise 3x3."""

    def __init__(self, dim, fast=True):
        super().__init__()
        self.fast = fast
        self.pwconv = Pointwise(dim * 2, dim, fast=fast)
        self.dwconv = DepthwiseConv(dim, 3, fast=fast)

    def forward(self, x, skip):
        return self.dwconv(gelu(self.pwconv(F.concat([x, skip], axis=1)), self.fast))


class SimpleGateFuse(M.Module):
    """First half of the GFM: 1x1 (nC -> 2C), then x1 * gelu(x2)."""

    def __init__(self, in_channels, dim, fast=True):
        super().__init__()
        self.dim = dim
        self.fast = fast
        self.conv1x1 = Pointwise(in_channels, dim * 2, fast=fast)

    def forward(self, x):
        x1, x2 = F.split(self.conv1x1(x), 2, axis=1)
        return gelu(x2, self.fast) * x1


def GFM(num_reroute_feats, dim, fast=True):
    """Gated fusion of rerouted features: SimpleGateFuse, then 1x1 conv (keys GFM.0.*, GFM.1.*)."""
    return M.Sequential(SimpleGateFuse(num_reroute_feats * dim, dim, fast=fast),
                        Pointwise(dim, dim, fast=fast))
