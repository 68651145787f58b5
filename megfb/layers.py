"""Building blocks of FBRestormer (and the Restormer it comes from), in plain MegEngine.

Read top-down like the paper: the per-channel standardisation, the conv primitives, GELU,
LayerNorm, MDTA attention, GDFN feed-forward, the TransformerBlock, and the two fusion blocks
of the feedback body. Key names and shapes follow the published checkpoint (see
shared/spec/fbrestormer.md).

Every layer has a switch `fast` (set at construction, or later with `set_fast(module, on)`;
the weights stay the same Parameters, so a state dict never changes) and one forward written
the same way everywhere:

    if not self.fast:   the plain definition, as the paper/spec writes it
    if self.training:   fast path for training (gradients needed)
    otherwise:          fast path for inference

The op-level MegEngine tricks live in megfb/ops.py; tests/test_layers.py proves every fast
path equal to the plain definition (outputs and gradients). Which code runs when:

| layer          | plain              | fast, training                  | fast, eval                          |
|----------------|--------------------|---------------------------------|-------------------------------------|
| Conv2d         | M.Conv2d           | same_conv: gradients as forward | same_conv, kernel chosen by timing  |
|                |                    | convs                           |                                     |
| Pointwise      | M.Conv2d (1x1)     | timed 1x1 convs forward and for | ConvBias, timed kernel; given a     |
|                |                    | the input gradient, a matmul    | LayerNorm, its affine part is folded|
|                |                    | for the weight gradient         | into this conv's weight and bias    |
| DepthwiseConv  | M.Conv2d, dilated  | d = 1: megfb's C++ conv (else   | as training; pixels moved by one-hot|
|                |                    | same_conv); d > 1: the same on  | stride-d convs (the Lite runner's   |
|                |                    | the d x d polyphase sub-images  | graph: the C++ operators)           |
|                |                    | (row-copy operators)            |                                     |
| LeakyReLU      | F.leaky_relu       | max(x, slope x) (two vectorised | same                                |
|                | (PRELU kernel)     | passes; autodiff backward)      |                                     |
| GELU           | F.gelu (erf)       | sigmoid(x * poly(x*x)), exact   | same                                |
|                |                    | derivative in the backward (by  |                                     |
|                |                    | megfb's C++ operator)           |                                     |
| LayerNorm      | mean / F.var       | hand-written backward, one      | same (folded away when a Pointwise  |
|                |                    | SUM_SQR reduction               | follows it, see Pointwise)          |
| MDTA           | normalise q, k;    | normalise after q k^T; attn     | same; one patch: the product with v |
|                | attn @ v;          | folded into project_out's       | is a timed 1x1 conv                 |
|                | project_out        | weight, one matmul with v       |                                     |
| GDFN, GFM gate | channel slices     | gelu(x1) * x2 (GFM: x1 *        | same (traced for anyone but megfb's |
|                |                    | gelu(x2)) by megfb's C++        | Lite runner: F.split, GELU as above)|
|                |                    | operator, one pass each way     |                                     |
|                |                    | (else F.split, GELU as above)   |                                     |
| TransformerBlock| norm/attn/norm/ffn| with dilation d > 1 and sizes   | same, pixels moved by one-hot convs |
|                |                    | divisible by d: the FFN half on | (the Lite runner's graph: the C++   |
|                |                    | polyphase sub-images (row-copy  | row-copy operators)                 |
|                |                    | operators, else relayout)       |                                     |

The Lite runner (megfb/lite.py) traces its own graph with megfb's operators in it
(ops.native_in_graph, also the LayerNorm's standardisation); every other traced or dumped
graph, the submission's among them, holds MegEngine's operators only.

Batch size: the fast paths accept any batch; the prediction path (megfb/infer.py) decides
how many patches go into one forward (on CPU one at a time, on a GPU whole batches).
"""
import contextlib

import megengine as mge
import megengine.functional as F
import megengine.module as M
import numpy as np

