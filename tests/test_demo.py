"""The embedded default: a camouflage adapter on the frozen pretrained tiny core must beat the frozen
core on held-out synthetic camouflage images by a wide margin. A wrong loss sign, a frozen adapter
or an adapter that is never activated would fail this."""
import json

import pytest

from samadapt.recipes.config import load_recipe
from samadapt.recipes.model import TINY_CORE
from samadapt.recipes.train import train

pytestmark = pytest.mark.skipif(not TINY_CORE.is_file(), reason=f"{TINY_CORE} missing")

# recipes/configs/demo.yaml as it is, on 24 held-out images
SHORT = ["data.synthetic_eval_size=24", "eval.samples=2"]


def test_adapter_beats_frozen_core_on_camouflage(tmp_path):
    cfg = load_recipe("demo", SHORT)
    res = train(cfg, out_dir=str(tmp_path / "run"), progress=False, log=lambda *a: None)
    frozen = res["baseline"]["eval"]
    adapted = res["adapted"]["eval"]
    print("frozen", frozen)
    print("adapted", adapted)
    # measured on this machine: S +0.12, E-mean +0.21, weighted F +0.21 (120 steps); an adapter
    # that never trains scores exactly the frozen core (+0.00), and a flipped loss sign drives it below
    assert adapted["s_measure"] - frozen["s_measure"] >= 0.08, (frozen, adapted)
    assert adapted["e_measure_mean"] - frozen["e_measure_mean"] >= 0.15, (frozen, adapted)
    assert adapted["weighted_f"] - frozen["weighted_f"] >= 0.15, (frozen, adapted)
    # the exported file carries the same metrics and the resolved recipe
    from samadapt import adapters
    info = adapters.inspect(tmp_path / "run" / "adapter.safetensors")
    assert info["metrics"]["eval"]["s_measure"] == pytest.approx(adapted["s_measure"])
    assert "camouflage" in info["recipe"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["baseline"]["eval"] == frozen


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
    for i in range(24):
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
    # measured with the committed core: box 0.825, click 0.756 (best of 3: 0.764), others taken 0.118; the
    # previous core, trained on union masks, fails this (on 60 other scenes a click took 0.92-0.97 of the
    # other objects, and its best of 3 scored 0.14)
    assert np.mean(box_iou) >= 0.7 and np.mean(click_iou) >= 0.6 and np.mean(click_mm_iou) >= 0.6
    assert np.mean(taken) <= 0.3
