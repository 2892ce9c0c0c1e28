"""recipes.compare: the baselines an adapter is judged against, scored by one code path."""
import numpy as np
import pytest

from samadapt.recipes import compare
from samadapt.recipes.config import load_recipe
from samadapt.recipes.data import SyntheticDataset


class Spy:
    """A raw dataset that records which items were read."""

    def __init__(self, masks):
        self.masks, self.read = masks, []

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        self.read.append(i)
        m = self.masks[i]
        return {"image": np.zeros(m.shape + (3,), np.uint8), "mask": m}


def test_fixed_prior_is_the_mean_training_mask_and_reads_nothing_else():
    left = np.zeros((64, 64), bool)
    left[:, :20] = True
    top = np.zeros((64, 64), bool)
    top[:16] = True
    train = Spy([left, left, top, left])
    prior = compare.fixed_prior(train, 64)
    assert sorted(train.read) == [0, 1, 2, 3]  # every training mask, once
    np.testing.assert_allclose(prior, (3 * left + top) / 4.0)
    # the same map for every eval image: on objects elsewhere it scores nothing
    right = np.zeros((64, 64), bool)
    right[20:, 40:] = True
    res = compare.score(compare.prior_maps(prior, [{"input_size": np.array([64, 64])}]), [right], ["iou", "mae"])
    assert res["iou"] == 0.0 and res["mae"] == pytest.approx(float(np.abs(prior - right).mean()))


def test_prior_row_comes_from_the_training_split(tmp_path):
    """`run_method`'s prior row is the mean of the *training* masks (train seed), not of the
    held-out ones it is scored on (seed + 10000)."""
    cfg = load_recipe("demo", ["data.synthetic_train_size=12", "data.synthetic_eval_size=6"])
    row = compare.run_method(cfg, "prior", tmp_path)
    s = cfg["data"]["synthetic_image_size"]
    train_mean = np.mean([m for _, m in (SyntheticDataset("camouflage", 12, s, seed=0).sample(i)
                                         for i in range(12))], axis=0)
    eval_mean = np.mean([m for _, m in (SyntheticDataset("camouflage", 6, s, seed=10_000).sample(i)
                                        for i in range(6))], axis=0)
    for p in row["probs"]:
        np.testing.assert_allclose(p, train_mean)
    assert np.abs(train_mean - eval_mean).max() > 0.3  # the two splits' means differ: the check can fail
    assert row["params"] == 0 and row["file"] is None
    assert set(row["metrics"]) == set(cfg["eval"]["metrics"])


def test_pairwise_iou_separates_a_fixed_map_from_masks_that_move():
    rng = np.random.default_rng(0)
    moving = []
    for _ in range(6):
        m = np.zeros((40, 40), bool)
        y, x = rng.integers(0, 30, 2)
        m[y:y + 10, x:x + 10] = True
        moving.append(m)
    fixed = [moving[0]] * 6
    assert compare.pairwise_iou(fixed) == 1.0
    assert compare.pairwise_iou(moving) < 0.2


def test_method_recipes_validate_and_change_only_their_keys():
    cfg = load_recipe("demo")
    for method, changes in compare.METHODS.items():
        if changes is None:
            with pytest.raises(ValueError, match="trains nothing"):
                compare.method_recipe(cfg, method)
            continue
        m = compare.method_recipe(cfg, method)
        assert m["data"] == cfg["data"] and m["loss"] == cfg["loss"]
        assert (m["train"]["lr"] == cfg["train"]["lr"]) == (method != "full fine-tune")
        assert m["train"]["full_core"] == (method == "full fine-tune")
    assert compare.method_recipe(cfg, "dora")["adapter"]["kinds"][0]["use_dora"] is True
