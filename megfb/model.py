"""FBRestormer: a 7-block Restormer chain run twice as a feedback loop (MegCup 2022, 3rd place).

The body (FeedbackBlock) is shared by every time step; the outputs of its last blocks are
rerouted to the next step and fused into its first block through the GFM. Every step's output
is supervised in training (a list); evaluation returns the last step's. Key names and shapes
are the published checkpoint's (shared/spec/fbrestormer.md): the default config has exactly
99,156 trainable parameters and loads `feedback_restormer.mge` with strict=True.

`build_model(model_cfg)` is the one entry point for every architecture in the project
(fbrestormer here, pmrid, restormer and contest_baseline in baselines.py, the 1st and 2nd
places feedback_model and recurrent_mobilenet in podium.py).
"""
import inspect

import megengine.functional as F
import megengine.module as M
import numpy as np

from . import PARAM_LIMIT
from .baselines import PMRID, ContestBaseline, Restormer
from .errors import MegfbError
from .layers import (GFM, PUBLISHED_MEAN, PUBLISHED_STD, Conv2d, DepthwiseConv, PDConvFuse,
                     Pointwise, Standardised, TransformerBlock, set_fast)


class FeedbackBlock(M.Module):
    """The shared body: a chain of TransformerBlocks with U-shaped skips and feedback fusion.

    With n = num_blocks // 2 (3 by default): blocks 0..n-1 push their outputs as skips; blocks
    num_blocks-n .. num_blocks-1 first fuse skips[-1], skips[-2], ... (block 4 fuses block 2's
    output, block 5 block 1's, block 6 block 0's). At a later step the first num_refine_feats
    blocks first fuse the rerouted features: x = GFM(concat_i(x + last_i)).

    Returns (out, rerouted): the last block's output (to conv_out) and the features rerouted
    to the next step - the last num_reroute_feats blocks' outputs ('top', the published
    model), or the first num_reroute_feats blocks' outputs ('bottom', the shallowest features
    of the chain, nearest the input). With 'top', rerouted[-1] is out.
    """

    def __init__(self, dim=32, num_blocks=7, heads=4, expansion=1.2, num_refine_feats=1,
                 num_reroute_feats=3, reroute="top", use_gfm=True, ffn_kernel=5, ffn_dilation=2,
                 fast=True):
        super().__init__()
        self.num_refine_feats = num_refine_feats
        self.num_reroute_feats = num_reroute_feats
        self.reroute = reroute
        self.num_skips = num_blocks // 2
        self.trans_list = [
            TransformerBlock(dim, heads, expansion, ffn_kernel, ffn_dilation, fast=fast)
            for _ in range(num_blocks)
        ]
        self.skip_blocks = [PDConvFuse(dim, fast=fast) for _ in range(self.num_skips)]
        # A single-step model never has rerouted features; the published layout then has no GFM.
        self.GFM = GFM(num_reroute_feats, dim, fast=fast) if use_gfm else None

    def forward(self, x, last):
        num_blocks = len(self.trans_list)
        skips, outs = [], []
        for idx, block in enumerate(self.trans_list):
            if last and idx < self.num_refine_feats:
                x = self.GFM(F.concat([x + f for f in last], axis=1))
            k = idx - (num_blocks - 1 - self.num_skips)
            if k > 0:
                x = self.skip_blocks[k - 1](x, skips[-k])
            x = block(x)
            outs.append(x)
            if idx < self.num_skips:
                skips.append(x)
        n = self.num_reroute_feats
        rerouted = outs[-n:] if self.reroute == "top" else outs[:n]
        return x, rerouted


