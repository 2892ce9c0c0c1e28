"""Tests for recipes.data.prompts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samadapt.recipes.data.prompts import (
    PromptSampler,
    append_correction_clicks,
    box_from_mask,
    correction_click,
    pad_points,
    sample_points,
)


def _rect(h=64, w=80, y0=10, y1=30, x0=20, x1=60):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------- boxes
def test_tight_box_inclusive_indices():
    m = _rect()
    assert box_from_mask(m, jitter=0).tolist() == [20, 10, 59, 29]
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    assert box_from_mask(one, jitter=0).tolist() == [3, 2, 3, 2]
    assert box_from_mask(torch.from_numpy(m)[None].float(), jitter=0).tolist() == [20, 10, 59, 29]


def test_jittered_box_within_bound_and_std():
    m = np.zeros((400, 400), bool)
    m[100:200, 150:350] = True  # 200 wide, 100 high
    tight = box_from_mask(m, jitter=0)
    rng = np.random.default_rng(0)
    boxes = np.stack([box_from_mask(m, 0.1, rng, max_noise=None) for _ in range(3000)])
    dev = boxes - tight
    assert np.abs(dev[:, [0, 2]]).max() <= 5 * 0.1 * 200 and np.abs(dev[:, [1, 3]]).max() <= 5 * 0.1 * 100
    assert abs(dev[:, 0].std() - 20.0) < 2.0 and abs(dev[:, 1].std() - 10.0) < 1.0
    clamped = np.stack([box_from_mask(m, 0.1, rng, max_noise=20) for _ in range(500)])
    assert np.abs(clamped - tight).max() <= 20 + 1e-4
    # boxes stay inside the image and ordered
    edge = _rect(50, 50, 0, 50, 0, 10)
    eb = np.stack([box_from_mask(edge, 0.5, rng, max_noise=None) for _ in range(300)])
    assert eb.min() >= 0 and eb[:, [0, 2]].max() <= 49 and eb[:, [1, 3]].max() <= 49
    assert (eb[:, 0] <= eb[:, 2]).all() and (eb[:, 1] <= eb[:, 3]).all()


def test_box_reproducible_and_empty():
    m = _rect()
    a, b = box_from_mask(m, 0.1, np.random.default_rng(3)), box_from_mask(m, 0.1, np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert np.array_equal(box_from_mask(m, 0.1, 3), box_from_mask(m, 0.1, 3))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert np.array_equal(box_from_mask(m, 0.1, g1), box_from_mask(m, 0.1, g2))
    empty = np.zeros((20, 30), bool)
    assert box_from_mask(empty).tolist() == [0, 0, 29, 19]
    with pytest.raises(ValueError, match="empty"):
        box_from_mask(empty, empty="raise")
    with pytest.raises(ValueError, match="jitter"):
        box_from_mask(m, jitter=-1)
    with pytest.raises(ValueError, match="H x W"):
        box_from_mask(np.zeros((2, 3, 4, 5)))


# ----------------------------------------------------------------------------- points
def test_points_inside_and_outside():
    m = _rect()
    rng = np.random.default_rng(0)
    for _ in range(50):
        xy, lab = sample_points(m, 3, 4, rng)
        assert xy.shape == (7, 2) and xy.dtype == np.float32 and lab.tolist() == [1, 1, 1, 0, 0, 0, 0]
        xi, yi = xy[:, 0].astype(int), xy[:, 1].astype(int)
        assert m[yi[:3], xi[:3]].all() and not m[yi[3:], xi[3:]].any()
        assert (xy[:, 0] < 80).all() and (xy[:, 1] < 64).all()
    # without replacement when there are enough pixels
    xy, _ = sample_points(m, 20, 0, rng)
    assert len({tuple(p) for p in xy.tolist()}) == 20


def test_points_empty_full_tiny_and_valid():
    rng = np.random.default_rng(1)
    xy, lab = sample_points(np.zeros((10, 10), bool), 2, 1, rng)
    assert lab.tolist() == [0, 0, 0]
    xy, lab = sample_points(np.ones((10, 10), bool), 2, 1, rng)
    assert lab.tolist() == [1, 1, 1]
    one = np.zeros((10, 10), bool)
    one[4, 6] = True
    xy, lab = sample_points(one, 3, 0, rng)  # fewer pixels than points: with replacement
    assert (xy == [6, 4]).all() and lab.tolist() == [1, 1, 1]
    m = np.zeros((32, 32), bool)
    m[:4, :4] = True
    for _ in range(20):
        xy, lab = sample_points(m, 1, 5, rng, valid=(8, 8))
        assert xy.max() < 8
    with pytest.raises(ValueError, match="n_pos"):
        sample_points(m, -1, 0, rng)


# ----------------------------------------------------------------------------- correction clicks
def test_correction_click_labels_and_locations():
    gt = _rect(40, 40, 5, 25, 5, 25)
    pred = _rect(40, 40, 10, 30, 10, 30)  # shifted: FN top-left L, FP bottom-right L
    fn, fp = gt & ~pred, pred & ~gt
    rng = np.random.default_rng(0)
    labels = []
    for _ in range(400):
        xy, label = correction_click(pred, gt, rng)
        x, y = int(xy[0]), int(xy[1])
        assert (label == 1 and fn[y, x]) or (label == 0 and fp[y, x])
        labels.append(label)
    assert 0.4 < np.mean(labels) < 0.6  # equal-size error regions, uniform over error pixels

    big_fp = np.zeros((40, 40), bool)
    big_fp[:, :30] = True
    small_gt = _rect(40, 40, 0, 4, 35, 40)  # 20 FN pixels vs 1200 FP pixels
    labs = [correction_click(big_fp, small_gt, rng)[1] for _ in range(200)]
    assert np.mean(labs) < 0.1
    xy, lab = correction_click(big_fp, small_gt, rng, mode="largest")
    assert lab == 0 and big_fp[int(xy[1]), int(xy[0])]
    xy, lab = correction_click(np.zeros((40, 40), bool), gt, mode="center")
    assert lab == 1 and 13 <= xy[0] <= 16 and 13 <= xy[1] <= 16


def test_correction_click_no_error_and_thresholds():
    gt = _rect(20, 20, 2, 8, 2, 8)
    assert correction_click(gt, gt, np.random.default_rng(0)) is None
    probs = torch.from_numpy(gt.astype(np.float32) * 0.9)
    assert correction_click(probs, gt, 0) is None
    logits = torch.from_numpy(np.where(gt, 5.0, -5.0).astype(np.float32))
    assert correction_click(logits > 0, gt, 0) is None
    with pytest.raises(ValueError, match="shape"):
        correction_click(np.zeros((4, 4), bool), np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="mode"):
        correction_click(gt, gt, mode="random")


def test_append_correction_clicks():
    gt = torch.zeros(3, 1, 16, 16)
    gt[:, :, 4:10, 4:10] = 1
    pred = gt.bool().clone()
    pred[1] = False  # item 1 misses everything; items 0 and 2 are perfect
    c0, l0 = pad_points([np.array([[1.0, 1.0]])] * 3, [np.array([0])] * 3)
    c, lab = append_correction_clicks(c0, l0, pred, gt, np.random.default_rng(0))
    assert c.shape == (3, 2, 2) and lab[:, 1].tolist() == [-1, 1, -1]
    x, y = c[1, 1].long().tolist()
    assert gt[1, 0, y, x] == 1


# ----------------------------------------------------------------------------- PromptSampler
def _batch():
    masks = torch.zeros(4, 1, 32, 32)
    masks[0, :, 2:10, 3:20] = 1
    masks[1, :, 15:30, 15:30] = 1
    masks[3, :, :, :] = 1  # item 2 empty, item 3 full
    return masks


def test_sampler_modes_shapes():
    masks = _batch()
    none = PromptSampler("none")(masks)
    assert none["point_coords"] is None and none["boxes"] is None
    box = PromptSampler("box", seed=0)(masks)
    assert box["boxes"].shape == (4, 4) and box["point_coords"] is None and box["box_mask"] is None
    assert box["boxes"][2].tolist() == [0, 0, 31, 31]  # empty mask: whole-image box
    pts = PromptSampler("points", n_pos=2, n_neg=1, seed=0)(masks)
    assert pts["point_coords"].shape == (4, 3, 2) and pts["point_labels"].dtype == torch.int64
    assert pts["boxes"] is None
    assert pts["point_labels"][2].tolist() == [0, 0, 0] and pts["point_labels"][3].tolist() == [1, 1, 1]
    for i in range(4):
        for (x, y), lab in zip(pts["point_coords"][i].long().tolist(), pts["point_labels"][i].tolist()):
            assert masks[i, 0, y, x].item() == float(lab == 1)
    both = PromptSampler("box+points", n_pos=1, seed=0)(masks)
    assert both["boxes"].shape == (4, 4) and both["point_coords"].shape == (4, 1, 2)


def test_sampler_variable_counts_padding_and_determinism():
    masks = _batch()
    s1 = PromptSampler("points", n_pos=(0, 3), n_neg=(0, 2), seed=5)
    s2 = PromptSampler("points", n_pos=(0, 3), n_neg=(0, 2), seed=5)
    seen_pad = False
    for _ in range(10):
        a, b = s1(masks), s2(masks)
        assert torch.equal(a["point_coords"], b["point_coords"]) and torch.equal(a["point_labels"], b["point_labels"])
        lab = a["point_labels"]
        assert set(lab.unique().tolist()) <= {-1, 0, 1}
        seen_pad |= bool((lab == -1).any())
        # padding only at the end of each row
        for row in lab.tolist():
            k = row.index(-1) if -1 in row else len(row)
            assert all(v == -1 for v in row[k:])
    assert seen_pad
    c = PromptSampler("points", seed=1)(masks, rng=np.random.default_rng(9))
    d = PromptSampler("points", seed=2)(masks, rng=np.random.default_rng(9))
    assert torch.equal(c["point_coords"], d["point_coords"])


def test_sampler_mixed_and_valid_sizes():
    masks = _batch()
    out = PromptSampler("mixed", n_pos=1, box_prob=0.5, seed=3)
    seen_mixed = False
    for _ in range(20):
        r = out(masks)
        if r["box_mask"] is not None:
            seen_mixed = True
            bm = r["box_mask"]
            assert r["boxes"].shape == (4, 4) and r["point_labels"].shape[0] == 4
            assert (r["point_labels"][bm] == -1).all() and (r["point_labels"][~bm] >= 0).any(dim=1).all()
    assert seen_mixed
    per_batch = PromptSampler("mixed", mixed_per="batch", seed=0)
    for _ in range(10):
        r = per_batch(masks)
        assert (r["boxes"] is None) != (r["point_coords"] is None) and r["box_mask"] is None
    valid = torch.tensor([[16, 16], [32, 32], [32, 32], [8, 32]])
    r = PromptSampler("box+points", n_pos=1, n_neg=2, box_jitter=0.5, max_box_noise=None, seed=0)(masks, valid)
    assert r["boxes"][0, 2] <= 15 and r["boxes"][0, 3] <= 15 and r["boxes"][3, 3] <= 7
    assert (r["point_coords"][0] < 16).all() and (r["point_coords"][3, :, 1] < 8).all()


def test_sampler_errors():
    with pytest.raises(ValueError, match="mode"):
        PromptSampler("scribble")
    with pytest.raises(ValueError, match="n_pos"):
        PromptSampler("points", n_pos=0, n_neg=0)
    with pytest.raises(ValueError, match="n_neg"):
        PromptSampler("points", n_neg=(3, 1))
    with pytest.raises(ValueError, match="box_prob"):
        PromptSampler("mixed", box_prob=2)
    with pytest.raises(ValueError, match="B x H x W"):
        PromptSampler("box")(torch.zeros(32, 32))


def test_one_component_picks_one_object_of_a_union_mask():
    import torch

    from samadapt.recipes.data.prompts import one_component

    m = torch.zeros(3, 1, 32, 32)
    m[0, 0, 2:10, 2:10] = 1  # two objects
    m[0, 0, 20:30, 18:28] = 1
    m[1, 0, 5:7, 5:7] = 1  # one object smaller than min_pixels: kept (the largest there is)
    seen = set()
    for seed in range(12):
        out = one_component(m, rng=seed)
        assert out.shape == m.shape and out.dtype == m.dtype
        assert bool((out <= m).all())  # never outside the mask
        assert int(out[0].sum()) in (64, 100)  # exactly one whole object
        seen.add(int(out[0].sum()))
        assert int(out[1].sum()) == 4 and int(out[2].sum()) == 0  # empty stays empty
    assert seen == {64, 100}  # either object can be chosen


def test_keep_prompts_recipe_checks():
    from samadapt.recipes.config import load_recipe
    from samadapt.recipes.errors import RecipeError

    with pytest.raises(RecipeError, match=r"keep_prompts=1.5 must be in \[0.0, 1.0\] \(a share of batches"):
        load_recipe("demo", ["prompts.keep_prompts=1.5"])
    with pytest.raises(RecipeError, match="for promptless recipes"):
        load_recipe("demo", ["prompts.keep_prompts=0.5", "prompts.mode=box"])
    cfg = load_recipe("demo", ["prompts.keep_prompts=0.5", "prompts.keep_prompts_data=/no/such/folder"])
    from samadapt.recipes.data.pipeline import build_keep_prompts_data

    with pytest.raises(RecipeError, match="neither 'self', a synthetic domain"):
        build_keep_prompts_data(cfg, 64)
