"""Reference models with FBRestormer's interface: packed 4-channel [0,1] in and out, mean/std
standardisation inside, a list of one output in training, the output tensor in evaluation.

- PMRID: the contest's classic baseline, the separable-conv U-Net of "Practical Deep Raw Image
  Denoising on Mobile Devices" (Wang et al., ECCV 2020), narrowed to fit the 100K limit.
- Restormer: the full-size model FBRestormer is distilled from (Zamir et al., CVPR 2022),
  ~26.1M parameters; far over the contest limit, kept as an upper reference.
- ContestBaseline: the MegCup 2022 organisers' example network (six 3x3 convs, 93,854
  parameters); the podium's 1st and 2nd places are in megfb/podium.py.
"""
import megengine.functional as F
import numpy as np
import megengine.module as M

from .layers import Conv2d, LeakyReLU, Pointwise, Standardised, TransformerBlock
from .ops import constant


# ---------------------------------------------------------------------------------- PMRID
class SeparableConv(M.Module):
    """Depthwise k x k (optionally strided) then pointwise; PMRID's one building brick."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, relu=True, fast=True):
        super().__init__()
        self.dw = M.Conv2d(in_channels, in_channels, kernel_size, stride=stride,
                           padding=kernel_size // 2, groups=in_channels)
        self.pw = Pointwise(in_channels, out_channels, fast=fast)
        self.relu = relu

    def forward(self, x):
        x = self.pw(self.dw(x))
        return F.relu(x) if self.relu else x


class EncoderBlock(M.Module):
    """Two separable 5x5 convs through a narrow middle, with a separable 3x3 projection
    shortcut when the block down-samples or changes width."""

    def __init__(self, in_channels, out_channels, stride=1, fast=True):
        super().__init__()
        mid = max(out_channels // 4, 4)
        self.conv1 = SeparableConv(in_channels, mid, 5, stride, fast=fast)
        self.conv2 = SeparableConv(mid, out_channels, 5, relu=False, fast=fast)
        self.proj = (SeparableConv(in_channels, out_channels, 3, stride, relu=False, fast=fast)
                     if stride != 1 or in_channels != out_channels else None)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return F.relu(self.conv2(self.conv1(x)) + shortcut)


class DecoderStage(M.Module):
    """Refine, up-sample by a 2x2 transposed conv, add the encoder skip through a separable conv."""

    def __init__(self, in_channels, skip_channels, out_channels, fast=True):
        super().__init__()
        self.conv0 = SeparableConv(in_channels, in_channels, 3, fast=fast)
        self.conv1 = SeparableConv(in_channels, in_channels, 3, relu=False, fast=fast)
        self.upsample = M.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.proj = SeparableConv(skip_channels, out_channels, 3, relu=False, fast=fast)

    def forward(self, x, skip):
        x = x + self.conv1(self.conv0(x))
        return self.upsample(x) + self.proj(skip)


class PMRID(Standardised):
    """Separable-conv U-Net, 4 down/up levels, skips through separable convs, global residual."""

    size_multiple = 16

    def __init__(self, mean=None, std=None, in_channels=4, width=16,
                 encoder_channels=(32, 48, 64, 96), encoder_blocks=(1, 1, 2, 2),
                 decoder_channels=(48, 32, 24, 16), fast=True):
        super().__init__(in_channels, mean, std)
        self.conv0 = M.Conv2d(in_channels, width, 3, padding=1)
        skips, c = [width], width
        self.encoders = []
        for out, n in zip(encoder_channels, encoder_blocks):
            blocks = [EncoderBlock(c, out, 2, fast=fast)]
            blocks += [EncoderBlock(out, out, fast=fast) for _ in range(n - 1)]
            self.encoders.append(M.Sequential(*blocks))
            skips.append(out)
            c = out
        self.bottleneck = SeparableConv(c, decoder_channels[0], 3, fast=fast)
        c = decoder_channels[0]
        self.decoders = []
        for i, out in enumerate(decoder_channels):
            self.decoders.append(DecoderStage(c, skips[-2 - i], out, fast=fast))
            c = out
        self.out0 = SeparableConv(c, c, 3, fast=fast)
        self.out1 = M.Conv2d(c, in_channels, 3, padding=1)

    def forward(self, x):
        x = (x - self.mean) / self.std
        feats = [F.relu(self.conv0(x))]
        for enc in self.encoders:
            feats.append(enc(feats[-1]))
        y = self.bottleneck(feats[-1])
        for i, dec in enumerate(self.decoders):
            y = dec(y, feats[-2 - i])
        y = (self.out1(self.out0(y)) + x) * self.std + self.mean
        return [y] if self.training else y


# ------------------------------------------------------------------------------- Restormer
def pixel_unshuffle(x, r=2):
    """(B,C,H,W) -> (B,C*r*r,H/r,W/r), channel order c*r*r + i*r + j (torch's PixelUnshuffle)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * r * r, h // r, w // r)


def pixel_shuffle(x, r=2):
    """Inverse of pixel_unshuffle (torch's PixelShuffle)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // (r * r), h * r, w * r)


class Downsample(M.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = M.Conv2d(dim, dim // 2, 3, padding=1, bias=False)

    def forward(self, x):
        return pixel_unshuffle(self.conv(x))


class Upsample(M.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = M.Conv2d(dim, dim * 2, 3, padding=1, bias=False)

    def forward(self, x):
        return pixel_shuffle(self.conv(x))


class Restormer(Standardised):
    """The full-size Restormer (original 3x3 GDFN, no conv bias, LayerNorm with bias)."""

    size_multiple = 8

    def __init__(self, mean=None, std=None, in_channels=4, dim=48, num_blocks=(4, 6, 6, 8),
                 num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66,
                 fast=True):
        super().__init__(in_channels, mean, std)

        def stage(d, n, h):
            return M.Sequential(*[TransformerBlock(d, h, ffn_expansion_factor, 3, 1, fast=fast)
                                  for _ in range(n)])

        d = dim
        self.patch_embed = M.Conv2d(in_channels, d, 3, padding=1, bias=False)
        self.encoder_level1 = stage(d, num_blocks[0], heads[0])
        self.down1_2 = Downsample(d)
        self.encoder_level2 = stage(d * 2, num_blocks[1], heads[1])
        self.down2_3 = Downsample(d * 2)
        self.encoder_level3 = stage(d * 4, num_blocks[2], heads[2])
        self.down3_4 = Downsample(d * 4)
        self.latent = stage(d * 8, num_blocks[3], heads[3])
        self.up4_3 = Upsample(d * 8)
        self.reduce_chan_level3 = Pointwise(d * 8, d * 4, bias=False, fast=fast)
        self.decoder_level3 = stage(d * 4, num_blocks[2], heads[2])
        self.up3_2 = Upsample(d * 4)
        self.reduce_chan_level2 = Pointwise(d * 4, d * 2, bias=False, fast=fast)
        self.decoder_level2 = stage(d * 2, num_blocks[1], heads[1])
        self.up2_1 = Upsample(d * 2)
        # level 1 keeps the concatenated 2*dim channels (no reduction), as in the paper's code
        self.decoder_level1 = stage(d * 2, num_blocks[0], heads[0])
        self.refinement = stage(d * 2, num_refinement_blocks, heads[0])
        self.output = M.Conv2d(d * 2, in_channels, 3, padding=1, bias=False)

    def forward(self, x):
        x = (x - self.mean) / self.std
        e1 = self.encoder_level1(self.patch_embed(x))
        e2 = self.encoder_level2(self.down1_2(e1))
        e3 = self.encoder_level3(self.down2_3(e2))
        y = self.latent(self.down3_4(e3))
        y = self.decoder_level3(self.reduce_chan_level3(F.concat([self.up4_3(y), e3], axis=1)))
        y = self.decoder_level2(self.reduce_chan_level2(F.concat([self.up3_2(y), e2], axis=1)))
        y = self.decoder_level1(F.concat([self.up2_1(y), e1], axis=1))
        y = self.output(self.refinement(y)) + x
        y = y * self.std + self.mean
        return [y] if self.training else y


# ------------------------------------------------------------------ the organisers' baseline
def _identity_stats():
    """(zeros, ones) (1, 4, 1, 1) constants: the mean/std of a model that does not standardise."""
    return (constant(("identity_mean",), lambda: np.zeros((1, 4, 1, 1), np.float32)),
            constant(("identity_std",), lambda: np.ones((1, 4, 1, 1), np.float32)))


class ContestBaseline(M.Module):
    """The MegCup 2022 example notebook's network (shared/spec/podium.md): the packed mosaic
    /65536, six 3x3 convs with bias (4->50, 50->50 x4, 50->4), each followed by LeakyReLU
    0.125 (the last one too), no residual, no standardisation; 93,854 parameters.

    The organisers published no weights, so the key names (`net.0.weight` ... `net.10.bias`,
    a Sequential of conv, activation pairs) are ours. Their output conversion is not recorded;
    the contest's rounding is used.
    """

    size_multiple = 1
    output_rounding = "round"
    ensemble = "cfa"

    def __init__(self, mean=None, std=None, width=50, num_convs=6, fast=True):
        super().__init__()
        self.fast = fast
        _identity_stats()  # made now, outside any trace
        chans = [4] + [width] * (num_convs - 1) + [4]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [Conv2d(c_in, c_out, 3, fast=fast), LeakyReLU(0.125, fast=fast)]
        self.net = M.Sequential(*layers)

    @property
    def mean(self):  # no standardisation: what the trainer records for it
        return _identity_stats()[0]

    @property
    def std(self):
        return _identity_stats()[1]

    def forward(self, x):
        # the notebook divides by 65536, the project by 65535: scale in and out to match
        scale = 65535.0 / 65536.0
        y = self.net(x * scale) / scale
        return [y] if self.training else y
