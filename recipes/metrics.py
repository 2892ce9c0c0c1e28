# why: over 500 lines: one self-contained port of pysodmetrics' formulas, each next to the parity notes tests check
"""Per-image segmentation metrics that reproduce `pysodmetrics` numbers.

This module is a self-contained numpy/scipy/OpenCV implementation of the
salient/camouflaged-object metrics computed by `py_sod_metrics` (S-measure,
E-measure, weighted F-measure, MAE) plus the binary metrics used in shadow
detection and segmentation (BER, Dice, IoU).  `pysodmetrics` itself is only
a test dependency: `tests/test_metrics.py` checks that every number here
equals the one `pysodmetrics` gives, to 1e-6 or better.

Input convention (shared by every function and by `MetricSuite`):
`pred` (2-D):
  * float32 / float64 in [0, 1] -- used as is (this is `pysodmetrics`'
    `step(..., normalize=False)`).  float16 is widened to float32.  Values
    outside [0, 1] or NaN raise `ValueError`.
  * uint8 in 0..255 -- normalised exactly like `pysodmetrics`'
    `step(..., normalize=True)` (MATLAB `mapminmax(im2double(pred))`):
    `pred / 255` and then min-max rescaled to [0, 1] unless the map is
    constant.  So a uint8 map that only spans 10..200 is stretched to 0..1.
  * bool -- used as a 0/1 float64 map.
`gt` (2-D, same shape as `pred`):
  * bool -- True is object.
  * uint8 -- `gt > 128` is object (`pysodmetrics` thresholds at 128, so a
    pixel valued exactly 128 is background).  A uint8 mask whose largest value
    is 1 (a 0/1 label map) would be read as empty under that rule, so it is
    rejected with a `ValueError`; pass `gt.astype(bool)` instead.
  * any other integer/float dtype -- accepted only when every value is 0 or 1.

Deliberate differences from `pysodmetrics`:
* S-measure: when the ground-truth centroid falls in the last row or column,
  one of the four region quadrants is empty; `pysodmetrics` (like the
  original MATLAB code) then returns NaN (0 * NaN).  Here an empty quadrant has
  weight 0 and contributes 0, which is the value `pysodmetrics` gives if its
  SSIM of an empty region is taken as 0.  Every other case is identical.
* BER / Dice / IoU are not `pysodmetrics` metrics; their edge cases are
  documented on each function (`pysodmetrics`' FmeasureV2 handlers give 0 for
  0/0, we give 1.0 for Dice/IoU when both masks are empty).

Quirks of `pysodmetrics` that ARE reproduced:
* E-measure normalises by `H*W - 1` (MATLAB code), so a perfect prediction
  scores `H*W / (H*W - 1)`, slightly above 1 (a 1x1 image divides by eps).
* E-measure with empty gt counts predicted-background pixels; with full gt it
  counts predicted-foreground pixels.
* The adaptive threshold is `min(2 * mean(pred), 1)` and binarises with
  `pred >= threshold`; an all-zero prediction is therefore binarised to all
  foreground (threshold 0).
* The 256-point E-measure curve quantises with `uint8(pred * 255)`
  (truncation, in the dtype of `pred`) and thresholds `>= t` for
  t = 255..0; "mean"/"max" are the mean/max of that curve.
* S-measure with empty gt is `1 - mean(pred)`, with full gt `mean(pred)`;
  the centroid is rounded half-to-even (`np.round`).
* Weighted F-measure with empty gt is 0.  Its `beta` argument in
  `pysodmetrics` is really beta**2; ours is beta (default 1, same result).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt

__all__ = [
    "s_measure",
    "e_measure",
    "weighted_f",
    "mae",
    "ber",
    "dice",
    "iou",
    "MetricSuite",
    "METRICS",
]

# MATLAB's eps (distance from 1.0 to the next double), as pysodmetrics uses.  Kept as a
# numpy float64 scalar on purpose: adding it promotes float32 intermediates to float64,
# exactly as in the reference, so float32 predictions give the same numbers.
_EPS = np.spacing(np.float64(1))

_E_MODES = ("adaptive", "mean", "max")


# --------------------------------------------------------------------------- #
# Input validation / normalisation
# --------------------------------------------------------------------------- #
def _prepare(pred, gt) -> Tuple[np.ndarray, np.ndarray]:
    """Validate inputs and return `(pred in [0,1] as float, gt as bool)`."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(
            f"pred and gt must be 2-D arrays of the same shape, got pred.shape={pred.shape} "
            f"and gt.shape={gt.shape}; squeeze channel/batch axes (e.g. pred[0, 0]) and resize "
            "the prediction to the ground-truth size first."
        )
    if pred.size == 0:
        raise ValueError(f"pred and gt must not be empty, got shape {pred.shape}.")
    return _prepare_pred(pred), _prepare_gt(gt)


