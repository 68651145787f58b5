import math

import megengine as mge
import numpy as np
import pytest

from megfb import losses
from megfb.errors import MegfbError


def _t(a):
    return mge.tensor(np.asarray(a, dtype=np.float32))


def test_weighted_l1_hand_value():
    # patch 0: clean 0.1 everywhere, error 0.01 -> 0.01 / sqrt(6553.5)
    # patch 1: clean 0.4 everywhere, error 0.04 on half the pixels -> 0.02 / sqrt(26214)
    clean = np.zeros((2, 4, 2, 2), np.float32)
    clean[0], clean[1] = 0.1, 0.4
    pred = clean.copy()
    pred[0] += 0.01
    pred[1, :2] -= 0.04
    want = (0.01 / math.sqrt(6553.5) + 0.02 / math.sqrt(26214.0)) / 2
    got = float(losses.weighted_l1(_t(pred), _t(clean)).item())
    assert got == pytest.approx(want, rel=1e-5)
    assert want == pytest.approx(1.2352e-4, rel=1e-3)


def test_weighted_l1_times_65535_is_the_contest_diff():
    rng = np.random.default_rng(0)
    clean = rng.uniform(0.06, 0.5, (3, 4, 8, 8)).astype(np.float32)
    pred = np.clip(clean + rng.normal(0, 0.02, clean.shape), 0, 1).astype(np.float32)
    gt16, pred16 = clean * 65535.0, pred * 65535.0
    # the scoring script, on the uint16 scale, per patch
    diff = np.abs(pred16 - gt16).reshape(3, -1).mean(1) * (1 / gt16.reshape(3, -1).mean(1)) ** 0.5
    got = float(losses.weighted_l1(_t(pred), _t(clean)).item()) * 65535.0
    assert got == pytest.approx(diff.mean(), rel=1e-4)


def test_simple_losses_hand_values():
    clean = np.full((1, 1, 1, 2), 0.5, np.float32)
    pred = np.array([[[[0.5, 0.8]]]], np.float32)  # errors 0 and 0.3
    p, c = _t(pred), _t(clean)
    assert float(losses.l1(p, c).item()) == pytest.approx(0.15, rel=1e-5)
    assert float(losses.l2(p, c).item()) == pytest.approx(0.045, rel=1e-5)
    # sqrt(0 + 0.1^2) = 0.1 and sqrt(0.09 + 0.01) = 0.3162278
    assert float(losses.charbonnier(p, c, eps=0.1).item()) == pytest.approx((0.1 + 0.1**0.5) / 2, rel=1e-5)
    # exp(-0.5) * 0.3 / 2
    assert float(losses.focal(p, c).item()) == pytest.approx(math.exp(-0.5) * 0.15, rel=1e-5)


def test_deep_supervision_weights():
    clean = _t(np.zeros((1, 1, 1, 1)))
    outs = [_t(np.full((1, 1, 1, 1), 0.2)), _t(np.full((1, 1, 1, 1), 0.1))]
    cfg = {"type": "l1", "steps": "all", "step_weights": None}
    total, per_step = losses.supervised_loss(outs, clean, cfg)
    assert [round(float(s.item()), 6) for s in per_step] == [0.2, 0.1]
    assert float(total.item()) == pytest.approx(0.15, rel=1e-5)
    total, _ = losses.supervised_loss(outs, clean, dict(cfg, step_weights=[1.0, 3.0]))
    assert float(total.item()) == pytest.approx(0.5, rel=1e-5)
    total, _ = losses.supervised_loss(outs, clean, dict(cfg, steps="last"))
    assert float(total.item()) == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(MegfbError, match="loss.step_weights"):
        losses.supervised_loss(outs, clean, dict(cfg, step_weights=[1.0]))


def test_last_step_only_sends_no_gradient_to_earlier_steps():
    from megengine.autodiff import GradManager

    x = mge.Parameter(np.full((1, 1, 1, 1), 0.2, np.float32))
    y = mge.Parameter(np.full((1, 1, 1, 1), 0.1, np.float32))
    gm = GradManager().attach([x, y])
    with gm:
        total, _ = losses.supervised_loss([x * 1.0, y * 1.0], _t(np.zeros((1, 1, 1, 1))),
                                          {"type": "l1", "steps": "last"})
        gm.backward(total)
    assert x.grad is None or float(np.abs(x.grad.numpy()).sum()) == 0.0
    assert float(y.grad.numpy().sum()) == pytest.approx(1.0)
