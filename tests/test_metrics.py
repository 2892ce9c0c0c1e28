"""Tests for recipes/metrics.py: every number must equal pysodmetrics' one."""

import doctest

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from samadapt.recipes import metrics as M  # noqa: E402
from samadapt.recipes.metrics import (  # noqa: E402
    METRICS,
    MetricSuite,
    ber,
    dice,
    e_measure,
    iou,
    mae,
    s_measure,
    weighted_f,
)

psm = pytest.importorskip("py_sod_metrics")

ATOL = 1e-9  # we agree to ~1e-15 (bit-exact for most metrics)
# weighted F on float32 preds: we blur in float64, pysodmetrics in float32 (~1e-9 apart)
WF_FLOAT32_ATOL = 1e-7
ALL_NAMES = [
    "s_measure", "e_measure_adaptive", "e_measure_mean", "e_measure_max",
    "weighted_f", "mae", "ber", "dice", "iou",
]


# --------------------------------------------------------------------------- #
# Reference values from pysodmetrics
# --------------------------------------------------------------------------- #
class _SmeasureEmptyQuadrantIsZero(psm.Smeasure):
    """pysodmetrics' S-measure, except that an empty quadrant's SSIM is 0 instead of NaN.

    pysodmetrics returns NaN when the gt centroid lies in the last row/column (an empty
    quadrant of weight 0 gives 0 * NaN); recipes.metrics returns the weight-0 limit.
    """

    def ssim(self, pred, gt):
        return 0.0 if pred.size == 0 else super().ssim(pred, gt)


def _reference_inputs(pred, gt):
    """Map our accepted inputs to the equivalent pysodmetrics ``step`` arguments."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.dtype == np.uint8:
        gt_u8 = gt if gt.dtype == np.uint8 else (gt.astype(bool).astype(np.uint8) * 255)
        return (pred, gt_u8), {"normalize": True}
    gt_b = gt > 128 if gt.dtype == np.uint8 else gt.astype(bool)
    if pred.dtype == np.bool_:
        pred = pred.astype(np.float64)
    elif pred.dtype == np.float16:
        pred = pred.astype(np.float32)
    return (pred, gt_b), {"normalize": False}


def reference(pred, gt):
    """pysodmetrics' per-image values, keyed like METRICS (S-measure with the NaN fix)."""
    args, kw = _reference_inputs(pred, gt)
    sm, em, wfm, mae_ = _SmeasureEmptyQuadrantIsZero(), psm.Emeasure(), psm.WeightedFmeasure(), psm.MAE()
    for m in (sm, em, wfm, mae_):
        m.step(*args, **kw)
    curve = em.get_results()["em"]["curve"]
    return {
        "s_measure": float(sm.sms[0]),
        "e_measure_adaptive": float(em.adaptive_ems[0]),
        "e_measure_mean": float(curve.mean()),
        "e_measure_max": float(curve.max()),
        "weighted_f": float(wfm.weighted_fms[0]),
        "mae": float(mae_.maes[0]),
    }


def ours(pred, gt):
    return {name: METRICS[name](pred, gt) for name in ALL_NAMES}


def assert_matches_reference(pred, gt):
    ref = reference(pred, gt)
    got = ours(pred, gt)
    low_precision = np.asarray(pred).dtype in (np.float32, np.float16)
    for name, value in ref.items():
        atol = WF_FLOAT32_ATOL if (low_precision and name == "weighted_f") else ATOL
        assert np.isfinite(got[name]), name
        assert got[name] == pytest.approx(value, abs=atol, rel=0), (name, got[name], value)


# --------------------------------------------------------------------------- #
# Random inputs
# --------------------------------------------------------------------------- #
SIZES = [(1, 7), (7, 1), (2, 2), (3, 5), (9, 13), (17, 31), (40, 40), (48, 80), (100, 37)]


def blobby(rng, shape, sigma=None):
    """Smooth random field scaled to [0, 1]."""
    sigma = max(1.0, min(shape) / 6) if sigma is None else sigma
    f = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    lo, hi = f.min(), f.max()
    return (f - lo) / (hi - lo) if hi > lo else np.full(shape, 0.5)


def random_gt(rng, shape, kind):
    if kind == "blob":
        return blobby(rng, shape) > rng.uniform(0.3, 0.7)
    if kind == "sparse":
        return rng.random(shape) < 0.1
    return rng.random(shape) < 0.5  # "noise"


