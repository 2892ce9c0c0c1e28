"""`samadapt predict` outputs for annotators: EXIF orientation, --multimask + masks.json, COCO through
pycocotools, segment_anything's mask records in Python / CLI JSON / HTTP, the --auto warning, overlays."""
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from samadapt.recipes.cli import main
from samadapt.recipes.coco import SAM_KEYS, decode_rle
from samadapt.recipes.data import read_image
from samadapt.recipes.model import load_base
from samadapt.sam_core import SamAutomaticMaskGenerator

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def scene(h=90, w=120, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    a[15:55, 25:70] = (220, 40, 40)  # a red object
    a[50:80, 80:110] = (40, 200, 60)
    return a


def exif_jpeg(path, arr, orientation):
    im = Image.fromarray(arr)
    ex = im.getexif()
    ex[0x0112] = orientation
    im.save(path, exif=ex.tobytes(), quality=95)
    return path


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_by_the_image_reader(tmp_path, orientation):
    f = exif_jpeg(tmp_path / "phone.jpg", scene(), orientation)
    with Image.open(f) as im:
        stored = np.asarray(im.convert("RGB"))
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert stored.shape != shown.shape or orientation == 3  # precondition: the tag changes what a viewer shows
    assert np.array_equal(read_image(f), shown)


def test_predict_masks_match_what_a_viewer_shows(tmp_path):
    """A 120x90 JPEG stored sideways (orientation 6): the mask is 90x120 like the picture shown, and equals
    the mask of the already-turned image."""
    f = exif_jpeg(tmp_path / "phone.jpg", scene(), 6)
    with Image.open(f) as im:
        shown = ImageOps.exif_transpose(im).convert("RGB")
    shown.save(tmp_path / "turned.png")
    box = "10,20,80,70"
    assert main(["predict", str(f), str(tmp_path / "turned.png"), "--out", str(tmp_path / "o"), "--box", box]) == 0
    got = np.asarray(Image.open(tmp_path / "o" / "phone.png"))
    assert got.shape == (shown.height, shown.width) == (120, 90)
    turned = np.asarray(Image.open(tmp_path / "o" / "turned.png"))
    assert np.mean(got == turned) > 0.99  # the same pixels, up to JPEG noise


def test_multimask_writes_three_candidates_and_masks_json(tmp_path):
    Image.fromarray(scene()).save(tmp_path / "a.png")
    out = tmp_path / "o"
    assert main(["predict", str(tmp_path / "a.png"), "--out", str(out), "--point", "45,35", "--multimask"]) == 0
    recs = json.loads((out / "masks.json").read_text())
    assert [r["candidate"] for r in recs] == [0, 1, 2]
    assert [r["file"] for r in recs] == ["a_0.png", "a_1.png", "a_2.png"]
    from samadapt.sam_core import SamPredictor

    pred = SamPredictor(load_base())
    pred.set_image(scene())
    masks, scores, _ = pred.predict(point_coords=np.array([[45.0, 35.0]]), point_labels=np.array([1]))
    for k, r in enumerate(recs):
        assert set(SAM_KEYS) <= set(r)
        png = np.asarray(Image.open(out / r["file"])) > 0
        assert np.array_equal(png, masks[k]) and np.array_equal(decode_rle(r["segmentation"]), png)
        assert r["predicted_iou"] == pytest.approx(float(scores[k]), abs=1e-6)
        assert r["area"] == int(png.sum()) and r["point_coords"] == [[45.0, 35.0]]
        if png.any():
            ys, xs = np.nonzero(png)
            assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_coco_round_trip_through_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    for i, seed in enumerate((0, 1)):
        Image.fromarray(scene(90 + 10 * i, 120, seed)).save(tmp_path / f"img{i}.png")
    prompts = {"img0.png": {"boxes": [[20, 10, 75, 60], [75, 45, 115, 85]]}, "img1.png": {"box": [20, 10, 75, 60]}}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    out = tmp_path / "o"
    assert main(["predict", str(tmp_path / "img0.png"), str(tmp_path / "img1.png"), "--out", str(out),
                 "--prompts", str(tmp_path / "p.json"), "--format", "both"]) == 0
    coco = COCO(str(out / "coco.json"))
    imgs = {im["file_name"]: im for im in coco.dataset["images"]}
    assert imgs["img0.png"]["width"] == 120 and imgs["img0.png"]["height"] == 90 and imgs["img1.png"]["height"] == 100
    assert coco.dataset["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    files = {"img0.png": ["img0_0.png", "img0_1.png"], "img1.png": ["img1.png"]}
    for name, pngs in files.items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[imgs[name]["id"]]))
        assert len(anns) == len(pngs)
        for ann, png in zip(anns, pngs):
            want = np.asarray(Image.open(out / png)) > 0
            assert np.array_equal(coco.annToMask(ann).astype(bool), want)
            assert ann["area"] == int(want.sum()) and ann["iscrowd"] == 0 and 0 <= ann["score"] <= 1.5
    # --format coco alone: the same file, no mask PNGs
    out2 = tmp_path / "o2"
    assert main(["predict", str(tmp_path / "img0.png"), "--out", str(out2), "--box", "20,10,75,60",
                 "--format", "coco"]) == 0
    assert sorted(os.listdir(out2)) == ["coco.json", "img0_overlay.png", "masks.json"]
    assert len(COCO(str(out2 / "coco.json")).dataset["annotations"]) == 1