def _prepare_pred(pred: np.ndarray) -> np.ndarray:
    if pred.dtype == np.uint8:
        # MATLAB im2double + mapminmax, as pysodmetrics' prepare_data.
        out = pred / 255
        lo, hi = out.min(), out.max()
        if hi != lo:
            out = (out - lo) / (hi - lo)
        return out
    if pred.dtype == np.bool_:
        return pred.astype(np.float64)
    if pred.dtype == np.float16:
        pred = pred.astype(np.float32)
    if pred.dtype in (np.float32, np.float64):
        lo, hi = pred.min(), pred.max()
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise ValueError(
                f"float pred must lie in [0, 1], got values in [{lo}, {hi}]; if these are logits "
                "apply a sigmoid (torch.sigmoid / scipy.special.expit), otherwise rescale to [0, 1] "
                "or pass a uint8 map in 0..255."
            )
        return pred
    raise ValueError(
        f"pred must be float32/float64 in [0, 1], uint8 in 0..255 or bool, got dtype {pred.dtype}; "
        "convert it, e.g. pred.astype(np.float32) / pred.max() or pred.astype(np.uint8)."
    )


def _prepare_gt(gt: np.ndarray) -> np.ndarray:
    if gt.dtype == np.bool_:
        return gt
    if gt.dtype == np.uint8:
        if gt.max() == 1:
            raise ValueError(
                "uint8 gt is read as a 0..255 image (object = gt > 128, as pysodmetrics), but this "
                "gt only holds 0/1 values and would be read as empty; pass gt.astype(bool) "
                "(or gt * 255)."
            )
        return gt > 128
    if np.issubdtype(gt.dtype, np.integer) or np.issubdtype(gt.dtype, np.floating):
        binary = gt != 0
        if not np.array_equal(gt, binary):
            lo, hi = gt.min(), gt.max()
            raise ValueError(
                f"gt of dtype {gt.dtype} must only hold 0/1 values, got values in [{lo}, {hi}]; "
                "pass a bool mask (e.g. gt > 0.5) or a uint8 mask in 0..255 (object = gt > 128)."
            )
        return binary
    raise ValueError(
        f"gt must be bool, uint8 (object = gt > 128) or a 0/1 integer/float array, got dtype {gt.dtype}."
    )


# --------------------------------------------------------------------------- #
# Internal kernels on prepared inputs (pred float in [0,1], gt bool)
# --------------------------------------------------------------------------- #
def _mae(p: np.ndarray, g: np.ndarray) -> float:
    return float(np.mean(np.abs(p - g)))


def _object_similarity(x: np.ndarray) -> float:
    """Fan et al.'s object score 2*mean / (mean^2 + 1 + std) of a region."""
    mean = np.mean(x)
    std = np.std(x, ddof=1) if x.size > 1 else 0.0
    return 2 * mean / (mean * mean + 1 + std + _EPS)


def _region_ssim(p: np.ndarray, g: np.ndarray) -> float:
    """SSIM-like score of one quadrant (the float ops mirror the MATLAB code)."""
    n = p.size
    if n == 0:  # empty quadrant: weight 0, contributes 0 (pysodmetrics gives NaN here)
        return 0.0
    x = np.mean(p)
    y = np.mean(g)
    dx = p - x
    dy = g - y
    denom = n - 1 + _EPS
    var_x = np.sum(dx**2) / denom
    var_y = np.sum(dy**2) / denom
    cov_xy = np.sum(dx * dy) / denom
    num = 4 * x * y * cov_xy
    den = (x**2 + y**2) * (var_x + var_y)
    if num != 0:
        return num / (den + _EPS)
    return 1.0 if den == 0 else 0.0