def random_pred(rng, shape, kind, gt):
    if kind == "uniform":
        return rng.random(shape)
    if kind == "blobby":  # smooth, correlated with gt
        return np.clip(0.6 * gaussian_filter(gt.astype(float), 1.5) + 0.4 * blobby(rng, shape), 0, 1)
    if kind == "binary":
        return (blobby(rng, shape) > 0.5).astype(np.float64)
    if kind == "levels":  # exact multiples of 1/255: stresses the uint8(255 * pred) truncation
        return rng.integers(0, 256, shape) / 255
    if kind == "float32":
        return np.clip(0.5 * gt + 0.5 * rng.random(shape), 0, 1).astype(np.float32)
    if kind == "float32_levels":
        return (rng.integers(0, 256, shape) / 255).astype(np.float32)
    if kind == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "uint8_narrow":  # min-max normalisation actually rescales
        return rng.integers(40, 180, shape, dtype=np.uint8)
    if kind == "uint8_binary":
        return (gt ^ (rng.random(shape) < 0.1)).astype(np.uint8) * 255
    if kind == "bool":
        return blobby(rng, shape) > 0.4
    if kind == "constant":
        return np.full(shape, 0.3)
    if kind == "float32_constant":
        return np.full(shape, 0.7, np.float32)
    if kind == "float32_two_level":  # half the pixels at v: 2 * mean(pred) lands on v (adaptive threshold)
        p = np.zeros(shape, np.float32)
        p.flat[rng.permutation(p.size)[: p.size // 2]] = rng.random()
        return p
    raise AssertionError(kind)


PRED_KINDS = [
    "uniform", "blobby", "binary", "levels", "float32", "float32_levels", "uint8", "uint8_narrow",
    "uint8_binary", "bool", "constant", "float32_constant", "float32_two_level",
]
GT_KINDS = ["blob", "sparse", "noise"]


@pytest.mark.parametrize("pred_kind", PRED_KINDS)
def test_random_masks_match_pysodmetrics(pred_kind):
    rng = np.random.default_rng(PRED_KINDS.index(pred_kind))
    for shape in SIZES:
        for gt_kind in GT_KINDS:
            gt = random_gt(rng, shape, gt_kind)
            pred = random_pred(rng, shape, pred_kind, gt)
            assert_matches_reference(pred, gt)
            # same gt as a 0/255 uint8 image (object = > 128)
            assert_matches_reference(pred, gt.astype(np.uint8) * 255)


def test_uint8_gt_thresholds_above_128():
    rng = np.random.default_rng(11)
    for shape in [(20, 30), (33, 17)]:
        gt = rng.integers(0, 256, shape, dtype=np.uint8)
        gt[0, :3] = [127, 128, 129]
        for pred in (rng.random(shape), rng.integers(0, 256, shape, dtype=np.uint8)):
            assert_matches_reference(pred, gt)
    # 128 is background, 129 object
    gt = np.array([[0, 128, 129, 255]], np.uint8)
    pred = np.array([[0.0, 1.0, 1.0, 1.0]])
    assert dice(pred, gt) == pytest.approx(2 * 2 / (2 * 2 + 1))


def test_larger_image_matches_pysodmetrics():
    rng = np.random.default_rng(5)
    gt = random_gt(rng, (160, 224), "blob")
    pred = random_pred(rng, (160, 224), "blobby", gt)
    assert_matches_reference(pred, gt)
    assert_matches_reference((pred * 255).astype(np.uint8), gt.astype(np.uint8) * 255)


# --------------------------------------------------------------------------- #
# Edge cases
# --------------------------------------------------------------------------- #
def _edge_gts(shape):
    h, w = shape
    out = {"empty": np.zeros(shape, bool), "full": np.ones(shape, bool)}
    for name, (y, x) in {"px_first": (0, 0), "px_center": (h // 2, w // 2), "px_last_col": (h // 3, w - 1),
                         "px_last_row": (h - 1, w // 3), "px_last": (h - 1, w - 1)}.items():
        g = np.zeros(shape, bool)
        g[y, x] = True
        out[name] = g
    g = np.zeros(shape, bool)
    g[:, -1] = True  # centroid in the last column
    out["last_col"] = g
    g = np.zeros(shape, bool)
    g[h // 4 : 3 * h // 4 + 1, w // 4 : 3 * w // 4 + 1] = True
    out["box"] = g
    return out


def _edge_preds(gt, rng):
    return {
        "empty": np.zeros(gt.shape),
        "full": np.ones(gt.shape),
        "equal": gt.astype(np.float64),
        "inverse": (~gt).astype(np.float64),
        "half": np.full(gt.shape, 0.5),
        "random": rng.random(gt.shape),
        "uint8_equal": gt.astype(np.uint8) * 255,
        "uint8_zeros": np.zeros(gt.shape, np.uint8),
        "uint8_const": np.full(gt.shape, 200, np.uint8),
        "bool_equal": gt.copy(),
    }


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (2, 3), (9, 13), (24, 16)])
def test_edge_cases_match_pysodmetrics(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for gt_name, gt in _edge_gts(shape).items():
        for pred_name, pred in _edge_preds(gt, rng).items():
            ref = reference(pred, gt)
            got = ours(pred, gt)
            for name, value in ref.items():
                # E-measure divides by H*W - 1 + eps: a 1x1 image gives values ~1e16
                tol = ATOL * max(1.0, abs(value))
                where = (shape, gt_name, pred_name, name, got[name], value)
                assert got[name] == pytest.approx(value, abs=tol, rel=0), where


def test_documented_edge_values():
    gt = np.zeros((4, 5), bool)
    n = gt.size
    # empty gt: S = 1 - mean(pred), wF = 0, perfect E = N / (N - 1)
    assert s_measure(np.zeros((4, 5)), gt) == 1.0
    assert weighted_f(np.zeros((4, 5)), gt) == 0.0
    assert e_measure(np.zeros((4, 5)), gt, "max") == pytest.approx(n / (n - 1))
    # all-zero pred: adaptive threshold 0 binarises everything as foreground
    assert e_measure(np.zeros((4, 5)), gt, "adaptive") == 0.0
    # full gt: S = mean(pred)
    assert s_measure(np.full((4, 5), 0.25), ~gt) == pytest.approx(0.25)
    # perfect prediction of a normal mask
    g = np.zeros((6, 6), bool)
    g[1:4, 2:5] = True
    assert s_measure(g.astype(float), g) == pytest.approx(1.0)
    assert weighted_f(g.astype(float), g) == pytest.approx(1.0)
    assert mae(g.astype(float), g) == 0.0
    assert e_measure(g.astype(float), g, "adaptive") == pytest.approx(36 / 35)


def test_s_measure_last_column_centroid_is_finite_where_pysodmetrics_gives_nan():
    gt = np.zeros((5, 6), bool)
    gt[2, 5] = True
    pred = np.random.default_rng(0).random((5, 6))
    plain = psm.Smeasure()
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        plain.step(pred, gt, normalize=False)
    assert np.isnan(plain.sms[0])
    fixed = _SmeasureEmptyQuadrantIsZero()
    fixed.step(pred, gt, normalize=False)
    assert s_measure(pred, gt) == pytest.approx(float(fixed.sms[0]), abs=ATOL)


def test_s_measure_alpha_and_weighted_f_beta():
    rng = np.random.default_rng(3)
    gt = random_gt(rng, (30, 40), "blob")
    pred = random_pred(rng, (30, 40), "blobby", gt)
    for alpha in (0.0, 0.3, 0.7, 1.0):
        ref = psm.Smeasure(alpha=alpha)
        ref.step(pred, gt, normalize=False)
        assert s_measure(pred, gt, alpha=alpha) == pytest.approx(float(ref.sms[0]), abs=ATOL)
    for beta in (0.3, 0.5, 1.0, 2.0):
        ref = psm.WeightedFmeasure(beta=beta**2)  # pysodmetrics' beta is beta^2
        ref.step(pred, gt, normalize=False)
        assert weighted_f(pred, gt, beta=beta) == pytest.approx(float(ref.weighted_fms[0]), abs=ATOL)


def test_float16_and_01_integer_or_float_gt():
    rng = np.random.default_rng(4)
    gt = random_gt(rng, (20, 24), "blob")
    pred16 = rng.random((20, 24)).astype(np.float16)
    assert_matches_reference(pred16, gt)
    pred = rng.random((20, 24))
    want = ours(pred, gt)
    for g in (gt.astype(np.int64), gt.astype(np.float32), gt.astype(np.int32)):
        assert ours(pred, g) == want


# --------------------------------------------------------------------------- #
# Dataset-level aggregation
# --------------------------------------------------------------------------- #
def test_metric_suite_matches_pysodmetrics_get_results():
    rng = np.random.default_rng(21)
    sm, em, wfm, mae_ = _SmeasureEmptyQuadrantIsZero(), psm.Emeasure(), psm.WeightedFmeasure(), psm.MAE()
    suite = MetricSuite(ALL_NAMES)
    per_image = {n: [] for n in ALL_NAMES}
    kinds = ["blobby", "uniform", "binary", "uint8", "levels", "uint8_binary", "constant"]
    for i in range(14):
        shape = SIZES[i % len(SIZES)] if i % 3 else (32 + i, 45 - i)
        gt = random_gt(rng, shape, GT_KINDS[i % 3])
        if i == 5:
            gt[:] = False
        if i == 9:
            gt[:] = True
        pred = random_pred(rng, shape, kinds[i % len(kinds)], gt)
        args, kw = _reference_inputs(pred, gt)
        for m in (sm, em, wfm, mae_):
            m.step(*args, **kw)
        suite.update(pred, gt)
        for n in ALL_NAMES:
            per_image[n].append(METRICS[n](pred, gt))
    got = suite.results()
    assert list(got) == ALL_NAMES
    assert suite.count == 14
    curve = em.get_results()["em"]["curve"]
    assert got["s_measure"] == pytest.approx(float(sm.get_results()["sm"]), abs=ATOL)
    assert got["e_measure_adaptive"] == pytest.approx(float(em.get_results()["em"]["adp"]), abs=ATOL)
    assert got["e_measure_mean"] == pytest.approx(float(curve.mean()), abs=ATOL)
    assert got["e_measure_max"] == pytest.approx(float(curve.max()), abs=ATOL)
    assert got["weighted_f"] == pytest.approx(float(wfm.get_results()["wfm"]), abs=ATOL)
    assert got["mae"] == pytest.approx(float(mae_.get_results()["mae"]), abs=ATOL)
    for n in ("ber", "dice", "iou", "s_measure", "weighted_f", "mae", "e_measure_adaptive"):
        assert got[n] == pytest.approx(np.mean(per_image[n]), abs=ATOL)
    # the dataset max E-measure is the max of the averaged curve, not the mean of per-image maxima
    assert got["e_measure_max"] <= np.mean(per_image["e_measure_max"]) + ATOL
    assert got["e_measure_max"] != pytest.approx(np.mean(per_image["e_measure_max"]), abs=1e-6)


def test_metric_suite_subset_reset_and_errors():
    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    suite = MetricSuite(["e_measure_max", "dice"])
    assert all(np.isnan(v) for v in suite.results().values())
    suite.update(gt.astype(float), gt)
    assert suite.results() == {"e_measure_max": pytest.approx(16 / 15), "dice": 1.0}
    suite.reset()
    assert suite.count == 0 and np.isnan(suite.results()["dice"])
    assert list(MetricSuite().results()) == ALL_NAMES
    with pytest.raises(ValueError, match="unknown metric"):
        MetricSuite(["s_measure", "f_measure"])
    with pytest.raises(ValueError, match="shape"):
        suite.update(np.zeros((4, 4)), np.zeros((4, 5), bool))


# --------------------------------------------------------------------------- #
# BER / Dice / IoU by hand
# --------------------------------------------------------------------------- #
def test_binary_metrics_by_hand():
    pred = np.array([[0.9, 0.2, 0.7], [0.1, 0.6, 0.4]])
    gt = np.array([[1, 0, 0], [0, 1, 1]], bool)
    # pred > 0.5 -> [[1,0,1],[0,1,0]]: TP=2 FP=1 FN=1 TN=2
    assert ber(pred, gt) == pytest.approx(100 * (1 - 0.5 * (2 / 3 + 2 / 3)))
    assert dice(pred, gt) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert iou(pred, gt) == pytest.approx(2 / (2 + 1 + 1))
    # threshold is strict: 0.5 is background
    p = np.array([[0.5, 0.5, 0.9, 0.0]])
    g = np.array([[True, False, True, False]])
    assert dice(p, g) == pytest.approx(2 / 3)  # TP=1 FN=1 FP=0
    assert iou(p, g) == pytest.approx(0.5)
    assert ber(p, g) == pytest.approx(100 * (1 - 0.5 * (1 / 2 + 2 / 2)))
    # custom threshold
    assert dice(p, g, threshold=0.4) == pytest.approx(2 * 2 / (2 * 2 + 1))
    assert iou(p, g, threshold=0.95) == 0.0
    assert ber(p, g, threshold=0.95) == pytest.approx(50.0)
    # uint8 pred: thresholded after the /255 + min-max normalisation
    assert dice(np.array([[0, 255, 255, 0]], np.uint8), g) == pytest.approx(0.5)


def test_binary_metrics_degenerate_gt():
    # no positives: BER is the background error rate only
    g = np.zeros((1, 4), bool)
    assert ber(np.array([[0.9, 0.1, 0.1, 0.1]]), g) == pytest.approx(25.0)
    assert ber(np.zeros((1, 4)), g) == 0.0
    assert dice(np.array([[0.9, 0.1, 0.1, 0.1]]), g) == 0.0
    assert iou(np.array([[0.9, 0.1, 0.1, 0.1]]), g) == 0.0
    # both empty: perfect
    assert dice(np.zeros((1, 4)), g) == 1.0
    assert iou(np.zeros((1, 4)), g) == 1.0
    # no negatives: BER is the foreground error rate only
    g = np.ones((1, 4), bool)
    p = np.array([[0.9, 0.9, 0.1, 0.1]])
    assert ber(p, g) == pytest.approx(50.0)
    assert dice(p, g) == pytest.approx(2 / 3)
    assert iou(p, g) == pytest.approx(0.5)
    assert ber(np.ones((1, 4)), g) == 0.0


def test_binary_metrics_match_fmeasurev2_when_defined():
    rng = np.random.default_rng(8)
    for shape in SIZES[3:]:
        for gt_kind in GT_KINDS:
            gt = random_gt(rng, shape, gt_kind)
            if gt.all() or not gt.any():
                continue
            preds = (rng.random(shape), random_pred(rng, shape, "blobby", gt), random_pred(rng, shape, "uint8", gt))
            for pred in preds:
                fm = psm.FmeasureV2(
                    {
                        "ber": psm.BERHandler(False, False, with_binary=True),
                        "dice": psm.DICEHandler(False, False, with_binary=True),
                        "iou": psm.IOUHandler(False, False, with_binary=True),
                    }
                )
                args, kw = _reference_inputs(pred, gt)
                fm.step(*args, **kw)
                res = fm.get_results()
                assert ber(pred, gt) == pytest.approx(100 * float(res["ber"]["binary"]), abs=ATOL)
                # gt is non-empty here, so the 0/0 conventions never differ
                assert dice(pred, gt) == pytest.approx(float(res["dice"]["binary"]), abs=ATOL)
                assert iou(pred, gt) == pytest.approx(float(res["iou"]["binary"]), abs=ATOL)


# --------------------------------------------------------------------------- #
# API and bad inputs
# --------------------------------------------------------------------------- #
def test_metrics_registry():
    assert set(METRICS) == set(ALL_NAMES)
    rng = np.random.default_rng(1)
    gt = random_gt(rng, (12, 10), "blob")
    pred = rng.random((12, 10))
    assert METRICS["e_measure_adaptive"](pred, gt) == e_measure(pred, gt, "adaptive")
    assert METRICS["e_measure_mean"](pred, gt) == e_measure(pred, gt, "mean")
    assert METRICS["e_measure_max"](pred, gt) == e_measure(pred, gt, "max")
    assert all(isinstance(v, float) for v in ours(pred, gt).values())


def test_docstring_examples_run():
    result = doctest.testmod(M, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0
    for fn in (s_measure, e_measure, weighted_f, mae, ber, dice, iou):
        assert "Args:" in fn.__doc__ and "Example:" in fn.__doc__


@pytest.mark.parametrize("name", ALL_NAMES)
def test_bad_inputs_raise(name):
    f = METRICS[name]
    ok_gt = np.zeros((4, 5), bool)
    ok_gt[1:3, 1:3] = True
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        f(np.zeros((4, 5)), np.zeros((5, 4), bool))
    with pytest.raises(ValueError, match="2-D"):
        f(np.zeros((1, 4, 5)), np.zeros((1, 4, 5), bool))
    with pytest.raises(ValueError, match="2-D"):
        f(np.zeros(5), np.zeros(5, bool))
    with pytest.raises(ValueError, match="empty"):
        f(np.zeros((0, 5)), np.zeros((0, 5), bool))
    for bad in (1.5, -0.25):
        p = np.full((4, 5), 0.5)
        p[0, 0] = bad
        with pytest.raises(ValueError, match=r"\[0, 1\].*sigmoid"):
            f(p, ok_gt)
    p = np.full((4, 5), 0.5, np.float32)
    p[2, 2] = np.nan
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        f(p, ok_gt)
    with pytest.raises(ValueError, match="dtype int64"):
        f(np.zeros((4, 5), np.int64), ok_gt)
    with pytest.raises(ValueError, match="astype\\(bool\\)"):
        f(np.zeros((4, 5)), ok_gt.astype(np.uint8))  # 0/1 uint8 gt would silently be empty
    with pytest.raises(ValueError, match="0/1"):
        f(np.zeros((4, 5)), ok_gt * 0.7)


def test_bad_e_measure_mode():
    with pytest.raises(ValueError, match="mode"):
        e_measure(np.zeros((3, 3)), np.zeros((3, 3), bool), mode="median")


def test_out_of_range_message_reports_range():
    with pytest.raises(ValueError) as info:
        mae(np.array([[-2.0, 3.0]]), np.array([[True, False]]))
    assert "-2.0" in str(info.value) and "3.0" in str(info.value)
