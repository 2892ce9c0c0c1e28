"""Tests for recipes.data: reading, pairing, layouts, datasets, SAM batching and augmentation."""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from samadapt.recipes.data import (
    LAYOUTS,
    FolderDataset,
    collate_batch,
    detect_layout,
    pair_by_stem,
    read_image,
    read_mask,
    resize_longest,
    resolve_layout,
    sam_resize_pad,
    split_names,
)
from samadapt.recipes.data.augment import build_augmentation
from samadapt.recipes.errors import EmptyDatasetError, ImageReadError, UnpairedFilesError
from samadapt.sam_core.transforms import ResizeLongestSide


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# ----------------------------------------------------------------------------- read_image
def test_read_gray_odd_size(tmp_path):
    g = np.arange(7 * 13, dtype=np.uint8).reshape(7, 13)
    im = read_image(_save(tmp_path / "g.png", g))
    assert im.shape == (7, 13, 3) and im.dtype == np.uint8
    assert (im[..., 0] == g).all() and (im[..., 2] == g).all()


def test_read_rgba_composite_and_drop(tmp_path):
    rgba = np.zeros((5, 9, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :4, 3] = 255
    rgba[:, 4:, 3] = 0
    rgba[:, 8, 3] = 128
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    im = read_image(p)
    assert im.shape == (5, 9, 3)
    assert tuple(im[0, 0]) == (200, 100, 50)
    assert tuple(im[0, 5]) == (0, 0, 0)  # transparent -> black
    assert abs(int(im[0, 8, 0]) - 100) <= 1  # half transparent -> half
    dropped = read_image(p, alpha="drop")
    assert tuple(dropped[0, 5]) == (200, 100, 50)


def test_read_gray_alpha(tmp_path):
    la = np.zeros((4, 6, 2), np.uint8)
    la[..., 0] = 90
    la[..., 1] = 255
    la[0, 0, 1] = 0
    p = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(p)
    im = read_image(p)
    assert im.shape == (4, 6, 3)
    assert tuple(im[1, 1]) == (90, 90, 90) and tuple(im[0, 0]) == (0, 0, 0)


def test_read_palette_and_1bit(tmp_path):
    p_img = Image.new("P", (6, 3))
    p_img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    arr = np.zeros((3, 6), np.uint8)
    arr[:, 2:4] = 1
    arr[:, 4:] = 2
    p_img.putdata(arr.ravel().tolist())
    p_img.save(tmp_path / "p.png")
    im = read_image(tmp_path / "p.png")
    assert tuple(im[0, 0]) == (0, 0, 0) and tuple(im[0, 2]) == (255, 0, 0) and tuple(im[0, 5]) == (0, 0, 255)

    b = np.zeros((3, 5), bool)
    b[1, 1] = True
    Image.fromarray(b).save(tmp_path / "b.png")
    im1 = read_image(tmp_path / "b.png")
    assert im1[1, 1, 0] == 255 and im1[0, 0, 0] == 0


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_read_16bit_gray(tmp_path, ext):
    a = np.array([[0, 256, 4096], [65535, 32768, 1000]], np.uint16)
    p = tmp_path / f"g16{ext}"
    assert cv2.imwrite(str(p), a)
    im = read_image(p)
    assert im.dtype == np.uint8 and im.shape == (2, 3, 3)
    assert (im[..., 0] == (a >> 8)).all()
    mx = read_image(p, depth16="max")
    assert mx[1, 0, 0] == 255 and mx[0, 2, 0] == round(4096 * 255 / 65535)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_read_16bit_rgb_channel_order(tmp_path, ext):
    rgb = np.zeros((3, 4, 3), np.uint16)
    rgb[..., 0] = 60000  # R
    rgb[..., 1] = 30000
    rgb[..., 2] = 1000  # B
    p = tmp_path / f"c16{ext}"
    assert cv2.imwrite(str(p), rgb[..., ::-1].copy())  # OpenCV writes BGR
    im = read_image(p)
    assert tuple(im[0, 0]) == (60000 >> 8, 30000 >> 8, 1000 >> 8)
    mx = read_image(p, depth16="max")
    assert tuple(mx[0, 0]) == (255, round(30000 * 255 / 60000), round(1000 * 255 / 60000))


def test_read_float_tiff(tmp_path):
    f = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    p = tmp_path / "f.tif"
    Image.fromarray(f, "F").save(p)
    im = read_image(p)
    assert im[0, 0, 0] == 0 and im[1, 0, 0] == 255 and abs(int(im[0, 1, 0]) - 128) <= 1


def test_read_jpeg_bmp(tmp_path):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 250
    for ext in (".jpg", ".bmp"):
        p = tmp_path / f"x{ext}"
        Image.fromarray(rgb).save(p)
        im = read_image(p)
        assert im.shape == (8, 10, 3) and im[4, 4, 0] > 240 and im[4, 4, 2] < 15


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "broken_file.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="broken_file.png"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="broken_file.png"):
        read_mask(bad)
    good = _save(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(trunc)
    badtif = tmp_path / "bad.tif"
    badtif.write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageReadError, match="bad.tif"):
        read_image(badtif)
    assert issubclass(ImageReadError, ValueError)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="depth16"):
        read_image(good, depth16="x")


