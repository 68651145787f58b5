"""Training losses on packed [0,1] tensors, and deep supervision over the feedback steps.

`weighted_l1` is the contest score turned into a loss: each patch's mean absolute error is
weighted by sqrt(1 / mean(clean patch)), the same per-patch weight the scoring script uses.
The contest takes that mean on the uint16 scale, so on [0,1] data the weight is
sqrt(1 / (65535 * mean)). We keep exactly that constant: then 65535 * loss is the contest's
`diff.mean()` for the batch, and 5 * log10(100 / (65535 * loss)) reads as a score estimate.
(A constant factor only rescales the loss; Adam is invariant to it, gradient clipping is not.)
"""
import megengine.functional as F

UINT16_MAX = 65535.0


def _patch_mean(x):
    """Mean over every axis but the batch axis: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(axis=1)


def weighted_l1(pred, clean):
    # A clean patch is never darker than the black level (4096 on real and synthetic data);
    # the floor only guards against an all-zero patch in hand-made test data.
    means = F.maximum(_patch_mean(clean) * UINT16_MAX, 1.0)
    return (_patch_mean(F.abs(pred - clean)) / F.sqrt(means)).mean()


def l1(pred, clean):
    return F.abs(pred - clean).mean()


def l2(pred, clean):
    return ((pred - clean) ** 2).mean()


def charbonnier(pred, clean, eps=1e-3):
    return F.sqrt((pred - clean) ** 2 + eps * eps).mean()


def focal(pred, clean):
    """The slides' pixel-wise focal loss ||exp(-y) * |x - y|||_1 (mean, not sum, over pixels):
    dark pixels weigh more. The team lists it among its failure cases."""
    return (F.exp(-clean) * F.abs(pred - clean)).mean()


PIXEL_LOSSES = {"weighted_l1": weighted_l1, "l1": l1, "l2": l2, "charbonnier": charbonnier, "focal": focal}


def pixel_loss(kind, pred, clean, charbonnier_eps=1e-3):
    if kind == "charbonnier":
        return charbonnier(pred, clean, charbonnier_eps)
    return PIXEL_LOSSES[kind](pred, clean)


def step_weights(num_steps, steps="all", weights=None):
    """Per-step loss weights. `all` with no weights = equal weights summing to 1, so the total
    is on the same scale as a last-step-only loss; explicit weights are used as given."""
    if steps == "last":
        return [0.0] * (num_steps - 1) + [1.0]
    if weights is None:
        return [1.0 / num_steps] * num_steps
    if len(weights) != num_steps:
        from .errors import MegfbError

        raise MegfbError(f"config key 'loss.step_weights' has {len(weights)} values; the model has {num_steps} steps")
    return [float(w) for w in weights]


def supervised_loss(outputs, clean, loss_cfg):
    """Deep supervision: outputs is the model's list of per-step predictions (train mode).

    Returns (total, per_step) where per_step are the unweighted per-step losses (tensors),
    logged so one can see each feedback step improve on the previous one.
    """
    weights = step_weights(len(outputs), loss_cfg.get("steps", "all"), loss_cfg.get("step_weights"))
    kind, eps = loss_cfg.get("type", "weighted_l1"), loss_cfg.get("charbonnier_eps", 1e-3)
    per_step = [pixel_loss(kind, out, clean, eps) for out in outputs]
    total = sum(w * loss for w, loss in zip(weights, per_step) if w != 0.0)
    return total, per_step
