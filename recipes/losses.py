"""Segmentation losses on logits.

Every loss takes `logits` and `target` of the same shape (B, 1, H, W) (any
shape whose first dimension is the batch works), targets in {0, 1} (bool or
float; soft targets in [0, 1] are accepted), and returns a scalar: the mean of
per-image values (`bce` and `focal` average over all pixels of the batch,
which is the same thing for equal-size images).  All are differentiable and
finite for empty and full masks.  Targets must already be at the logits'
resolution (`F.interpolate` one of them first).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "bce",
    "balanced_bce",
    "iou_loss",
    "focal",
    "dice",
    "structure_loss",
    "mask_iou",
    "iou_mse",
    "LOSSES",
    "RECIPE_LOSSES",
    "CombinedLoss",
    "pick_multimask",
]


def _check(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(
            f"logits and target must be torch tensors, got {type(logits).__name__} and {type(target).__name__}"
        )
    if logits.shape != target.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} != target shape {tuple(target.shape)}; resize one of them "
            "(e.g. F.interpolate(logits, target.shape[-2:], mode='bilinear'))"
        )
    if logits.dim() < 2:
        raise ValueError(f"expected a batch (B, 1, H, W), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    return target.to(logits.dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over all pixels.

    Args:
        logits: (B, 1, H, W) raw scores.
        target: same shape, {0, 1}.

    Returns:
        scalar tensor.

    Example:
        >>> import torch
        >>> round(bce(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).item(), 4)  # -log(0.5)
        0.6931
    """
    t = _check(logits, target)
    return F.binary_cross_entropy_with_logits(logits, t)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE per image (the weighting of shadow/edge detection), averaged over the batch.

    Per image, positives are weighted by beta = |negatives| / |pixels| and
    negatives by 1 - beta; normalised by the total weight this is exactly
    `(mean BCE over positive pixels + mean BCE over negative pixels) / 2`,
    which is how it is computed.  An image with only one class (empty or full
    mask) uses the mean over that class, so it still gets a gradient (the raw
    beta weighting would give it none).  Soft targets count as fractional members of both classes.

    Args:
        logits: (B, 1, H, W).
        target: same shape, {0, 1}.

    Returns:
        scalar tensor.

    Example:
        >>> import torch
        >>> t = torch.tensor([[[[1., 0., 0., 0.]]]]); x = torch.zeros_like(t)
        >>> round(balanced_bce(x, t).item(), 4)  # both class means are log 2
        0.6931
    """
    t = _check(logits, target)
    ce = _flat(F.binary_cross_entropy_with_logits(logits, t, reduction="none"))
    tp = _flat(t)
    n_pos, n_neg = tp.sum(1), (1 - tp).sum(1)
    mean_pos = (ce * tp).sum(1) / n_pos.clamp_min(1e-6)
    mean_neg = (ce * (1 - tp)).sum(1) / n_neg.clamp_min(1e-6)
    has_pos, has_neg = (n_pos > 1e-6).to(ce.dtype), (n_neg > 1e-6).to(ce.dtype)
    per_image = (mean_pos * has_pos + mean_neg * has_neg) / (has_pos + has_neg).clamp_min(1.0)
    return per_image.mean()


def iou_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft IoU loss per image: `1 - (sum(p t) + s) / (sum(p) + sum(t) - sum(p t) + s)`, p = sigmoid(logits).

    This is the IoU term of the "structure loss" without its boundary
    weighting (see `structure_loss`).  `smooth` keeps it finite for
    empty masks (an empty target with an all-background prediction gives ~0).

    Args:
        logits: (B, 1, H, W).
        target: same shape.
        smooth: added to numerator and denominator.

    Returns:
        scalar tensor (mean over the batch).

    Example:
        >>> import torch
        >>> x = torch.tensor([[[[100., -100.]]]]); t = torch.tensor([[[[1., 0.]]]])
        >>> round(iou_loss(x, t, smooth=0.0).item(), 4)
        0.0
    """
    t = _check(logits, target)
    p = _flat(torch.sigmoid(logits))
    tt = _flat(t)
    inter = (p * tt).sum(1)
    union = p.sum(1) + tt.sum(1) - inter
    return (1.0 - (inter + smooth) / (union + smooth).clamp_min(1e-12)).mean()


def focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss, mean over pixels (SAM's focal term).

    `alpha_t * (1 - p_t) ** gamma * BCE` with `p_t = p t + (1 - p)(1 - t)`
    and `alpha_t = alpha t + (1 - alpha)(1 - t)`; `alpha < 0` disables the
    class weighting.

    Args:
        logits: (B, 1, H, W).
        target: same shape.
        alpha: weight of positives (0.25).
        gamma: focusing exponent (2).

    Returns:
        scalar tensor.

    Example:
        >>> import torch
        >>> round(focal(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)).item(), 5)  # 0.25 * 0.25 * log 2
        0.04332
    """
    t = _check(logits, target)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean()


def dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image: `1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)` (SAM's dice term, s = 1).

    Args:
        logits: (B, 1, H, W).
        target: same shape.
        smooth: added to numerator and denominator.

    Returns:
        scalar tensor (mean over the batch).

    Example:
        >>> import torch
        >>> round(dice(torch.zeros(1, 1, 1, 2), torch.tensor([[[[1., 0.]]]]), smooth=0.0).item(), 4)  # 1 - 1/2
        0.5
    """
    t = _check(logits, target)
    p = _flat(torch.sigmoid(logits))
    tt = _flat(t)
    num = 2 * (p * tt).sum(1) + smooth
    den = p.sum(1) + tt.sum(1) + smooth
    return (1.0 - num / den.clamp_min(1e-12)).mean()


