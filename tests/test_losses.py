"""Focal loss: reduces to (weighted) cross-entropy, smoothing as torch's, stable; class_alpha."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leuk_ray.errors import UserError
from leuk_ray.losses import FocalLoss, class_alpha


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 2, generator=g) * 3
    target = torch.randint(0, 2, (37,), generator=g)
    return logits, target


def test_gamma0_no_smoothing_is_weighted_cross_entropy(batch):
    logits, target = batch
    alpha = torch.tensor([0.4, 1.6])
    got = FocalLoss(alpha, gamma=0.0, smoothing=0.0)(logits, target)
    want = F.cross_entropy(logits, target, weight=alpha)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got = FocalLoss(None, gamma=0.0, smoothing=0.0)(logits, target)
    torch.testing.assert_close(got, F.cross_entropy(logits, target), rtol=1e-6, atol=1e-7)


def test_gamma0_smoothing_matches_torch_label_smoothing(batch):
    logits, target = batch
    got = FocalLoss(None, gamma=0.0, smoothing=0.1)(logits, target)
    want = F.cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_focal_term_down_weights_easy_rows(batch):
    logits, target = batch
    ce = FocalLoss(None, gamma=0.0)(logits, target)
    focal = FocalLoss(None, gamma=2.0)(logits, target)
    assert 0 < focal < ce
    # per row: (1 - p_t)^gamma * ce_row
    p_t = torch.softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    want = ((1 - p_t) ** 2 * F.cross_entropy(logits, target, reduction="none")).mean()
    torch.testing.assert_close(focal, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma,smoothing", [(0.0, 0.0), (1.5, 0.05), (0.5, 0.0), (3.0, 0.2)])
def test_finite_on_extreme_logits(gamma, smoothing):
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    target = torch.tensor([0, 0, 1, 1])  # two right with certainty, two wrong with certainty
    loss = FocalLoss(torch.tensor([0.7, 1.3]), gamma=gamma, smoothing=smoothing)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(logits.grad).all()


def test_half_precision_logits_are_computed_in_float32(batch):
    logits, target = batch
    loss = FocalLoss(None, gamma=1.5, smoothing=0.05)(logits.half(), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_class_alpha():
    a = class_alpha(np.array([0, 0, 0, 1, -1]), "auto")  # -1 (unknown) ignored
    torch.testing.assert_close(a, torch.tensor([0.5, 1.5]))
    assert float(a.sum()) == pytest.approx(2.0)
    torch.testing.assert_close(class_alpha([0, 1, 0, 1], "auto"), torch.tensor([1.0, 1.0]))
    assert class_alpha([0, 1], "none") is None
    torch.testing.assert_close(class_alpha([0, 1], "1,3"), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(class_alpha([1, 1, 1], "auto"), torch.tensor([1.5, 0.5]))
    for bad in ("1", "a,b", "1,-2"):
        with pytest.raises(UserError, match="train.class_weights"):
            class_alpha([0, 1], bad)


def _true_logit_grad(margin: float, gamma: float, smoothing: float) -> float:
    """d loss / d z_y for one row whose true logit leads the other by ``margin``."""
    z = torch.tensor([[margin, 0.0]], requires_grad=True)
    FocalLoss(None, gamma=gamma, smoothing=smoothing)(z, torch.tensor([0])).backward()
    return float(z.grad[0, 0])


@pytest.mark.parametrize("gamma", [0.0, 1.5, 3.0])
def test_smoothing_pulls_a_confident_correct_logit_back(gamma):
    """Issue 13: with (1 - p_y)^gamma the gradient on the true logit was <= 0 at every margin
    from 2 to 20 (gamma 1.5, s 0.05), i.e. smoothing stopped acting. With pt = exp(-CE_s) the
    loss is minimal where smoothed CE is (p_y = 1 - s + s/C) and pulls back beyond it."""
    s = 0.05
    best = math.log((1 - s / 2) / (s / 2))  # margin where p_y = 1 - s + s/2 (about 3.66)
    for margin in (0.5, 1.0, 2.0, 3.0):
        assert _true_logit_grad(margin, gamma, s) < 0, margin  # still pushed up
    for margin in (4.0, 6.0, 10.0, 20.0, 50.0):
        assert _true_logit_grad(margin, gamma, s) > 0, margin  # pulled back
    margins = torch.linspace(0.0, 10.0, 1001)
    logits = torch.stack([margins, torch.zeros_like(margins)], 1)
    loss_fn = FocalLoss(None, gamma=gamma, smoothing=s)
    loss = torch.stack([loss_fn(row[None], torch.tensor([0])) for row in logits])
    assert float(margins[int(loss.argmin())]) == pytest.approx(best, abs=0.02)


def test_focal_factor_uses_the_smoothed_cross_entropy(batch):
    logits, target = batch
    alpha = torch.tensor([0.7, 1.3])
    gamma, s = 1.5, 0.05
    ce = F.cross_entropy(logits, target, label_smoothing=s, reduction="none")
    w = alpha[target]
    want = (w * (1 - torch.exp(-ce)) ** gamma * ce).sum() / w.sum()
    got = FocalLoss(alpha, gamma=gamma, smoothing=s)(logits, target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.5, 1.5])
def test_finite_gradient_at_zero_cross_entropy(gamma):
    """gamma < 1 without smoothing: (1 - pt)^gamma has an infinite slope at pt = 1."""
    logits = torch.tensor([[1e4, -1e4], [3.0, -1.0]], requires_grad=True)
    loss = FocalLoss(None, gamma=gamma, smoothing=0.0)(logits, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[0].abs().max() == 0  # a certain, correct row contributes nothing
