"""Building blocks of FBRestormer (and the Restormer it comes from), in plain MegEngine.

Read top-down like the paper: the conv primitives (each with its fast CPU path beside the
plain definition), LayerNorm, MDTA attention, GDFN feed-forward, the TransformerBlock, and the
two fusion blocks of the feedback body. Key names and shapes follow the published checkpoint
(see shared/spec/fbrestormer.md); the fast paths use the very same Parameters, so switching
them (`fast=` at construction, `set_fast(module, enabled)` later) never changes a state dict.

Fast paths (MegEngine 1.13 CPU; measured side by side, see `megfb bench`):
- conv weight/input gradients computed as forward convs (_SameConv): MegEngine's CPU
  ConvolutionBackwardFilter was over half of a training step;
- in eval mode, conv kernels chosen by timing (strategy PROFILE, per op), not by heuristic;
- a depthwise conv with dilation d runs undilated on the d x d polyphase sub-images (the
  dilated 5x5 conv is ~45x slower); in a TransformerBlock the whole FFN half runs on them;
- a 1x1 conv runs as a matmul (its Conv2d weight gradient is ~8x slower on CPU);
- LayerNorm over channels with a hand-written backward (no POW, half the full-size ops);
- attention normalises q and k after the q @ k^T product (c x c instead of c x HW);
- F.split instead of channel slices (the gradient is one concat, not zero-fill + set).
Each is exact up to float rounding; tests/test_layers.py proves it, gradients included.
"""
import contextlib

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


def _conv(x, w, padding, groups, tune=False):
    """F.conv2d (stride 1, no dilation); with `tune`, MegEngine's kernel is chosen by timing.

    Strategy PROFILE times the candidate algorithms once per new shape: in inference the
    dense 5x5 conv_out conv drops from ~70 ms to ~6 ms and a patch runs ~14% faster once warm
    (0.296 vs 0.343 s, measured side by side). In training it buys nothing measurable but the
    first step pays ~80 s of timing (the backward's transposed shapes), so only eval-mode
    forward passes use it. Set per op, not process-wide via set_execution_strategy: PROFILE
    breaks MegEngine 1.13's BatchedMatrixMul ("needed workspace ...; got: 0") when shapes change.
    """
    strategy = builtin.Convolution.Strategy.PROFILE if tune else builtin.Convolution.Strategy.HEURISTIC
    op = builtin.Convolution(pad_h=int(padding), pad_w=int(padding), strategy=strategy,
                             sparse="dense" if groups == 1 else "group")
    return apply(op, x, w)[0]


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
    """1x1 convolution; the fast path is the same product written as a batched matmul.

    MegEngine's CPU Conv2d weight gradient is the training bottleneck (a 152->152 1x1 conv on
    8x64x64: 1.9 s forward+backward as Conv2d, 0.24 s as a matmul).
    """

    def __init__(self, in_channels, out_channels, bias=True, fast=True):
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.fast = fast

    def forward(self, x):
        if not self.fast:
            return super().forward(x)
        b, c, h, w = x.shape
        weight = self.weight.reshape(self.out_channels, c)
        if b == 1:  # a plain GEMM beats the broadcast batched one (~1.5x, single patches)
            y = F.matmul(weight, x.reshape(c, h * w))
        else:
            y = F.matmul(weight, x.reshape(b, c, h * w))
        y = y.reshape(b, self.out_channels, h, w)
        return y if self.bias is None else y + self.bias


def space_to_phases(x, d):
    """(B,C,H,W) -> (B, C, d*d*H/d, W/d): the d x d polyphase sub-images stacked along the rows.

    Phase (i, j) occupies rows [(i*d + j)*H/d, (i*d + j + 1)*H/d). Stacked in the rows, not
    the batch, so per-pixel layers see one image (a single GEMM for one patch) and the
    conv on the phases is a reshape away: (B, C*d*d, H/d, W/d) is the same memory.
    """
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // d, d, w // d, d).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c, h * d, w // d)


def phases_to_space(x, d):
    """Inverse of space_to_phases."""
    b, c, hd, w = x.shape
    h = hd // (d * d)
    x = x.reshape(b, c, d, d, h, w).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h * d, w * d)


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
        y = phases_to_space(self.on_phases(space_to_phases(x, d)), d)
        return y[:, :, :h, :w] if ph or pw else y