def _s_measure(p: np.ndarray, g: np.ndarray, alpha: float) -> float:
    h, w = g.shape
    n_fg = np.count_nonzero(g)
    if n_fg == 0:
        return float(1 - np.mean(p))
    if n_fg == g.size:
        return float(np.mean(p))
    ratio = n_fg / g.size

    # Object-aware term: foreground similarity of pred, background of 1 - pred.
    s_obj = _object_similarity(p[g]) * ratio + _object_similarity((1 - p)[~g]) * (1 - ratio)

    # Region-aware term: split at the (rounded, 1-based) foreground centroid.
    rows = np.count_nonzero(g, axis=1)
    cols = np.count_nonzero(g, axis=0)
    cy = int(np.round(np.dot(np.arange(h, dtype=np.int64), rows) / n_fg)) + 1
    cx = int(np.round(np.dot(np.arange(w, dtype=np.int64), cols) / n_fg)) + 1
    area = h * w
    w_lt = cx * cy / area
    w_rt = cy * (w - cx) / area
    w_lb = (h - cy) * cx / area
    w_rb = 1 - w_lt - w_rt - w_lb
    s_reg = (
        _region_ssim(p[:cy, :cx], g[:cy, :cx]) * w_lt
        + _region_ssim(p[:cy, cx:], g[:cy, cx:]) * w_rt
        + _region_ssim(p[cy:, :cx], g[cy:, :cx]) * w_lb
        + _region_ssim(p[cy:, cx:], g[cy:, cx:]) * w_rb
    )
    return float(max(0.0, alpha * s_obj + (1 - alpha) * s_reg))


def _enhanced_alignment_sum(tp, fp, n_fg: int, n: int):
    """Sum of the enhanced-alignment matrix of a binary map given its confusion counts.

    `tp`/`fp` may be scalars or arrays (one entry per threshold).
    """
    pred_fg = tp + fp
    pred_bg = n - pred_fg
    if n_fg == 0:
        return pred_bg
    if n_fg == n:
        return pred_fg
    fn = n_fg - tp
    tn = pred_bg - fn
    mu_pred = pred_fg / n
    mu_gt = n_fg / n
    pred_hi, pred_lo = 1 - mu_pred, 0 - mu_pred  # demeaned values of predicted fg / bg
    gt_hi, gt_lo = 1 - mu_gt, 0 - mu_gt  # demeaned values of gt fg / bg
    total = 0
    parts = ((tp, pred_hi, gt_hi), (fp, pred_hi, gt_lo), (fn, pred_lo, gt_hi), (tn, pred_lo, gt_lo))
    for count, a, b in parts:
        align = 2 * (a * b) / (a**2 + b**2 + _EPS)
        total = total + (align + 1) ** 2 / 4 * count
    return total


