"""`samadapt demo`'s claims on the committed tiny core: on held-out synthetic camouflage images (1-3
objects of several sizes, anywhere) the adapted core beats the frozen core, the fixed prior (the mean
training mask) and the decoder fine-tuned alone, and its masks follow the objects. A wrong loss sign,
a frozen adapter, an adapter never activated, or one that learnt where objects tend to be instead of
how to find them fails these bounds."""
import numpy as np
import pytest

from samadapt.recipes.config import load_recipe
from samadapt.recipes.model import TINY_CORE

pytestmark = pytest.mark.skipif(not TINY_CORE.is_file(), reason=f"{TINY_CORE} missing")

PRIOR_MARGIN = 0.15  # adapted S - fixed prior S
MIN_IOU = 0.6  # adapted mean IoU
FOLLOW = 0.15  # |adapted pairwise IoU - ground truth pairwise IoU|


def demo(tmp_path, overrides=()):
    from samadapt.recipes.demo import demo_rows, follow_limit

    cfg = load_recipe("demo", list(overrides))
    rows = demo_rows(cfg, tmp_path / "run")
    summary = {k: dict(r["metrics"], follow=r["follow"]) for k, r in rows.items()}
    print(overrides, {k: {m: round(v, 3) for m, v in r.items()} for k, r in summary.items()},
          "gt follow", round(follow_limit(rows), 3))
    return cfg, rows, summary


def check_bounds(rows, summary):
    from samadapt.recipes.demo import follow_limit

    a, prior = summary["adapted"], summary["prior"]
    assert a["s_measure"] - prior["s_measure"] >= PRIOR_MARGIN, summary
    assert a["iou"] >= MIN_IOU, summary
    assert abs(a["follow"] - follow_limit(rows)) <= FOLLOW, (summary, follow_limit(rows))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    return demo(tmp_path_factory.mktemp("demo"))


def test_demo_bounds(demo_run, tmp_path):
    """The demo's printed bounds, on the recipe as it ships (the README quotes a run of it)."""
    cfg, rows, summary = demo_run
    check_bounds(rows, summary)
    # the baselines are what they claim: the frozen core finds nothing promptless, the prior is one
    # map for every image, and the decoder alone does not get there
    assert summary["frozen"]["iou"] < 0.1 and summary["prior"]["follow"] == 1.0
    assert summary["adapted"]["s_measure"] > summary["decoder-only"]["s_measure"] + 0.1, summary
    assert rows["adapted"]["params"] > rows["decoder-only"]["params"] > 0


def test_demo_exports_what_it_scored(demo_run):
    """The adapter file carries the run's own metrics and recipe, and loading it on a fresh core
    gives back the probability maps the demo scored."""
    from samadapt import adapters
    from samadapt.recipes.compare import predict_eval
    from samadapt.recipes.data.pipeline import build_datasets
    from samadapt.sam_core import load_sam

    cfg, rows, summary = demo_run
    path = rows["adapted"]["file"]
    info = adapters.inspect(path)
    assert "camouflage" in info["recipe"] and info["metrics"]["eval"]["iou"] == pytest.approx(
        summary["adapted"]["iou"], abs=0.02)
    sam = load_sam(TINY_CORE)
    name = adapters.load(sam, path)
    _, eval_ds = build_datasets(cfg, sam.image_size)
    again = predict_eval(sam, eval_ds, cfg, name)
    assert max(float(np.abs(x - y).max()) for x, y in zip(again, rows["adapted"]["probs"])) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_demo_bounds_hold_for_other_seeds(tmp_path, seed):
    """Not on a knife edge: other seeds (other training and held-out images, other initialisation of
    the adapter) meet the same bounds."""
    _, rows, summary = demo(tmp_path, [f"train.seed={seed}"])
    check_bounds(rows, summary)


@pytest.mark.slow
@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_demo_beats_the_prior_at_half_and_double_the_learning_rate(tmp_path, factor):
    """The demo's adapter at half and double its learning rate (the decoder-only row is not trained)."""
    from samadapt.recipes.compare import run_method

    cfg = load_recipe("demo", [f"train.lr={load_recipe('demo')['train']['lr'] * factor}"])
    prior = run_method(cfg, "prior", tmp_path)["metrics"]
    adapted = run_method(cfg, "adapted", tmp_path / "run")["metrics"]
    print(factor, "prior", prior, "adapted", adapted)
    assert adapted["s_measure"] > prior["s_measure"] + 0.05, (prior, adapted)
    assert adapted["iou"] > prior["iou"] + 0.2, (prior, adapted)


@pytest.mark.slow
def test_demo_is_reproducible(demo_run, tmp_path):
    """A second run on the same machine gives the same numbers as the module's first."""
    _, _, first = demo_run
    _, _, second = demo(tmp_path)
    for row in first:
        for m, v in first[row].items():
            assert second[row][m] == pytest.approx(v, abs=1e-6), (row, m)


def test_pretrained_tiny_core_follows_prompts():
    """The committed tiny core segments the object a prompt points at, not the whole scene: on
    held-out synthetic `objects` scenes (1-3 objects; the mask is one of them) a box or one click
    on the object selects it and leaves the other objects out."""
    import numpy as np
    import torch
    from scipy import ndimage

    from samadapt.recipes.data.synthetic import _generic, make_sample
    from samadapt.sam_core import SamPredictor, load_sam

    torch.manual_seed(0)
    pred = SamPredictor(load_sam(TINY_CORE))
    box_iou, click_iou, click_mm_iou, taken = [], [], [], []
    for i in range(48):
        img, m = make_sample("objects", np.random.default_rng([4242, i]), 256)
        _, union = _generic(np.random.default_rng([4242, i]), 256)  # the same scene's objects, all of them
        others = union & ~m
        pred.set_image(img)
        ys, xs = np.nonzero(m)
        masks, _, _ = pred.predict(
            box=np.array([xs.min(), ys.min(), xs.max(), ys.max()], float), multimask_output=False
        )
        box_iou.append((masks[0] & m).sum() / (masks[0] | m).sum())
        y, x = np.unravel_index(ndimage.distance_transform_edt(m).argmax(), m.shape)  # the object's innermost pixel
        click = dict(point_coords=np.array([[x, y]], float), point_labels=np.array([1]))
        masks, _, _ = pred.predict(multimask_output=False, **click)
        click_iou.append((masks[0] & m).sum() / (masks[0] | m).sum())
        if others.sum() > 200:
            taken.append((masks[0] & others).sum() / others.sum())
        masks, scores, _ = pred.predict(multimask_output=True, **click)
        best = masks[scores.argmax()]
        click_mm_iou.append((best & m).sum() / (best | m).sum())
    print(
        f"box IoU {np.mean(box_iou):.3f}, click IoU {np.mean(click_iou):.3f} (best-scored of 3: "
        f"{np.mean(click_mm_iou):.3f}), share of the other objects a click takes {np.mean(taken):.3f} (n={len(taken)})"
    )
    # measured with the committed core (48 scenes): box 0.821, click 0.800 (best of 3: 0.823), others taken
    # 0.025; a core trained on union masks fails this (a click took 0.92-0.97 of the other objects, and
    # its best of 3 scored 0.14)
    assert np.mean(box_iou) >= 0.78 and np.mean(click_iou) >= 0.75 and np.mean(click_mm_iou) >= 0.75
    assert np.mean(taken) <= 0.1