def test_coco_categories_come_from_the_adapter(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from samadapt import adapters

    sam = load_base()
    adapters.attach(sam, adapters.config("lora", r=2), name="org")
    f = adapters.save(sam, tmp_path / "org.safetensors", name="org", domain="organs")
    with safe_open(str(f), "pt") as h:
        meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    Image.fromarray(scene()).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--adapter", str(f), "--out", str(tmp_path / "o"),
                 "--format", "coco"]) == 0
    cats = json.loads((tmp_path / "o" / "coco.json").read_text())["categories"]
    assert [c["name"] for c in cats] == ["organs"]  # no classes: the domain
    # a multi-class file: its classes are the categories
    multi = {**meta, "classes": json.dumps(["liver", "kidney"])}
    save_file(tensors, str(tmp_path / "multi.safetensors"), metadata=multi)
    assert main(["predict", str(tmp_path / "a.png"), "--adapter", str(tmp_path / "multi.safetensors"), "--out",
                 str(tmp_path / "o2"), "--format", "coco"]) == 0
    cats = json.loads((tmp_path / "o2" / "coco.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in cats] == [(1, "liver"), (2, "kidney")]


def auto_args(tmp_path, *extra):
    Image.fromarray(scene()).save(tmp_path / "a.png")
    return ["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--auto", "--points-per-side", "6",
            *extra]


def test_auto_records_are_segment_anythings_in_python_cli_and_http(tmp_path):
    from fastapi.testclient import TestClient

    from samadapt.recipes.serve import create_app

    th = dict(pred_iou_thresh=0.05, stability_score_thresh=0.3)
    assert main(auto_args(tmp_path, "--pred-iou-thresh", "0.05", "--stability-score-thresh", "0.3")) == 0
    cli = json.loads((tmp_path / "o" / "a_auto.json").read_text())
    sam = load_base()
    py = SamAutomaticMaskGenerator(sam, points_per_side=6, **th).generate(scene())
    assert len(py) == len(cli) > 0  # precondition: the thresholds let masks through
    py = sorted(py, key=lambda m: -m["area"])
    for c, p in zip(cli, py):
        assert list(c) == list(p) == list(SAM_KEYS)
        assert np.array_equal(decode_rle(c["segmentation"]), p["segmentation"])
        assert c["bbox"] == [float(v) for v in p["bbox"]] and c["area"] == p["area"]
        assert c["predicted_iou"] == pytest.approx(p["predicted_iou"]) and c["crop_box"] == list(p["crop_box"])
    label = np.asarray(Image.open(tmp_path / "o" / "a_auto.png"))
    assert label.max() == len(cli)
    d = tmp_path / "ad"
    d.mkdir()
    with TestClient(create_app(sam, d), base_url="http://localhost") as client:
        buf = __import__("io").BytesIO()
        Image.fromarray(scene()).save(buf, format="PNG")
        iid = client.post("/api/images", files={"file": ("a.png", buf.getvalue(), "image/png")}).json()["image_id"]
        for mode in ("uncompressed_rle", "coco_rle"):
            r = client.post("/api/auto", json={"image_id": iid, "points_per_side": 6, "output_mode": mode, **th})
            assert r.status_code == 200, r.text
            http = sorted(r.json()["masks"], key=lambda m: -m["area"])
            assert len(http) == len(py)
            for h, p in zip(http, py):
                assert sorted(h) == sorted(SAM_KEYS)
                assert isinstance(h["segmentation"]["counts"], list if mode == "uncompressed_rle" else str)
                assert np.array_equal(decode_rle(h["segmentation"]), p["segmentation"])
                assert h["area"] == p["area"] and h["bbox"] == [float(v) for v in p["bbox"]]


def test_auto_warns_when_nothing_passes_naming_the_threshold(tmp_path, capsys):
    assert main(auto_args(tmp_path)) == 0  # the defaults (0.88 / 0.95) pass nothing on the tiny core here
    err = capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "a_auto.json").read_text()) == []
    line = [ln for ln in err.splitlines() if ln.startswith("warning:") and "0 masks passed" in ln]
    assert len(line) == 1 and "--pred-iou-thresh" in line[0] and "lower it, e.g. --pred-iou-thresh" in line[0], err
    suggested = float(line[0].rsplit(" ", 1)[1])
    assert main(auto_args(tmp_path, "--pred-iou-thresh", str(suggested))) == 0  # the suggestion lets masks through
    err = capsys.readouterr().err
    assert "0 masks passed" not in err or "--stability-score-thresh" in err
    assert main(auto_args(tmp_path, "--pred-iou-thresh", "1.5")) == 2
    assert "--pred-iou-thresh 1.5: use a number from 0 to 1" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "a.png"), "--out", str(tmp_path / "x"), "--box-nms-thresh", "0.5"]) == 2
    assert "are --auto settings" in capsys.readouterr().err


def test_overlay_outlines_each_object_in_its_colour(tmp_path):
    """A red object under a red mask: the fill alone barely shows it, the opaque outline does."""
    from samadapt.recipes.predict import PALETTE, _overlay

    img = np.full((60, 80, 3), 30, np.uint8)
    img[10:40, 10:40] = PALETTE[0]
    masks = [np.zeros((60, 80), bool), np.zeros((60, 80), bool)]
    masks[0][10:40, 10:40] = True
    masks[1][20:50, 50:75] = True
    out = _overlay(img, masks)
    c0, c1 = PALETTE[0].astype(np.uint8), PALETTE[1].astype(np.uint8)
    assert (out[10, 10:40] == c0).all() and (out[39, 10:40] == c0).all()  # the outline, on the boundary
    assert (out[20, 50:75] == c1).all()  # the second object in the second colour
    inner = out[25, 60].astype(int)
    assert not (inner == c1).all() and abs(inner - (0.5 * 30 + 0.5 * c1)).max() <= 1  # translucent fill inside
    assert (out[55, 5] == 30).all()  # untouched outside