class FeedbackRestormer(Standardised):
    """Whole model: standardise, conv_in, num_steps passes of the shared body, conv_out + residual.

    step_input=False feeds the body zeros at later steps, so they see the image only through
    the rerouted features (an ablation; the published model feeds conv_in's features each step).
    """

    size_multiple = 1  # no down-sampling: any packed size works

    def __init__(self, mean=None, std=None, in_channels=4, num_feats=32, num_blocks=7, num_steps=2,
                 num_refine_feats=1, num_reroute_feats=3, heads=4, ffn_expansion_factor=1.2,
                 ffn_kernel=5, ffn_dilation=2, reroute="top", step_input=True, fast=True):
        super().__init__(in_channels, mean, std)
        c = num_feats
        self.fast = fast
        self.num_steps = num_steps
        self.step_input = step_input
        self.conv_in = M.Sequential(Conv2d(in_channels, c, 5, fast=fast),
                                    DepthwiseConv(c, 5, fast=fast), Pointwise(c, c, fast=fast))
        self.block = FeedbackBlock(c, num_blocks, heads, ffn_expansion_factor, num_refine_feats,
                                   num_reroute_feats, reroute, num_steps > 1, ffn_kernel,
                                   ffn_dilation, fast=fast)
        self.conv_out = M.Sequential(DepthwiseConv(c, 5, fast=fast), Pointwise(c, c, fast=fast),
                                     Conv2d(c, in_channels, 5, fast=fast))

    def forward(self, x):
        x = (x - self.mean) / self.std
        shortcut = x
        init = self.conv_in(x)
        outs, last = [], []
        for step in range(self.num_steps):
            body_in = init if step == 0 or self.step_input else F.zeros_like(init)
            feat, last = self.block(body_in, last)
            outs.append((self.conv_out(feat) + shortcut) * self.std + self.mean)
        return outs if self.training else outs[-1]


def _architectures():
    from .podium import FeedbackModel, RecurrentMobileNet

    # fbrestormer is the 3rd place; the rest of the podium: feedback_model (1st, team
    # Feedback), recurrent_mobilenet (2nd, team IIL2), contest_baseline (the organisers')
    return {"fbrestormer": FeedbackRestormer, "pmrid": PMRID, "restormer": Restormer,
            "feedback_model": FeedbackModel, "recurrent_mobilenet": RecurrentMobileNet,
            "contest_baseline": ContestBaseline}


def _defaults(cls):
    """Constructor keyword defaults, i.e. the config keys an architecture accepts."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "mean", "std")}


def resolve_model_config(model_cfg):
    """All constructor kwargs with their defaults filled in (what a run's config.yaml records)."""
    model_cfg = dict(model_cfg or {})
    name = model_cfg.pop("name", "fbrestormer")
    archs = _architectures()
    if name not in archs:
        raise MegfbError(f"config key 'model.name' is {name!r}; expected one of {', '.join(archs)}")
    defaults = _defaults(archs[name])
    for key in model_cfg:
        if key not in defaults:
            raise MegfbError(
                f"unknown config key 'model.{key}' for {name} (known: {', '.join(defaults)})")
    resolved = {"name": name, **defaults, **model_cfg}
    _check_values(resolved)
    return resolved


def _check_values(cfg):
    def fail(key, what):
        raise MegfbError(f"config key 'model.{key}' is {cfg[key]!r}; expected {what}")

    for key, value in cfg.items():
        default = _defaults(_architectures()[cfg["name"]]).get(key)
        if isinstance(default, bool) and not isinstance(value, bool):
            fail(key, "true or false")
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(key, "a positive integer")
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, float) and (not is_number or value <= 0):
            fail(key, "a positive number")
    if cfg["name"] != "fbrestormer":
        return
    if cfg["reroute"] not in ("top", "bottom"):
        fail("reroute", "'top' or 'bottom'")
    if cfg["num_reroute_feats"] > cfg["num_blocks"]:
        fail("num_reroute_feats", f"at most model.num_blocks ({cfg['num_blocks']})")
    if cfg["num_refine_feats"] > cfg["num_blocks"]:
        fail("num_refine_feats", f"at most model.num_blocks ({cfg['num_blocks']})")
    if cfg["num_feats"] % cfg["heads"]:
        fail("heads", f"a divisor of model.num_feats ({cfg['num_feats']})")
    if cfg["ffn_kernel"] % 2 == 0:
        fail("ffn_kernel", "an odd kernel size")


def build_model(model_cfg=None, mean=None, std=None):
    """Build any architecture of the project from its config section (unknown keys refused)."""
    cfg = resolve_model_config(model_cfg)
    name = cfg.pop("name")
    return _architectures()[name](mean=mean, std=std, **cfg)


def count_parameters(model):
    """Trainable parameters only: the mean/std constants are buffers, not Parameters."""
    return int(sum(int(np.prod(p.shape)) for p in model.parameters()))


def check_param_limit(model):
    """The contest rule, checked before anything else is spent on the model."""
    n = count_parameters(model)
    if n > PARAM_LIMIT:
        raise MegfbError(f"model has {n:,} trainable parameters, over the contest limit of {PARAM_LIMIT:,}")
    return n


__all__ = ["FeedbackBlock", "FeedbackRestormer", "build_model", "resolve_model_config",
           "count_parameters", "check_param_limit", "set_fast", "PUBLISHED_MEAN", "PUBLISHED_STD"]