class _ChannelNorm(Function):
    """LayerNorm over channels with a hand-written backward (autodiff's graph of ~20 full-size
    elementwise ops, including a slow POW, becomes ~10)."""

    def forward(self, x, weight, bias):
        mu = F.mean(x, axis=1, keepdims=True)
        d = x - mu
        self.rstd = 1.0 / F.sqrt(F.mean(d * d, axis=1, keepdims=True) + 1e-5)
        self.xhat, self.weight = d * self.rstd, weight
        return self.xhat * weight + bias

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


class MDTA(M.Module):
    """Multi-Dconv head Transposed Attention: attention across channels, not pixels.

    The fast path normalises after the product: (q/|q|)(k/|k|)^T = (q k^T) / (|q| |k|^T), so the
    division touches a (c x c) matrix per head instead of two (c x HW) maps (forward and
    backward). Norms are clamped at 1e-12 exactly like F.normalize (= torch's F.normalize).
    """

    def __init__(self, dim, heads, bias=False, fast=True):
        super().__init__()
        self.heads = heads
        self.fast = fast
        self.temperature = mge.Parameter(np.ones((heads, 1, 1), dtype=np.float32))
        self.qkv = Pointwise(dim, dim * 3, bias=bias, fast=fast)
        self.qkv_dwconv = DepthwiseConv(dim * 3, 3, bias=bias, fast=fast)
        self.project_out = Pointwise(dim, dim, bias=bias, fast=fast)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv_dwconv(self.qkv(x))
        if self.fast:
            # F.split's gradient is one concat; slicing's is a zero-fill + set per part
            q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w)
                       for t in F.split(qkv, 3, axis=1))
            qn = F.maximum(F.sqrt(F.sum(q * q, axis=-1, keepdims=True)), 1e-12)
            kn = F.maximum(F.sqrt(F.sum(k * k, axis=-1, keepdims=True)), 1e-12)
            scale = self.temperature / F.matmul(qn, kn, transpose_b=True)
            attn = F.matmul(q, k, transpose_b=True) * scale
        else:
            qkv = qkv.reshape(b, 3, self.heads, c // self.heads, h * w)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            q = F.normalize(q, ord=2, axis=-1)
            k = F.normalize(k, ord=2, axis=-1)
            attn = F.matmul(q, k, transpose_b=True) * self.temperature
        attn = F.softmax(attn, axis=-1)
        out = F.matmul(attn, v).reshape(b, c, h, w)
        return self.project_out(out)


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

    def forward(self, x, on_phases=False):
        """on_phases: x is already split into the dwconv's polyphase sub-images (fast path)."""
        x = self.project_in(x)
        x = self.dwconv.on_phases(x) if on_phases else self.dwconv(x)
        x1, x2 = F.split(x, 2, axis=1) if self.fast else (x[:, :self.hidden], x[:, self.hidden:])
        return self.project_out(F.gelu(x1) * x2)


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

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        d = self.ffn.dwconv.dilation[0]
        if self.fast and d > 1 and x.shape[2] % d == 0 and x.shape[3] % d == 0:
            x = space_to_phases(x, d)
            return phases_to_space(x + self.ffn(self.norm2(x), on_phases=True), d)
        return x + self.ffn(self.norm2(x))


class PDConvFuse(M.Module):
    """Skip fusion in the chain: concat(current, skip) -> 1x1 (2C->C) -> GELU -> depthwise 3x3."""

    def __init__(self, dim, fast=True):
        super().__init__()
        self.pwconv = Pointwise(dim * 2, dim, fast=fast)
        self.dwconv = DepthwiseConv(dim, 3, fast=fast)

    def forward(self, x, skip):
        return self.dwconv(F.gelu(self.pwconv(F.concat([x, skip], axis=1))))


class SimpleGateFuse(M.Module):
    """First half of the GFM: 1x1 (nC -> 2C), then x1 * gelu(x2)."""

    def __init__(self, in_channels, dim, fast=True):
        super().__init__()
        self.dim = dim
        self.conv1x1 = Pointwise(in_channels, dim * 2, fast=fast)

    def forward(self, x):
        x1, x2 = F.split(self.conv1x1(x), 2, axis=1)
        return F.gelu(x2) * x1


def GFM(num_reroute_feats, dim, fast=True):
    """Gated fusion of rerouted features: SimpleGateFuse, then 1x1 conv (keys GFM.0.*, GFM.1.*)."""
    return M.Sequential(SimpleGateFuse(num_reroute_feats * dim, dim, fast=fast),
                        Pointwise(dim, dim, fast=fast))
