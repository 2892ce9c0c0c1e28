"""Tests for recipes.data.synthetic."""
from __future__ import annotations

import time

import numpy as np
import pytest

from samadapt.recipes.data import FolderDataset, read_image, read_mask
from samadapt.recipes.data.synthetic import SYNTHETIC_DOMAINS, SyntheticDataset, make_sample, write_synthetic_folder


def _colour_gap(image: np.ndarray, mask: np.ndarray) -> float:
    """Euclidean distance between the mean RGB inside and outside the mask."""
    img = image.astype(np.float64)
    return float(np.linalg.norm(img[mask].mean(0) - img[~mask].mean(0)))


@pytest.mark.parametrize("domain", SYNTHETIC_DOMAINS)
def test_shapes_dtypes_nonempty(domain):
    for i in range(12):
        img, mask = make_sample(domain, np.random.default_rng(i), 64)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == bool
        assert mask.any() and not mask.all()
    for size in (16, 33, 100):
        img, mask = make_sample(domain, np.random.default_rng(0), size)
        assert img.shape == (size, size, 3) and mask.shape == (size, size) and mask.any()


@pytest.mark.parametrize("domain", SYNTHETIC_DOMAINS)
def test_deterministic_from_seed_and_index(domain):
    a = SyntheticDataset(domain, size=5, image_size=48, seed=11)
    b = SyntheticDataset(domain, size=5, image_size=48, seed=11)
    for i in (4, 0, 2):  # access order does not matter
        x, y = a[i], b[i]
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["mask"], y["mask"])
        assert x["name"] == f"{domain}_{i:06d}"
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    c = SyntheticDataset(domain, size=5, image_size=48, seed=12)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    i1, m1 = make_sample(domain, np.random.default_rng(5), 40)
    i2, m2 = make_sample(domain, np.random.default_rng(5), 40)
    assert np.array_equal(i1, i2) and np.array_equal(m1, m2)


def test_camouflage_colour_statistics_match_background():
    n = 20
    camo = [_colour_gap(*make_sample("camouflage", np.random.default_rng(i), 128)) for i in range(n)]
    generic = [_colour_gap(*make_sample("generic", np.random.default_rng(i), 128)) for i in range(n)]
    assert np.mean(camo) < 0.2 * np.mean(generic)
    assert np.mean(camo) < 15.0 and max(camo) < 30.0
    # ... but the object is not identical to the background: its texture differs
    img, mask = make_sample("camouflage", np.random.default_rng(0), 128)
    assert img[mask].std() > 5


def test_shadow_is_darker_and_bluer():
    for i in range(10):
        img, mask = make_sample("shadow", np.random.default_rng(i), 96)
        f = img.astype(np.float64)
        inside, outside = f[mask].mean(0), f[~mask].mean(0)
        assert inside.sum() < outside.sum()
        # blue keeps more of its value than red in a shadow
        assert inside[2] / max(outside[2], 1) > inside[0] / max(outside[0], 1)


def test_polyp_is_reddish():
    img, mask = make_sample("polyp", np.random.default_rng(3), 96)
    tissue = img[~mask].astype(np.float64).mean(0)
    assert tissue[0] > tissue[1] and tissue[0] > tissue[2]


def test_fast_enough():
    for d in SYNTHETIC_DOMAINS:  # warm-up
        make_sample(d, np.random.default_rng(0), 256)
    t = time.process_time()
    reps = 5
    for d in SYNTHETIC_DOMAINS:
        for i in range(reps):
            make_sample(d, np.random.default_rng(i), 256)
    per_sample_ms = (time.process_time() - t) / (reps * len(SYNTHETIC_DOMAINS)) * 1000
    assert per_sample_ms < 60  # ~3-7 ms on a laptop core; generous for loaded CI machines


def test_dataset_transform_and_errors():
    ds = SyntheticDataset("polyp", size=3, image_size=32, transform=lambda im, m: (im[::2, ::2], m[::2, ::2]))
    item = ds[-1]
    assert item["image"].shape == (16, 16, 3) and item["name"] == "polyp_000002"
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="unknown"):
        SyntheticDataset("xray")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticDataset("polyp", image_size=8)
    with pytest.raises(ValueError, match="size"):
        SyntheticDataset("polyp", size=0)
    with pytest.raises(ValueError, match="Generator"):
        make_sample("polyp", 3, 32)
    assert SyntheticDataset("demo", size=1, image_size=32).domain == "generic"


def test_write_folder_roundtrip(tmp_path):
    root = write_synthetic_folder("shadow", tmp_path / "syn", n=3, image_size=40, seed=2)
    ds = FolderDataset(root, split="all")
    ref = SyntheticDataset("shadow", size=3, image_size=40, seed=2)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["name"] == f"shadow_{i:06d}"
        assert np.array_equal(item["image"], ref[i]["image"]) and np.array_equal(item["mask"], ref[i]["mask"])
    assert read_mask(root / "masks" / "shadow_000000.png").any()
    assert read_image(root / "images" / "shadow_000000.png").shape == (40, 40, 3)
    with pytest.raises(ValueError, match="n="):
        write_synthetic_folder("shadow", tmp_path / "x", n=0)
