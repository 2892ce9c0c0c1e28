"""Tests for recipes.losses: values against hand computations, finiteness, CombinedLoss."""
from __future__ import annotations

import math

import pytest
import torch

from samadapt.recipes.losses import (
    LOSSES,
    CombinedLoss,
    balanced_bce,
    bce,
    dice,
    focal,
    iou_loss,
    iou_mse,
    mask_iou,
    structure_loss,
)


def sp(x: float) -> float:
    """softplus: BCE of logit x against target 0 is sp(x), against target 1 is sp(-x)."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


X = torch.tensor([[[[2.0, -1.0], [0.0, 1.0]]]])  # (1, 1, 2, 2)
T = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])


def test_bce_by_hand():
    expect = (sp(-2.0) + sp(-1.0) + sp(0.0) + sp(1.0)) / 4
    assert bce(X, T).item() == pytest.approx(expect, rel=1e-6)


def test_balanced_bce_by_hand():
    pos = sp(-2.0)
    neg = (sp(-1.0) + sp(0.0) + sp(1.0)) / 3
    assert balanced_bce(X, T).item() == pytest.approx((pos + neg) / 2, rel=1e-6)
    # equals the beta-weighted form (beta = |neg|/|all| on positives) normalised by the weight sum
    beta = 3 / 4
    w_sum = beta * 1 + (1 - beta) * 3
    weighted = (beta * sp(-2.0) + (1 - beta) * (sp(-1.0) + sp(0.0) + sp(1.0))) / w_sum
    assert balanced_bce(X, T).item() == pytest.approx(weighted, rel=1e-6)
    # single-class images: mean over the class present; batch = mean of images
    empty = torch.zeros_like(T)
    assert balanced_bce(X, empty).item() == pytest.approx(bce(X, empty).item(), rel=1e-6)
    both = balanced_bce(torch.cat([X, X]), torch.cat([T, empty]))
    assert both.item() == pytest.approx((balanced_bce(X, T).item() + bce(X, empty).item()) / 2, rel=1e-6)


def test_iou_and_dice_by_hand():
    p = [sig(2.0), sig(-1.0), sig(0.0), sig(1.0)]
    inter = p[0]
    union = sum(p) + 1 - inter
    assert iou_loss(X, T, smooth=0).item() == pytest.approx(1 - inter / union, rel=1e-6)
    assert iou_loss(X, T).item() == pytest.approx(1 - (inter + 1) / (union + 1), rel=1e-6)
    assert dice(X, T, smooth=0).item() == pytest.approx(1 - 2 * inter / (sum(p) + 1), rel=1e-6)
    assert dice(X, T).item() == pytest.approx(1 - (2 * inter + 1) / (sum(p) + 1 + 1), rel=1e-6)


def test_focal_by_hand():
    vals = []
    for x, t in zip([2.0, -1.0, 0.0, 1.0], [1, 0, 0, 0]):
        p = sig(x)
        ce = sp(-x) if t == 1 else sp(x)
        p_t = p if t == 1 else 1 - p
        a_t = 0.25 if t == 1 else 0.75
        vals.append(a_t * (1 - p_t) ** 2 * ce)
    assert focal(X, T).item() == pytest.approx(sum(vals) / 4, rel=1e-6)
    no_alpha = focal(X, T, alpha=-1, gamma=0)  # plain BCE
    assert no_alpha.item() == pytest.approx(bce(X, T).item(), rel=1e-6)


def test_iou_mse_by_hand():
    logits = torch.tensor([[[[1.0, 1.0, -1.0, -1.0]]], [[[-1.0, -1.0, -1.0, -1.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]], [[[0.0, 0.0, 0.0, 0.0]]]])
    assert mask_iou(logits, target).tolist() == [0.5, 1.0]  # empty vs empty counts as perfect
    pred = torch.tensor([0.7, 0.6], requires_grad=True)
    loss = iou_mse(pred, logits, target)
    assert loss.item() == pytest.approx(((0.7 - 0.5) ** 2 + (0.6 - 1.0) ** 2) / 2, rel=1e-6)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert iou_mse(pred.detach()[:, None], logits, target).item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match="one score per mask"):
        iou_mse(torch.zeros(3), logits, target)


def test_perfect_predictions_have_small_loss():
    t = torch.zeros(2, 1, 8, 8)
    t[:, :, 2:6, 2:6] = 1
    x = (t * 2 - 1) * 20
    for fn in (bce, balanced_bce, iou_loss, focal, dice):
        assert fn(x, t).item() < 1e-3
    assert structure_loss(x, t).item() < 1e-3


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"iou_mse"}))
@pytest.mark.parametrize("fill", [0.0, 1.0])
@pytest.mark.parametrize("scale", [0.0, 50.0, -50.0])
def test_gradients_finite_on_empty_and_full(name, fill, scale):
    target = torch.full((2, 1, 16, 16), fill)
    logits = (torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) + scale).requires_grad_(True)
    loss = LOSSES[name](logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    if scale == 0.0:
        assert logits.grad.abs().sum() > 0  # a learning signal even without a foreground


def test_combined_loss_weights_and_terms():
    t = torch.zeros(2, 1, 8, 8)
    t[0, :, 1:5, 1:5] = 1
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    pred_iou = torch.tensor([0.3, 0.8], requires_grad=True)
    loss = CombinedLoss({"focal": 20.0, "dice": 1.0, "iou_mse": 2.0})
    total, terms = loss(x, t, pred_iou=pred_iou)
    expect = 20 * focal(x, t) + dice(x, t) + 2 * iou_mse(pred_iou, x, t)
    assert total.item() == pytest.approx(expect.item(), rel=1e-6)
    assert set(terms) == {"focal", "dice", "iou_mse"} and not terms["dice"].requires_grad
    assert terms["focal"].item() == pytest.approx(focal(x, t).item())
    total.backward()
    assert torch.isfinite(x.grad).all() and pred_iou.grad is not None
    zero = CombinedLoss({"bce": 0.0, "iou": 1.0})
    assert zero(x, t)[0].item() == pytest.approx(iou_loss(x, t).item())


def test_combined_loss_errors():
    with pytest.raises(ValueError) as exc:
        CombinedLoss({"bce": 1.0, "lovasz": 1.0})
    assert "lovasz" in str(exc.value) and "balanced_bce" in str(exc.value) and "dice" in str(exc.value)
    with pytest.raises(ValueError, match="non-empty"):
        CombinedLoss({})
    with pytest.raises(ValueError, match=">= 0"):
        CombinedLoss({"bce": -1.0})
    with pytest.raises(ValueError, match="pred_iou"):
        CombinedLoss({"iou_mse": 1.0})(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        bce(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="odd"):
        structure_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), kernel=4)