# ----------------------------------------------------------------------------- read_mask
def test_read_mask_modes(tmp_path):
    m8 = np.array([[0, 127, 128, 255]], np.uint8)
    assert read_mask(_save(tmp_path / "m8.png", m8)).tolist() == [[False, False, True, True]]

    m16 = np.array([[0, 32767, 32768, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "m16.png"), m16)
    assert read_mask(tmp_path / "m16.png").tolist() == [[False, False, True, True]]

    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, 1, 0] = 200
    rgb[0, 2, 2] = 200
    rgb[0, 3] = 100
    assert read_mask(_save(tmp_path / "rgb.png", rgb)).tolist() == [[False, True, True, False]]

    labels = np.array([[0, 1, 1, 0]], np.uint8)
    assert read_mask(_save(tmp_path / "lab.png", labels)).tolist() == [[False, True, True, False]]

    alpha_only = np.zeros((1, 4, 4), np.uint8)
    alpha_only[0, 2, 3] = 255
    Image.fromarray(alpha_only, "RGBA").save(tmp_path / "alpha.png")
    assert read_mask(tmp_path / "alpha.png").tolist() == [[False, False, True, False]]

    b = np.zeros((2, 3), bool)
    b[0, 1] = True
    Image.fromarray(b).save(tmp_path / "b.png")
    m = read_mask(tmp_path / "b.png")
    assert m.dtype == bool and m.tolist() == [[False, True, False], [False, False, False]]


def test_read_mask_palette_and_jpeg(tmp_path):
    p_img = Image.new("P", (4, 1))
    p_img.putpalette([0, 0, 0, 255, 255, 255] + [0] * (256 * 3 - 6))
    p_img.putdata([0, 1, 1, 0])
    p_img.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png").tolist() == [[False, True, True, False]]

    big = np.zeros((32, 32), np.uint8)
    big[8:24, 8:24] = 255
    Image.fromarray(big).save(tmp_path / "m.jpg", quality=75)
    m = read_mask(tmp_path / "m.jpg")
    assert m.shape == (32, 32) and m[16, 16] and not m[2, 2]
    assert abs(int(m.sum()) - 256) < 40