from . import ops
from .io import PUBLISHED_MEAN, PUBLISHED_STD


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


class Standardised(M.Module):
    """Holds the per-channel mean/std constants every model of the project standardises with.

    They are plain Tensors, not Parameters: stored in the state dict (the published file has
    them), never trained, never counted against the 100,000-parameter limit.
    """

    def __init__(self, channels, mean=None, std=None):
        super().__init__()
        mean = PUBLISHED_MEAN if mean is None and channels == 4 else mean
        std = PUBLISHED_STD if std is None and channels == 4 else std
        mean = np.zeros(channels) if mean is None else mean
        std = np.ones(channels) if std is None else std
        self.mean = mge.Tensor(np.asarray(mean, dtype=np.float32).reshape(1, channels, 1, 1))
        self.std = mge.Tensor(np.asarray(std, dtype=np.float32).reshape(1, channels, 1, 1))


# ------------------------------------------------------------------------------------ convs


class Conv2d(M.Conv2d):
    """Dense k x k "same" convolution (conv_in / conv_out)."""

    def __init__(self, in_channels, out_channels, kernel_size, bias=True, fast=True):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                         bias=bias)
        self.fast = fast

    def forward(self, x):
        if not self.fast:
            return super().forward(x)
        if self.training:
            return ops.same_conv(x, self.weight, self.bias, self.padding[0], 1)
        return ops.same_conv(x, self.weight, self.bias, self.padding[0], 1, tune=True)


class Pointwise(M.Conv2d):
    """1x1 convolution; forward(x, norm) computes pointwise(norm(x)) for a LayerNorm `norm`."""

    def __init__(self, in_channels, out_channels, bias=True, fast=True):
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.fast = fast

    def forward(self, x, norm=None):
        if not self.fast:
            return super().forward(x if norm is None else norm(x))
        if self.training:
            return ops.pointwise_train(x if norm is None else norm(x), self.weight, self.bias)
        if norm is not None:
            return ops.norm_folded_into_pointwise(x, norm.weight, norm.bias, self.weight, self.bias)
        return ops.pointwise_eval(x, self.weight, self.bias)


class DepthwiseConv(M.Conv2d):
    """Depthwise k x k convolution with "same" padding, optionally dilated.

    Fast path for dilation d > 1: output pixel (i, j) only sees inputs of its own phase
    (i mod d, j mod d), so the dilated conv is an undilated conv (padding (k-1)/2) on each of
    the d*d polyphase sub-images - exact, and ~45x cheaper in MegEngine 1.13 on CPU. Sizes not
    divisible by d are zero-padded at the bottom/right and cropped back, which is exact too
    (those zeros are exactly what the plain conv's own padding would read). A TransformerBlock
    skips the conversions altogether when its whole FFN half runs on phases (`on_phases`).
    """

    def __init__(self, channels, kernel_size, dilation=1, bias=True, fast=True):
        pad = dilation * (kernel_size - 1) // 2
        super().__init__(channels, channels, kernel_size, padding=pad, dilation=dilation,
                         groups=channels, bias=bias)
        self.fast = fast
        if dilation > 1:
            ops.phase_picker(channels, dilation)  # made now, outside any trace (ops.constant)

    def forward(self, x):
        if not self.fast:
            return super().forward(x)
        if self.training:
            return self._phased(x, by_conv=False)
        return self._phased(x, by_conv=True)

    def on_phases(self, x):
        """The conv on input already split by ops.space_to_phases(x, dilation)."""
        return ops.depthwise_on_phases(x, self.weight, self.bias, self.dilation[0],
                                       tune=not self.training)

    def _phased(self, x, by_conv):
        d = self.dilation[0]
        if d == 1:
            return self.on_phases(x)
        h, w = x.shape[2], x.shape[3]
        ph, pw = -h % d, -w % d
        if ph or pw:
            x = F.nn.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)))
        y = ops.phases_to_space(self.on_phases(ops.space_to_phases(x, d, by_conv)), d, by_conv)
        return y[:, :, :h, :w] if ph or pw else y