def _e_curve(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """E-measure at the 256 thresholds `uint8(255 * pred) >= t` for t = 255, 254, ..., 0."""
    q = (p * 255).astype(np.uint8)
    hist_fg = np.bincount(q[g], minlength=256)
    hist_all = np.bincount(q.ravel(), minlength=256)
    tp = np.cumsum(hist_fg[::-1])
    fp = np.cumsum((hist_all - hist_fg)[::-1])
    n = g.size
    total = _enhanced_alignment_sum(tp, fp, int(np.count_nonzero(g)), n)
    return np.asarray(total, dtype=np.float64) / (n - 1 + _EPS)


def _e_adaptive(p: np.ndarray, g: np.ndarray) -> float:
    threshold = min(2 * p.mean(), 1)
    binary = p >= threshold
    tp = int(np.count_nonzero(binary & g))
    fp = int(np.count_nonzero(binary)) - tp
    n = g.size
    return float(_enhanced_alignment_sum(tp, fp, int(np.count_nonzero(g)), n) / (n - 1 + _EPS))


@functools.lru_cache(maxsize=None)
def _gauss_1d(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """1-D factor of MATLAB `fspecial('gaussian', size, sigma)` (outer(k, k) is the 2-D kernel)."""
    r = (size - 1) / 2
    x = np.arange(-r, r + 1)
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def _weighted_f(p: np.ndarray, g: np.ndarray, beta2: float) -> float:
    n_fg = np.count_nonzero(g)
    if n_fg == 0:
        return 0.0
    # Distance of each background pixel to the closest object pixel, and that pixel's index.
    dist, (iy, ix) = distance_transform_edt(~g, return_indices=True)
    err = np.abs(p - g)
    # Pixel dependency: background errors take the error at the nearest object pixel
    # (object pixels are their own nearest object pixel), then a 7x7 sigma-5 Gaussian
    # with zero padding (MATLAB imfilter default).
    err_nearest = np.ascontiguousarray(err[iy, ix], dtype=np.float64)
    k = _gauss_1d()
    err_blur = cv2.sepFilter2D(err_nearest, cv2.CV_64F, k, k, borderType=cv2.BORDER_CONSTANT)
    err_min = np.where(g & (err_blur < err), err_blur, err)
    # Pixel importance: background errors weigh 2 - 0.5**(dist / 5).
    weight = np.where(g, 1.0, 2 - np.exp(np.log(0.5) / 5 * dist))
    err_w = err_min * weight
    fg_err = err_w[g].sum()
    tp_w = n_fg - fg_err
    fp_w = err_w[~g].sum()
    recall = 1 - fg_err / n_fg
    precision = tp_w / (tp_w + fp_w + _EPS)
    return float((1 + beta2) * recall * precision / (recall + beta2 * precision + _EPS))


def _confusion(p: np.ndarray, g: np.ndarray, threshold: float) -> Tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of `pred > threshold` against `gt`."""
    binary = p > threshold
    tp = int(np.count_nonzero(binary & g))
    n_pred = int(np.count_nonzero(binary))
    n_fg = int(np.count_nonzero(g))
    fp = n_pred - tp
    fn = n_fg - tp
    tn = g.size - n_fg - fp
    return tp, fp, fn, tn


def _ber(p: np.ndarray, g: np.ndarray, threshold: float) -> float:
    tp, fp, fn, tn = _confusion(p, g, threshold)
    n_pos, n_neg = tp + fn, tn + fp
    if n_pos == 0:
        return 100.0 * (1 - tn / n_neg)
    if n_neg == 0:
        return 100.0 * (1 - tp / n_pos)
    return 100.0 * (1 - 0.5 * (tp / n_pos + tn / n_neg))


def _dice(p: np.ndarray, g: np.ndarray, threshold: float) -> float:
    tp, fp, fn, _ = _confusion(p, g, threshold)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def _iou(p: np.ndarray, g: np.ndarray, threshold: float) -> float:
    tp, fp, fn, _ = _confusion(p, g, threshold)
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


# --------------------------------------------------------------------------- #
# Public per-image metrics
# --------------------------------------------------------------------------- #
def s_measure(pred, gt, alpha: float = 0.5) -> float:
    """Structure measure S_alpha (Fan et al., ICCV 2017), as `py_sod_metrics.Smeasure`.

    `alpha * S_object + (1 - alpha) * S_region`, clipped at 0.  Empty gt gives
    `1 - mean(pred)`, full gt gives `mean(pred)`.  Higher is better.

    Args:
        pred: 2-D prediction, float in [0, 1], uint8 in 0..255 (min-max
            normalised like pysodmetrics) or bool.
        gt: 2-D ground truth of the same shape, bool or uint8 (object = > 128).
        alpha: weight of the object-aware term versus the region-aware term.

    Returns:
        The S-measure in [0, 1].

    Example:
        >>> gt = np.zeros((4, 4), bool); gt[1:3, 1:3] = True
        >>> round(s_measure(gt.astype(float), gt), 4)
        1.0
    """
    p, g = _prepare(pred, gt)
    return _s_measure(p, g, alpha)


def e_measure(pred, gt, mode: str = "adaptive") -> float:
    """Enhanced-alignment measure E_phi (Fan et al., IJCAI 2018), as `py_sod_metrics.Emeasure`.

    `"adaptive"` binarises at `min(2 * mean(pred), 1)` (`pred >= thr`);
    `"mean"` / `"max"` are the mean / max of this image's 256-threshold
    curve (thresholds `uint8(255 * pred) >= t`, t = 0..255).  Note the
    dataset-level mean/max of `MetricSuite` average the curves first.
    Normalised by `H*W - 1` like the reference, so a perfect map scores
    `H*W / (H*W - 1)` (16/15 in the example below).

    Args:
        pred: 2-D prediction, float in [0, 1], uint8 in 0..255 or bool.
        gt: 2-D ground truth of the same shape, bool or uint8 (object = > 128).
        mode: `"adaptive"`, `"mean"` or `"max"`.

    Returns:
        The E-measure (about [0, 1]; higher is better).

    Example:
        >>> gt = np.zeros((4, 4), bool); gt[1:3, 1:3] = True
        >>> round(e_measure(gt.astype(float), gt, mode="max"), 4)
        1.0667
    """
    if mode not in _E_MODES:
        raise ValueError(f"mode must be one of {_E_MODES}, got {mode!r}.")
    p, g = _prepare(pred, gt)
    if mode == "adaptive":
        return _e_adaptive(p, g)
    curve = _e_curve(p, g)
    return float(curve.mean() if mode == "mean" else curve.max())


def weighted_f(pred, gt, beta: float = 1.0) -> float:
    """Weighted F-measure F^w_beta (Margolin et al., CVPR 2014), as `py_sod_metrics.WeightedFmeasure`.

    `beta` is the usual F-beta beta; pysodmetrics' `WeightedFmeasure(beta=b)`
    takes b = beta**2 (both default to 1).  Empty gt gives 0.

    Args:
        pred: 2-D prediction, float in [0, 1], uint8 in 0..255 or bool.
        gt: 2-D ground truth of the same shape, bool or uint8 (object = > 128).
        beta: relative weight of recall versus precision.

    Returns:
        The weighted F-measure in [0, 1] (higher is better).

    Example:
        >>> gt = np.zeros((8, 8), bool); gt[2:6, 2:6] = True
        >>> round(weighted_f(gt.astype(float), gt), 4)
        1.0
    """
    p, g = _prepare(pred, gt)
    return _weighted_f(p, g, float(beta) ** 2)


def mae(pred, gt) -> float:
    """Mean absolute error between the [0, 1] prediction and the binary gt, as `py_sod_metrics.MAE`.

    Args:
        pred: 2-D prediction, float in [0, 1], uint8 in 0..255 or bool.
        gt: 2-D ground truth of the same shape, bool or uint8 (object = > 128).

    Returns:
        The MAE in [0, 1] (lower is better).

    Example:
        >>> mae(np.array([[0.0, 0.5]]), np.array([[False, True]]))
        0.25
    """
    p, g = _prepare(pred, gt)
    return _mae(p, g)


def ber(pred, gt, threshold: float = 0.5) -> float:
    """Balanced error rate in percent, as in the shadow-detection literature.

    `100 * (1 - 0.5 * (TP / Npos + TN / Nneg))` with the prediction
    binarised as `pred > threshold` (after the input normalisation, so a
    uint8 map is min-max scaled first).  If gt has no positives the rate is
    the background error alone, `100 * FP / Nneg`; if gt has no negatives it
    is `100 * FN / Npos` (pysodmetrics' BERHandler would instead count the
    missing class as 0 accuracy, giving at least 50).

    Args:
        pred: 2-D prediction, float in [0, 1], uint8 in 0..255 or bool.
        gt: 2-D ground truth of the same shape, bool or uint8 (object = > 128).
        threshold: binarisation threshold on the [0, 1] prediction (strict `>`).

    Returns:
        The BER in [0, 100] (lower is better).

    Example:
        >>> ber(np.array([[1.0, 0.0, 0.0, 0.0]]), np.array([[True, True, False, False]]))
        25.0
    """
    p, g = _prepare(pred, gt)
    return _ber(p, g, threshold)


def dice(pred, gt, threshold: float = 0.5) -> float:
    """Dice coefficient `2 TP / (2 TP + FP + FN)` of `pred > threshold` against gt.

    Both masks empty gives 1.0 (perfect agreement); pysodmetrics' DICEHandler
    gives 0 there.

    Args:
        pred: 2-D prediction, float in [0, 1], uint8 in 0..255 or bool.
        gt: 2-D ground truth of the same shape, bool or uint8 (object = > 128).
        threshold: binarisation threshold on the [0, 1] prediction (strict `>`).

    Returns:
        The Dice score in [0, 1] (higher is better).

    Example:
        >>> dice(np.array([[0.9, 0.8, 0.1]]), np.array([[True, False, False]]))
        0.6666666666666666
    """
    p, g = _prepare(pred, gt)
    return _dice(p, g, threshold)


def iou(pred, gt, threshold: float = 0.5) -> float:
    """Intersection over union `TP / (TP + FP + FN)` of `pred > threshold` against gt.

    Both masks empty gives 1.0 (perfect agreement); pysodmetrics' IOUHandler
    gives 0 there.

    Args:
        pred: 2-D prediction, float in [0, 1], uint8 in 0..255 or bool.
        gt: 2-D ground truth of the same shape, bool or uint8 (object = > 128).
        threshold: binarisation threshold on the [0, 1] prediction (strict `>`).

    Returns:
        The IoU in [0, 1] (higher is better).

    Example:
        >>> iou(np.array([[0.9, 0.8, 0.1]]), np.array([[True, False, False]]))
        0.5
    """
    p, g = _prepare(pred, gt)
    return _iou(p, g, threshold)


def _e_measure_adaptive(pred, gt) -> float:
    """E-measure with the adaptive threshold (see `e_measure`)."""
    return e_measure(pred, gt, mode="adaptive")


def _e_measure_mean(pred, gt) -> float:
    """Mean of the per-image 256-threshold E-measure curve (see `e_measure`)."""
    return e_measure(pred, gt, mode="mean")


def _e_measure_max(pred, gt) -> float:
    """Max of the per-image 256-threshold E-measure curve (see `e_measure`)."""
    return e_measure(pred, gt, mode="max")


#: Per-image metric callables `f(pred, gt) -> float` by name (default parameters).
METRICS: Dict[str, Callable[..., float]] = {
    "s_measure": s_measure,
    "e_measure_adaptive": _e_measure_adaptive,
    "e_measure_mean": _e_measure_mean,
    "e_measure_max": _e_measure_max,
    "weighted_f": weighted_f,
    "mae": mae,
    "ber": ber,
    "dice": dice,
    "iou": iou,
}

#: Names whose dataset value is the mean of a per-image scalar.
_SCALAR_KERNELS: Dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "s_measure": lambda p, g: _s_measure(p, g, 0.5),
    "e_measure_adaptive": _e_adaptive,
    "weighted_f": lambda p, g: _weighted_f(p, g, 1.0),
    "mae": _mae,
    "ber": lambda p, g: _ber(p, g, 0.5),
    "dice": lambda p, g: _dice(p, g, 0.5),
    "iou": lambda p, g: _iou(p, g, 0.5),
}
_CURVE_NAMES = ("e_measure_mean", "e_measure_max")


class MetricSuite:
    """Accumulates per-image metrics and reports dataset-level values like pysodmetrics.

    S-measure, adaptive E-measure, weighted F, MAE, BER, Dice and IoU are the
    mean of the per-image values.  `e_measure_mean` / `e_measure_max`
    follow pysodmetrics: the 256-threshold E-measure curves are averaged over
    images first, then the mean / max of that averaged curve is taken (so
    `e_measure_max` is generally not the mean of per-image maxima).  All
    metrics use their default parameters (alpha=0.5, beta=1, threshold=0.5).

    Args:
        names: metric names from `METRICS`; `None` means all of them.

    Example:
        >>> suite = MetricSuite(["mae", "dice"])
        >>> gt = np.zeros((4, 4), bool); gt[:2] = True
        >>> suite.update(gt.astype(float), gt)
        >>> suite.update(np.zeros((4, 4)), gt)
        >>> suite.results()
        {'mae': 0.25, 'dice': 0.5}
    """

    def __init__(self, names: Optional[Iterable[str]] = None):
        names = list(METRICS) if names is None else [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric name(s) {unknown}; valid names are {list(METRICS)}.")
        self.names: List[str] = list(dict.fromkeys(names))
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._values: Dict[str, List[float]] = {n: [] for n in self.names if n in _SCALAR_KERNELS}
        self._curves: List[np.ndarray] = []
        self.count = 0

    def update(self, pred, gt) -> None:
        """Add one image.

        Args:
            pred: 2-D prediction, float in [0, 1], uint8 in 0..255 or bool.
            gt: 2-D ground truth of the same shape, bool or uint8 (object = > 128).
        """
        p, g = _prepare(pred, gt)
        for name, values in self._values.items():
            values.append(_SCALAR_KERNELS[name](p, g))
        if any(n in _CURVE_NAMES for n in self.names):
            self._curves.append(_e_curve(p, g))
        self.count += 1

    def results(self) -> Dict[str, float]:
        """Dataset-level value of each metric, keyed by name in the order given (NaN before any update)."""
        out: Dict[str, float] = {}
        curve = np.mean(np.array(self._curves, dtype=np.float64), axis=0) if self._curves else None
        for name in self.names:
            if name in self._values:
                vals = self._values[name]
                out[name] = float(np.mean(np.array(vals, dtype=np.float64))) if vals else float("nan")
            elif curve is None:
                out[name] = float("nan")
            else:
                out[name] = float(curve.mean() if name == "e_measure_mean" else curve.max())
        return out


# --------------------------------------------------------------------------- #
# Volume metrics: binary masks of any dimension with voxel spacing in mm
# --------------------------------------------------------------------------- #
# Empty masks, decided once for all four functions below:
# * both empty (a class absent from this volume and not predicted): NaN -- there is nothing to score, and
#   the means skip NaN (`nanmean`), so an absent organ neither helps nor hurts a volume (nnU-Net and MONAI
#   do the same);
# * one empty: Dice, IoU and NSD are 0 (no overlap, no boundary within tolerance: MONAI's NSD gives 0 too);
#   HD95 is the volume's diagonal in mm, the largest distance the volume allows, so a missed organ counts
#   as the worst boundary -- not as infinity, which would make every mean over volumes infinite, and not
#   as an error (medpy raises there), which would stop an evaluation at its first missed organ.


def _binary_volumes(pred, gt, spacing) -> Tuple[np.ndarray, np.ndarray, Tuple[float, ...]]:
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape or p.ndim < 1:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}; resample the "
                         "prediction to the ground truth's grid first")
    for name, a in (("pred", p), ("gt", g)):
        if a.dtype != np.bool_ and not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be a binary mask (bool or 0/1); for a label map pass (labels == k)")
    sp = (1.0,) * p.ndim if spacing is None else tuple(float(s) for s in np.broadcast_to(spacing, (p.ndim,)))
    if any(not np.isfinite(s) or s <= 0 for s in sp):
        raise ValueError(f"spacing={spacing!r} must be positive finite millimetres per axis, e.g. (0.8, 0.8, 3.0)")
    return p.astype(bool), g.astype(bool), sp


def _border(mask: np.ndarray) -> np.ndarray:
    """The mask's surface voxels: the mask minus its erosion by the face-connected cross (medpy and MONAI
    both take this border; voxels outside the array count as background).
    """
    from scipy.ndimage import binary_erosion, generate_binary_structure

    return mask & ~binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), iterations=1)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """For every border voxel of `a`, the distance in mm to the nearest border voxel of `b`."""
    return distance_transform_edt(~_border(b), sampling=spacing)[_border(a)]


def _diagonal(shape, spacing) -> float:
    return float(np.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing))))


def hd95(pred, gt, spacing=None) -> float:
    """The 95th percentile of the symmetric surface distances between two binary masks, in mm (as medpy's
    `hd95`: both directions' distances pooled, then the percentile).

    Args:
        pred: binary mask (bool or 0/1) of any dimension.
        gt: binary mask of the same shape.
        spacing: voxel size per axis in mm (one number for all axes; None: 1).

    Returns:
        The distance in mm (lower is better); NaN when both masks are empty, the volume's diagonal when
        only one is (see the note above this function).

    Example:
        >>> gt = np.zeros((1, 8, 8), bool); gt[0, 2:6, 2:6] = True
        >>> hd95(np.roll(gt, 1, axis=2), gt, spacing=(3.0, 0.5, 0.5))
        0.5
    """
    p, g, sp = _binary_volumes(pred, gt, spacing)
    if not p.any() and not g.any():
        return float("nan")
    if not p.any() or not g.any():
        return _diagonal(p.shape, sp)
    return float(np.percentile(np.hstack([_surface_distances(p, g, sp), _surface_distances(g, p, sp)]), 95))


def nsd(pred, gt, spacing=None, tolerance: float = 1.0) -> float:
    """Normalised surface Dice: the share of both masks' surface voxels that lie within `tolerance` mm of
    the other mask's surface (as MONAI's `compute_surface_dice` without subvoxels).

    Args:
        pred: binary mask (bool or 0/1) of any dimension.
        gt: binary mask of the same shape.
        spacing: voxel size per axis in mm (None: 1).
        tolerance: the accepted boundary error in mm (>= 0).

    Returns:
        NSD in [0, 1] (higher is better); NaN when both masks are empty, 0 when only one is.

    Example:
        >>> gt = np.zeros((1, 8, 8), bool); gt[0, 2:6, 2:6] = True
        >>> nsd(np.roll(gt, 1, axis=2), gt, spacing=(3.0, 0.5, 0.5), tolerance=0.5)
        1.0
    """
    if not (isinstance(tolerance, (int, float)) and np.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance={tolerance!r} must be a distance in mm >= 0, e.g. 1.0")
    p, g, sp = _binary_volumes(pred, gt, spacing)
    if not p.any() and not g.any():
        return float("nan")
    if not p.any() or not g.any():
        return 0.0
    d_pg, d_gp = _surface_distances(p, g, sp), _surface_distances(g, p, sp)
    return float(((d_pg <= tolerance).sum() + (d_gp <= tolerance).sum()) / (d_pg.size + d_gp.size))


def volume_dice(pred, gt) -> float:
    """Dice of two binary masks of any dimension; NaN when both are empty (see the note above `hd95`).

    Example:
        >>> volume_dice(np.array([[1, 1, 0]]), np.array([[1, 0, 0]]))
        0.6666666666666666
    """
    p, g, _ = _binary_volumes(pred, gt, None)
    total = p.sum() + g.sum()
    return float("nan") if total == 0 else float(2 * (p & g).sum() / total)


def volume_iou(pred, gt) -> float:
    """IoU of two binary masks of any dimension; NaN when both are empty.

    Example:
        >>> volume_iou(np.array([[1, 1, 0]]), np.array([[1, 0, 0]]))
        0.5
    """
    p, g, _ = _binary_volumes(pred, gt, None)
    union = (p | g).sum()
    return float("nan") if union == 0 else float((p & g).sum() / union)


VOLUME_METRICS = ("dice", "iou", "hd95", "nsd")


def label_map_metrics(pred, gt, classes: Dict[int, str], spacing=None, tolerance: float = 1.0,
                      surface: bool = True) -> Dict[str, Dict[str, float]]:
    """Per-class metrics of two integer label maps (one volume), plus their mean over the foreground classes.

    Args:
        pred: integer label map (any dimension).
        gt: integer label map of the same shape.
        classes: label value -> class name; 0 (background) is skipped.
        spacing: voxel size per axis in mm.
        tolerance: NSD tolerance in mm.
        surface: also compute HD95 and NSD (the slower two).

    Returns:
        {class name: {dice, iou, hd95, nsd}, ..., "mean": the NaN-skipping mean of each over the classes}.

    Example:
        >>> gt = np.zeros((2, 6, 6), np.uint8); gt[:, 1:3, 1:3] = 1; gt[:, 4:, 4:] = 2
        >>> m = label_map_metrics(gt.copy(), gt, {0: "background", 1: "liver", 2: "spleen"}, spacing=(3, 1, 1))
        >>> m["liver"]["dice"], m["mean"]["hd95"]
        (1.0, 0.0)
    """
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt label maps must have the same shape, got {p.shape} and {g.shape}")
    out: Dict[str, Dict[str, float]] = {}
    for value, name in sorted(classes.items()):
        if int(value) == 0:
            continue
        pm, gm = p == int(value), g == int(value)
        row = {"dice": volume_dice(pm, gm), "iou": volume_iou(pm, gm)}
        if surface:
            row["hd95"] = hd95(pm, gm, spacing)
            row["nsd"] = nsd(pm, gm, spacing, tolerance)
        out[str(name)] = row
    keys = list(next(iter(out.values()))) if out else []
    out["mean"] = {k: _nanmean([r[k] for r in out.values()]) for k in keys}
    return out


def _nanmean(values) -> float:
    v = np.array([x for x in values if x == x], dtype=np.float64)
    return float(v.mean()) if v.size else float("nan")