# ----------------------------------------------------------------------------- pairing
def test_pair_by_stem_suffixes_and_unpaired(tmp_path):
    img, msk = tmp_path / "im", tmp_path / "gt"
    for n in ["a.jpg", "b.JPG", "c.png", "d.tiff", ".hidden.png", "notes.txt"]:
        (img / n).parent.mkdir(exist_ok=True)
        (img / n).write_bytes(b"")
    for n in ["a.png", "b_mask.PNG", "c_gt.png", "zz.png", "a.jpg"]:
        (msk / n).parent.mkdir(exist_ok=True)
        (msk / n).write_bytes(b"")
    pairs, lone_i, lone_m = pair_by_stem(img, msk)
    assert [(i.name, m.name) for i, m in pairs] == [("a.jpg", "a.png"), ("b.JPG", "b_mask.PNG"), ("c.png", "c_gt.png")]
    assert [p.name for p in lone_i] == ["d.tiff"]
    assert sorted(p.name for p in lone_m) == ["a.jpg", "zz.png"]


def test_pair_by_stem_not_by_sorted_position(tmp_path):
    # Sorted order and stem order differ here: a mask suffix sorts after a digit ("a_mask" > "a0"), upper case
    # sorts first ("B.jpg" < "a.jpg" but "b.PNG" > "a..."), and an image without a mask and a mask without an
    # image shift every later position. Pairing by position (zip of the sorted lists) gets each pair wrong.
    img, msk = tmp_path / "images", tmp_path / "masks"
    stems = {"a": "a_mask.png", "a0": "a0.png", "B": "b.PNG"}  # image stem -> its mask file
    for k, (stem, mask_name) in enumerate(sorted(stems.items()), start=1):
        _save(img / f"{stem}.jpg", np.full((6, 8, 3), 40 * k, np.uint8))  # the image says which pair it is...
        m = np.zeros((6, 8), np.uint8)
        m[:k] = 255  # ...and so does its mask: k foreground rows
        _save(msk / mask_name, m)
    _save(img / "a1.jpg", np.zeros((6, 8, 3), np.uint8))  # no mask
    _save(msk / "a1x.png", np.zeros((6, 8), np.uint8))  # no image
    pairs, lone_i, lone_m = pair_by_stem(img, msk)
    assert [(i.name, m.name) for i, m in pairs] == [("B.jpg", "b.PNG"), ("a.jpg", "a_mask.png"), ("a0.jpg", "a0.png")]
    assert [p.name for p in lone_i] == ["a1.jpg"] and [p.name for p in lone_m] == ["a1x.png"]
    with pytest.warns(UserWarning, match="a1.jpg"):
        ds = FolderDataset(tmp_path, split="all")
    for i in range(len(ds)):
        item = ds[i]
        k = int(item["image"][0, 0, 0]) // 40
        assert int(item["mask"].any(axis=1).sum()) == k, f"{item['name']}: image {k} got another pair's mask"