# ---------------------------------------------------------------------- activations


class LeakyReLU(M.Module):
    """x for x > 0, slope * x otherwise (0 < slope < 1): the podium's 2nd place and the
    organisers' baseline."""

    def __init__(self, slope, fast=True):
        super().__init__()
        self.slope = float(slope)
        self.fast = fast

    def forward(self, x):
        if not self.fast:
            return F.leaky_relu(x, self.slope)
        return ops.leaky_relu(x, self.slope)  # training and eval


# ---------------------------------------------------------------------- GELU and LayerNorm


class GELU(M.Module):
    """gelu(x) = x Phi(x), Phi the normal CDF."""

    def __init__(self, fast=True):
        super().__init__()
        self.fast = fast

    def forward(self, x):
        if not self.fast:
            return F.gelu(x)
        return ops.fast_gelu(x)  # training and eval


class LayerNorm(M.Module):
    """LayerNorm over the channel axis of an NCHW map (population variance, eps 1e-5)."""

    def __init__(self, dim, fast=True):
        super().__init__()
        self.fast = fast
        self.weight = mge.Parameter(np.ones((1, dim, 1, 1), dtype=np.float32))
        self.bias = mge.Parameter(np.zeros((1, dim, 1, 1), dtype=np.float32))

    def forward(self, x):
        if not self.fast:
            mu = F.mean(x, axis=1, keepdims=True)
            var = F.var(x, axis=1, keepdims=True)
            return (x - mu) / F.sqrt(var + 1e-5) * self.weight + self.bias
        return ops.channel_norm(x, self.weight, self.bias, training=self.training)  # training and eval


# ------------------------------------------------------------------------ Restormer block