def structure_loss(logits: torch.Tensor, target: torch.Tensor, kernel: int = 31) -> torch.Tensor:
    """Boundary-weighted BCE + weighted soft IoU (the "structure loss" common in polyp/COD models).

    Pixel weight `w = 1 + 5 |avg_pool(t, kernel) - t|` (large near edges);
    per image `sum(w bce) / sum(w) + 1 - (sum(w p t) + 1) / (sum(w (p + t)) - sum(w p t) + 1)`.

    Args:
        logits: (B, 1, H, W).
        target: same shape.
        kernel: odd pooling window (31 in the original).

    Returns:
        scalar tensor (mean over the batch).

    Example:
        >>> import torch
        >>> structure_loss(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)).item() > 0
        True
    """
    t = _check(logits, target)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel={kernel} must be a positive odd int (31 in the original)")
    if t.dim() != 4:
        raise ValueError(f"structure_loss needs (B, C, H, W) tensors, got shape {tuple(t.shape)}")
    w = 1 + 5 * torch.abs(F.avg_pool2d(t, kernel, stride=1, padding=kernel // 2, count_include_pad=False) - t)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    wbce = _flat(w * ce).sum(1) / _flat(w).sum(1)
    p = torch.sigmoid(logits)
    inter = _flat(p * t * w).sum(1)
    union = _flat((p + t) * w).sum(1)
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


@torch.no_grad()
def mask_iou(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU per image of `logits > threshold` against `target > 0.5`; 1.0 when both are empty.

    Args:
        logits: (B, ...) logits.
        target: same shape.
        threshold: logit threshold (0 = probability 0.5).

    Returns:
        (B,) float tensor, no gradient.

    Example:
        >>> import torch
        >>> mask_iou(torch.tensor([[[[1., 1., -1.]]]]), torch.tensor([[[[1., 0., 0.]]]])).tolist()
        [0.5]
    """
    t = _check(logits, target)
    p = _flat(logits > threshold)
    tt = _flat(t > 0.5)
    inter = (p & tt).sum(1).to(logits.dtype)
    union = (p | tt).sum(1).to(logits.dtype)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def iou_mse(
    pred_iou: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0
) -> torch.Tensor:
    """MSE between the predicted IoU score and the IoU of the thresholded mask (SAM's IoU-head loss).

    The actual IoU (`mask_iou`) is a constant target: the gradient flows
    only into `pred_iou`.

    Args:
        pred_iou: (B,) or (B, 1) predicted scores.
        logits: (B, 1, H, W) mask logits.
        target: same shape as `logits`.
        threshold: logit threshold.

    Returns:
        scalar tensor.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[[1., 1., -1.]]]]); t = torch.tensor([[[[1., 0., 0.]]]])
        >>> round(iou_mse(torch.tensor([1.0]), x, t).item(), 4)  # (1 - 0.5) ** 2
        0.25
    """
    if not isinstance(pred_iou, torch.Tensor):
        raise ValueError(f"pred_iou must be a tensor of shape (B,) or (B, 1), got {type(pred_iou).__name__}")
    actual = mask_iou(logits.detach(), target, threshold)
    p = pred_iou.reshape(-1)
    if p.shape[0] != actual.shape[0]:
        raise ValueError(
            f"pred_iou has {p.shape[0]} values for a batch of {actual.shape[0]}; pass one score per mask, "
            "shape (B,) or (B, 1)"
        )
    return F.mse_loss(p, actual.to(p.dtype))


#: Loss terms usable in `CombinedLoss` (`iou_mse` additionally needs `pred_iou`).
LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "bce": bce,
    "balanced_bce": balanced_bce,
    "iou": iou_loss,
    "iou_loss": iou_loss,
    "focal": focal,
    "dice": dice,
    "structure": structure_loss,
    "iou_mse": iou_mse,
}

#: The terms a recipe's `loss:` section weighs (`samadapt.recipes.config` builds that section from this).
RECIPE_LOSSES: Tuple[str, ...] = ("bce", "balanced_bce", "iou", "focal", "dice", "iou_mse")


class CombinedLoss(nn.Module):
    """Weighted sum of named loss terms.

    SAM's recipe is `{"focal": 20, "dice": 1, "iou_mse": 1}`; shadow models
    often use `{"balanced_bce": 1}`, polyp/COD models `{"structure": 1}` or
    `{"bce": 1, "iou": 1}`.

    Args:
        weights: term name -> non-negative weight; names from `LOSSES`.

    Returns (of a call): `(total, terms)`: the differentiable weighted sum
    and a dict name -> *unweighted* term value (detached), for logging.

    Raises:
        ValueError: empty/unknown names (the valid ones are listed) or negative/non-finite weights.

    Example:
        >>> import torch
        >>> loss = CombinedLoss({"bce": 1.0, "dice": 0.5})
        >>> total, terms = loss(torch.zeros(2, 1, 4, 4, requires_grad=True), torch.ones(2, 1, 4, 4))
        >>> sorted(terms), total.requires_grad
        (['bce', 'dice'], True)
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        if not isinstance(weights, Mapping) or len(weights) == 0:
            raise ValueError(f"weights must be a non-empty dict of loss name -> weight; valid names: {sorted(LOSSES)}")
        unknown = [k for k in weights if k not in LOSSES]
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; valid names: {sorted(LOSSES)}")
        for k, v in weights.items():
            fv = float(v)
            if not (fv >= 0.0 and fv != float("inf")):
                raise ValueError(f"weight of '{k}' is {v}; weights must be finite and >= 0")
        self.weights: Dict[str, float] = {k: float(v) for k, v in weights.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.weights.items())

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, pred_iou: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Compute the weighted sum.

        Args:
            logits: (B, 1, H, W) mask logits.
            target: same shape.
            pred_iou: (B,) or (B, 1) IoU predictions; required when `iou_mse` is a term.

        Returns:
            `(total, terms)`.
        """
        terms: Dict[str, torch.Tensor] = {}
        weighted = []
        for name, w in self.weights.items():
            if name == "iou_mse":
                if pred_iou is None:
                    raise ValueError("the 'iou_mse' term needs pred_iou; call loss(logits, target, pred_iou=iou_pred)")
                value = iou_mse(pred_iou, logits, target)
            else:
                value = LOSSES[name](logits, target)
            terms[name] = value.detach()
            weighted.append(value * w)
        return torch.stack(weighted).sum(), terms


def pick_multimask(logits: torch.Tensor, iou: torch.Tensor, target: torch.Tensor,
                   loss_fn: Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's multimask training: of each sample's candidate masks keep the one with the lowest loss
    against that sample's target, so only it is trained (the choice is made without gradients).

    Args:
        logits: B x C x H x W candidate mask logits.
        iou: B x C predicted IoUs.
        target: B x 1 x H x W targets.
        loss_fn: a `CombinedLoss` (called as `loss_fn(logits, target, pred_iou)`).

    Returns:
        The B x 1 x H x W logits and the B IoU predictions picked.

    Example:
        >>> import torch
        >>> target = torch.ones(1, 1, 4, 4)
        >>> logits = torch.stack([-torch.ones(4, 4), torch.ones(4, 4)])[None] * 5  # candidate 1 is right
        >>> picked, _ = pick_multimask(logits, torch.zeros(1, 2), target, CombinedLoss({"bce": 1.0}))
        >>> bool((picked > 0).all())
        True
    """
    B, C = logits.shape[:2]
    with torch.no_grad():
        per = torch.stack([torch.stack([loss_fn(logits[b:b + 1, j:j + 1], target[b:b + 1], iou[b:b + 1, j])[0]
                                        for j in range(C)]) for b in range(B)])  # B x C
    pick = per.argmin(1)
    rows = torch.arange(B, device=logits.device)
    return logits[rows, pick.to(logits.device)].unsqueeze(1), iou[rows, pick.to(iou.device)]