def test_pair_same_folder(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for n in ["x.jpg", "x_mask.png", "y.jpg"]:
        (d / n).write_bytes(b"")
    pairs, lone_i, lone_m = pair_by_stem(d, d)
    assert [(i.name, m.name) for i, m in pairs] == [("x.jpg", "x_mask.png")]
    assert [p.name for p in lone_i] == ["y.jpg"] and lone_m == []


def test_pair_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        pair_by_stem(tmp_path / "missing", tmp_path)


# ----------------------------------------------------------------------------- layouts
def _pair_files(image_dir: Path, mask_dir: Path, stems, img_ext=".png", mask_ext=".png", size=(4, 4)):
    for s in stems:
        _save(image_dir / f"{s}{img_ext}", np.full(size + (3,), 80, np.uint8))
        m = np.zeros(size, np.uint8)
        m[1:3, 1:3] = 255
        _save(mask_dir / f"{s}{mask_ext}", m)


def _make_layout(root: Path, name: str, stems=("s1", "s2")) -> None:
    spec = LAYOUTS[name]
    img_rel, mask_rel = spec.train[0]
    _pair_files(root / img_rel, root / mask_rel, [f"train_{s}" for s in stems])
    if spec.test is not None:
        ti, tm = spec.test[0]
        _pair_files(root / ti, root / tm, [f"test_{s}" for s in stems])


@pytest.mark.parametrize("name", ["generic", "cod10k", "camo", "istd", "sbu", "cvc_clinicdb"])
def test_every_layout_detected(tmp_path, name):
    root = tmp_path / "data"
    _make_layout(root, name)
    assert detect_layout(root) == name
    img_dir, mask_dir = resolve_layout(root, "auto", "train")
    assert img_dir == root / LAYOUTS[name].train[0][0] and mask_dir == root / LAYOUTS[name].train[0][1]
    ds = FolderDataset(root, split="train", val_fraction=0.0 if LAYOUTS[name].test is None else 0.2)
    assert all(n.startswith("train_") for n in (ds[i]["name"] for i in range(len(ds))))
    item = ds[0]
    assert item["image"].shape == (4, 4, 3) and item["image"].dtype == np.uint8
    assert item["mask"].dtype == bool and item["mask"].sum() == 4
    if LAYOUTS[name].test is not None:
        ti, tm = resolve_layout(root, name, "test")
        assert ti == root / LAYOUTS[name].test[0][0] and tm == root / LAYOUTS[name].test[0][1]
        test_ds = FolderDataset(root, split="test")
        assert sorted(test_ds[i]["name"] for i in range(len(test_ds))) == ["test_s1", "test_s2"]
        assert len(FolderDataset(root, split="all")) == 4


def test_test_split_only_download(tmp_path):
    root = tmp_path / "COD10K-test"
    _pair_files(root / "Test" / "Image", root / "Test" / "GT_Object", ["t1", "t2"])
    assert detect_layout(root) == "cod10k"
    assert len(FolderDataset(root, split="test")) == 2
    with pytest.raises(FileNotFoundError, match="Train/Image"):
        FolderDataset(root, split="train")


def test_kvasir_named_and_detected(tmp_path):
    root = tmp_path / "Kvasir-SEG"
    _make_layout(root, "kvasir")
    assert detect_layout(root) == "kvasir"
    assert resolve_layout(root, "kvasir") == (root / "images", root / "masks")


def test_layout_case_insensitive_and_nested(tmp_path):
    root = tmp_path / "COD10K-v3"
    _pair_files(root / "TRAIN" / "image", root / "TRAIN" / "gt_object", ["a"])
    (root / "train").mkdir()  # a decoy with the other spelling
    assert detect_layout(root) == "cod10k"
    outer = tmp_path / "outer"
    _pair_files(outer / "CVC-ClinicDB" / "PNG" / "Original", outer / "CVC-ClinicDB" / "PNG" / "Ground Truth", ["1"])
    assert detect_layout(outer) == "cvc_clinicdb"
    assert resolve_layout(outer)[0].name == "Original"


def test_unknown_layout_lists_what_it_looked_for(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError) as exc:
        resolve_layout(tmp_path)
    msg = str(exc.value)
    for needle in ("Train/Image", "train_A", "ShadowImages", "Ground Truth", "images/ + masks/"):
        assert needle in msg
    with pytest.raises(ValueError, match="valid|unknown"):
        resolve_layout(tmp_path, layout="coco")
    with pytest.raises(FileNotFoundError):
        resolve_layout(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="Train/Image"):
        resolve_layout(tmp_path, layout="cod10k")
    with pytest.raises(ValueError, match="split"):
        resolve_layout(tmp_path, split="holdout")


# ----------------------------------------------------------------------------- FolderDataset
def test_empty_dataset_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(EmptyDatasetError) as exc:
        FolderDataset(tmp_path, split="all")
    assert str(tmp_path / "images") in str(exc.value) and str(tmp_path / "masks") in str(exc.value)


def test_unpaired_images_warn_or_strict(tmp_path):
    _pair_files(tmp_path / "images", tmp_path / "masks", ["a", "b"])
    _save(tmp_path / "images" / "lonely_one.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.warns(UserWarning, match="lonely_one.png"):
        ds = FolderDataset(tmp_path, split="all")
    assert len(ds) == 2 and [p.name for p in ds.unpaired_images] == ["lonely_one.png"]
    with pytest.raises(UnpairedFilesError, match="lonely_one.png"):
        FolderDataset(tmp_path, split="all", strict=True)


def test_only_unpaired_images_is_empty_error(tmp_path):
    _save(tmp_path / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "masks").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(EmptyDatasetError, match="1 images, 0 masks"):
            FolderDataset(tmp_path, split="all")


def test_deterministic_holdout_split(tmp_path):
    _pair_files(tmp_path / "images", tmp_path / "masks", [f"im{i:02d}" for i in range(10)])
    tr = FolderDataset(tmp_path, split="train", val_fraction=0.2, seed=3)
    va = FolderDataset(tmp_path, split="val", val_fraction=0.2, seed=3)
    names_tr = {p[0].stem for p in tr.pairs}
    names_va = {p[0].stem for p in va.pairs}
    assert len(names_va) == 2 and len(names_tr) == 8 and not names_tr & names_va
    assert names_va == {p[0].stem for p in FolderDataset(tmp_path, split="test", val_fraction=0.2, seed=3).pairs}
    other = {p[0].stem for p in FolderDataset(tmp_path, split="val", val_fraction=0.2, seed=4).pairs}
    assert len(other) == 2
    tr2, va2 = split_names([f"im{i:02d}.png" for i in range(10)][::-1], 0.2, seed=3)  # order-independent
    assert {Path(n).stem for n in va2} == names_va
    with pytest.raises(ValueError, match="val_fraction"):
        FolderDataset(tmp_path, val_fraction=1.0)


def test_multi_root_and_transform(tmp_path):
    cod, camo = tmp_path / "cod", tmp_path / "camo"
    _make_layout(cod, "cod10k", stems=("a",))
    _make_layout(camo, "camo", stems=("b", "c"))
    ds = FolderDataset([cod, camo], split="train")
    assert ds.layouts == ["cod10k", "camo"] and len(ds) == 3
    # CAMO's GT/ holds test masks too: they are unpaired masks, not a problem
    assert len(ds.unpaired_masks) == 2

    def flip(image, mask):
        return image[:, ::-1], torch.from_numpy(mask.astype(np.float32))

    ds2 = FolderDataset([cod, camo], layout=["cod10k", "camo"], transform=flip, image_size=8)
    item = ds2[1]
    assert item["image"].shape == (8, 8, 3) and isinstance(item["mask"], torch.Tensor)
    with pytest.raises(ValueError, match="layouts"):
        FolderDataset([cod, camo], layout=["cod10k"])


def test_mask_size_mismatch_is_resized_with_warning(tmp_path):
    _save(tmp_path / "images" / "a.png", np.zeros((6, 8, 3), np.uint8))
    _save(tmp_path / "masks" / "a.png", np.full((3, 4), 255, np.uint8))
    ds = FolderDataset(tmp_path, split="all")
    with pytest.warns(UserWarning, match="resizing"):
        item = ds[0]
    assert item["mask"].shape == (6, 8) and item["mask"].all()


# ----------------------------------------------------------------------------- SAM batching
def test_sam_resize_pad_wide_and_tall():
    img = np.full((50, 100, 3), 200, np.uint8)
    mask = np.zeros((50, 100), bool)
    mask[:, 50:] = True
    out = sam_resize_pad(img, mask, 64)
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
    assert out["input_size"].tolist() == [32, 64] and out["original_size"].tolist() == [50, 100]
    assert out["image"][:, :32].min() == 200 and out["image"][:, 32:].abs().max() == 0
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
    assert out["mask"][0, :32, 32:].all() and not out["mask"][0, :32, :32].any() and not out["mask"][0, 32:].any()
    tall = sam_resize_pad(np.zeros((100, 30, 3), np.uint8), None, 64)
    assert tall["input_size"].tolist() == [64, 19] and "mask" not in tall


def test_sam_items_batch_through_collate(tmp_path):
    # The trainer's path: FolderDataset item -> augmentation -> sam_resize_pad -> collate_batch.
    _pair_files(tmp_path / "images", tmp_path / "masks", ["a", "b", "c"], size=(10, 20))
    base = FolderDataset(tmp_path, split="all")
    aug = build_augmentation("polyp", 32, seed=0)

    def sam_item(i, transform=None):
        item = base[i]
        image, mask = transform(item["image"], item["mask"]) if transform else (item["image"], item["mask"])
        return dict(sam_resize_pad(image, mask, 32), name=item["name"])

    loader = torch.utils.data.DataLoader(range(3), batch_size=3, collate_fn=lambda ix: collate_batch(
        [sam_item(i, aug) for i in ix]))
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 1, 32, 32)
    assert batch["original_size"].shape == (3, 2) and batch["input_size"].shape == (3, 2)
    assert batch["name"] == ["a", "b", "c"]
    b = collate_batch([dict(sam_resize_pad(base[i]["image"], base[i]["mask"], 16), name=base[i]["name"])
                       for i in range(2)])  # raw items resized to 16
    assert b["image"].shape == (2, 3, 16, 16) and b["input_size"].tolist() == [[8, 16], [8, 16]]
    assert b["original_size"].tolist() == [[10, 20], [10, 20]]
    with pytest.raises(ValueError, match="empty batch"):
        collate_batch([])
    with pytest.raises(ValueError, match="cannot stack 'image'"):
        collate_batch([sam_resize_pad(np.zeros((4, 4, 3), np.uint8), None, s) for s in (8, 16)])


@pytest.mark.parametrize("hw", [(7, 9), (33, 77), (101, 3), (5, 1023), (1023, 513), (999, 999), (3, 2), (1, 2001)])
@pytest.mark.parametrize("size", [5, 64, 255])
def test_one_longest_side_rule(hw, size):
    # SAM's rule (ResizeLongestSide) everywhere: resize_longest, sam_resize_pad, FolderDataset and augmentation.
    h, w = hw
    want = tuple(max(1, v) for v in ResizeLongestSide.get_preprocess_shape(h, w, size))
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[: h // 2 + 1] = True
    out_img, out_mask = resize_longest(img, mask, size)
    assert out_img.shape == want + (3,) and out_mask.shape == want and out_mask.dtype == bool
    if min(ResizeLongestSide.get_preprocess_shape(h, w, size)) >= 1:
        assert np.array_equal(out_img, ResizeLongestSide(size).apply_image(img))  # the same filter too
    padded = sam_resize_pad(img, mask, size)
    assert tuple(padded["input_size"].tolist()) == want
    aug_img, aug_mask = build_augmentation("generic", size, train=False)(img, mask)
    assert aug_img.shape[:2] == want and aug_mask.shape == want


@pytest.mark.parametrize("hw", [(33, 77), (120, 41)])
def test_longest_side_points_and_boxes_as_sam_maps_them(hw):
    # The prompt transforms, numpy and torch, against segment_anything's own ResizeLongestSide: points scale
    # per axis into the resized frame (not shift), boxes come back N x 4.
    from segment_anything.utils.transforms import ResizeLongestSide as MetaResize

    ours, meta = ResizeLongestSide(64), MetaResize(64)
    rng = np.random.default_rng(0)
    points = rng.uniform(0, min(hw), (5, 2))
    boxes = np.sort(rng.uniform(0, min(hw), (3, 2, 2)), axis=1).reshape(3, 4)  # three boxes: 12 numbers
    want_p, want_b = meta.apply_coords(points, hw), meta.apply_boxes(boxes, hw)
    np.testing.assert_allclose(ours.apply_coords(points, hw), want_p, rtol=1e-12)
    np.testing.assert_allclose(ours.apply_boxes(boxes, hw), want_b, rtol=1e-12)
    got_p = ours.apply_coords_torch(torch.from_numpy(points), hw)
    got_b = ours.apply_boxes_torch(torch.from_numpy(boxes), hw)
    assert got_p.dtype == got_b.dtype == torch.float32 and got_b.shape == (3, 4)
    np.testing.assert_allclose(got_p.numpy(), want_p, rtol=1e-6)
    np.testing.assert_allclose(got_b.numpy(), want_b, rtol=1e-6)


def test_folder_dataset_image_size_uses_sam_rule(tmp_path):
    _pair_files(tmp_path / "images", tmp_path / "masks", ["a"], size=(33, 77))
    item = FolderDataset(tmp_path, split="all", image_size=64)[0]
    assert item["image"].shape[:2] == ResizeLongestSide.get_preprocess_shape(33, 77, 64) == item["mask"].shape


# ----------------------------------------------------------------------------- augment
@pytest.mark.parametrize("domain", ["camouflage", "shadow", "polyp", "generic", "demo"])
def test_augmentation_deterministic_and_aligned(domain):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True
    img[mask] = 255  # the object is white so alignment can be checked
    a, b = build_augmentation(domain, 48, seed=7), build_augmentation(domain, 48, seed=7)
    for _ in range(4):
        (ia, ma), (ib, mb) = a(img, mask), b(img, mask)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
        assert ia.dtype == np.uint8 and ma.dtype == bool and max(ia.shape[:2]) == 48 and ia.shape[:2] == ma.shape
    ev_img, ev_mask = build_augmentation(domain, 48, train=False)(img, mask)
    assert ev_img.shape == (32, 48, 3) and ev_mask.sum() > 0


def test_shadow_augmentation_keeps_brightness_semantics():
    aug = build_augmentation("shadow", 64, seed=0)
    names = {type(t).__name__ for t in aug.compose.transforms}
    forbidden = {"InvertImg", "Solarize", "ChannelShuffle", "ToGray", "CLAHE", "Equalize", "VerticalFlip"}
    assert not names & forbidden
    img = np.full((64, 64, 3), 180, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    img[mask] = 60
    for _ in range(20):
        out, m = aug(img, mask)
        inside, outside = out[m & (out.sum(2) > 0)], out[~m & (out.sum(2) > 0)]
        if len(inside) and len(outside):
            assert inside.mean() < outside.mean()


def test_augmentation_errors():
    with pytest.raises(ValueError, match="domain"):
        build_augmentation("medical", 64)
    with pytest.raises(ValueError, match="image_size"):
        build_augmentation("polyp", 0)
    aug = build_augmentation("polyp", 16)
    with pytest.raises(ValueError, match="mask shape"):
        aug(np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), bool))


def test_worker_init_fn_reseeds_nested_transform(monkeypatch):
    import pickle
    import types

    import torch.utils.data as tud

    from samadapt.recipes.data.augment import worker_init_fn

    aug = build_augmentation("camouflage", 32, seed=0)
    assert isinstance(pickle.loads(pickle.dumps(aug)), type(aug))  # DataLoader workers may pickle it
    inner = types.SimpleNamespace(transform=aug)
    outer = types.SimpleNamespace(dataset=inner, transform=None)
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[4:12, 4:20] = True
    outs = []
    for worker_seed in (100, 101, 100):
        monkeypatch.setattr(tud, "get_worker_info", lambda s=worker_seed: types.SimpleNamespace(seed=s, dataset=outer))
        worker_init_fn(0)
        outs.append([aug(img, mask)[1] for _ in range(3)])
    same = all(np.array_equal(a, b) for a, b in zip(outs[0], outs[2]))
    differ = any(not np.array_equal(a, b) for a, b in zip(outs[0], outs[1]))
    assert same and differ