class MDTA(M.Module):
    """Multi-Dconv head Transposed Attention: attention across channels, not pixels.

    Fast path: the norms are applied after the product, (q/|q|)(k/|k|)^T = (q k^T) / (|q| |k|^T),
    so the division touches a (c x c) matrix per head instead of two (c x HW) maps (forward
    and backward), with the same 1e-12 clamp as F.normalize; then the per-head attention
    matrices, laid on the diagonal of one (c x c) matrix, are multiplied into project_out's
    weight, so attn @ v and project_out become one 1x1-conv-sized product with v.
    """

    def __init__(self, dim, heads, bias=False, fast=True):
        super().__init__()
        self.heads = heads
        self.fast = fast
        self.temperature = mge.Parameter(np.ones((heads, 1, 1), dtype=np.float32))
        ops.head_mask(heads)  # made now, outside any trace (ops.constant)
        self.qkv = Pointwise(dim, dim * 3, bias=bias, fast=fast)
        self.qkv_dwconv = DepthwiseConv(dim * 3, 3, bias=bias, fast=fast)
        self.project_out = Pointwise(dim, dim, bias=bias, fast=fast)

    def forward(self, x, norm=None):
        """attn(x), or attn(norm(x)) with `norm` (so its affine part can fold into qkv)."""
        b, c, h, w = x.shape
        qkv = self.qkv_dwconv(self.qkv(x, norm=norm))
        if not self.fast:
            qkv = qkv.reshape(b, 3, self.heads, c // self.heads, h * w)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            q = F.normalize(q, ord=2, axis=-1)
            k = F.normalize(k, ord=2, axis=-1)
            attn = F.softmax(F.matmul(q, k, transpose_b=True) * self.temperature, axis=-1)
            return self.project_out(F.matmul(attn, v).reshape(b, c, h, w))
        mix, v = self._attention_into_project_out(qkv)
        bias = self.project_out.bias
        if self.training or b > 1:
            return ops.pointwise_matmul_per_sample(v, mix, bias)
        return ops.pointwise_eval(v, mix.reshape(c, c, 1, 1), bias)

    def _attention_into_project_out(self, qkv):
        """(project_out.weight @ blockdiag(attn_1..attn_heads), v): (b, c, c) and (b, c, h, w)."""
        b, c3, h, w = qkv.shape
        c, heads = c3 // 3, self.heads
        q, k, v = F.split(qkv, 3, axis=1)
        q, k = (t.reshape(b, heads, c // heads, h * w) for t in (q, k))
        scale = self.temperature / F.matmul(ops.l2_norms(q, 3), ops.l2_norms(k, 3), transpose_b=True)
        attn = F.softmax(F.matmul(q, k, transpose_b=True) * scale, axis=-1)
        blocks = attn.reshape(b, heads, c // heads, 1, c // heads) * ops.head_mask(heads, attn.device)
        return F.matmul(self.project_out.weight.reshape(c, c), blocks.reshape(b, c, c)), v


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
        self.gelu = GELU(fast=fast)
        self.project_out = Pointwise(hidden, dim, bias=bias, fast=fast)

    def forward(self, x, norm=None, on_phases=False):
        """norm: run on norm(x) (its affine part can then fold into project_in);
        on_phases: x is already split into the dwconv's polyphase sub-images."""
        x = self.project_in(x, norm=norm)
        x = self.dwconv.on_phases(x) if on_phases else self.dwconv(x)
        if not self.fast:
            return self.project_out(self.gelu(x[:, :self.hidden]) * x[:, self.hidden:])
        return self.project_out(ops.gated_gelu(x))  # training and eval


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
            ops.phase_picker(dim, ffn_dilation)  # made now, outside any trace (ops.constant)

    def forward(self, x):
        x = x + self.attn(x, norm=self.norm1)
        d = self.ffn.dwconv.dilation[0]
        if not self.fast or d == 1 or x.shape[2] % d or x.shape[3] % d:
            return x + self.ffn(x, norm=self.norm2)
        if self.training:
            return self._ffn_on_phases(x, d, by_conv=False)
        return self._ffn_on_phases(x, d, by_conv=True)  # the one-hot convs need no backward

    def _ffn_on_phases(self, x, d, by_conv):
        x = ops.space_to_phases(x, d, by_conv)
        return ops.phases_to_space(x + self.ffn(x, norm=self.norm2, on_phases=True), d, by_conv)


# ----------------------------------------------------------------- feedback-body fusion


class PDConvFuse(M.Module):
    """Skip fusion in the chain: concat(current, skip) -> 1x1 (2C->C) -> GELU -> depthwise 3x3."""

    def __init__(self, dim, fast=True):
        super().__init__()
        self.fast = fast
        self.pwconv = Pointwise(dim * 2, dim, fast=fast)
        self.gelu = GELU(fast=fast)
        self.dwconv = DepthwiseConv(dim, 3, fast=fast)

    def forward(self, x, skip):
        return self.dwconv(self.gelu(self.pwconv(F.concat([x, skip], axis=1))))


class SimpleGateFuse(M.Module):
    """First half of the GFM: 1x1 (nC -> 2C), then x1 * gelu(x2)."""

    def __init__(self, in_channels, dim, fast=True):
        super().__init__()
        self.dim = dim
        self.fast = fast
        self.conv1x1 = Pointwise(in_channels, dim * 2, fast=fast)
        self.gelu = GELU(fast=fast)

    def forward(self, x):
        if self.fast:
            return ops.gated_gelu(self.conv1x1(x), swap=True)
        x1, x2 = F.split(self.conv1x1(x), 2, axis=1)
        return self.gelu(x2) * x1


def GFM(num_reroute_feats, dim, fast=True):
    """Gated fusion of rerouted features: SimpleGateFuse, then 1x1 conv (keys GFM.0.*, GFM.1.*)."""
    return M.Sequential(SimpleGateFuse(num_reroute_feats * dim, dim, fast=fast),
                        Pointwise(dim, dim, fast=fast))


def gelu(x, fast=True):
    """The GELU layer as a function."""
    return GELU(fast=fast)(x)
