"""Medical volumes: reading (NIfTI, DICOM series, 16-bit slices), orientation round trips, intensity, the
nnU-Net/MSD and pair layouts, slice sampling, the volume metrics against medpy and MONAI, and bad input.

Training on phantoms, prompts under the organs adapter and the CLI are in tests/test_organs.py.
"""
import json
import random

import numpy as np
import pytest

nib = pytest.importorskip("nibabel", reason="volume tests need nibabel (pip install -e '.[test]')")

from samadapt.recipes import metrics  # noqa: E402
from samadapt.recipes.cli import main  # noqa: E402
from samadapt.recipes.data import medical, volumes  # noqa: E402
from samadapt.recipes.data.volumes import VolumeError  # noqa: E402


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# ----------------------------------------------------------------------------- NIfTI orientation
def test_nifti_round_trip_with_flipped_affine_lands_in_the_input_frame(tmp_path):
    # stored L->R (x flipped), P->A... and with the axes permuted: file axis 0 is z, 1 is x, 2 is y
    rng = np.random.default_rng(0)
    data = rng.integers(-100, 100, size=(5, 7, 6)).astype(np.int16)
    affine = np.array([[0, -0.8, 0, 10], [0, 0, 0.7, -5], [3.0, 0, 0, 2], [0, 0, 0, 1]], float)
    src = _save(tmp_path / "scan.nii.gz", data, affine)
    vol = volumes.read_nifti(src)
    # canonical: axes x, y, z increasing along +R... i.e. the canonical affine is diagonal with positive steps
    assert vol.data.shape == (7, 6, 5)
    assert np.allclose(np.abs(vol.affine[:3, :3]), np.diag([0.8, 0.7, 3.0]))
    assert (np.diag(vol.affine[:3, :3]) > 0).all()
    assert vol.spacing == (0.8, 0.7, 3.0)
    # every voxel keeps its world position: canonical voxel -> world equals the file's voxel -> world
    i, j, k = 2, 3, 1
    world = vol.affine @ [i, j, k, 1]
    file_ijk = np.linalg.solve(affine, world).round().astype(int)[:3]
    assert vol.data[i, j, k] == data[tuple(file_ijk)]
    # a label map made on the canonical grid goes back into the file's frame, shape, affine and header
    label = (vol.data > 0).astype(np.uint8)
    out = volumes.save_like(label, vol, tmp_path / "out" / "scan_seg.nii.gz")
    back = nib.load(str(out))
    assert back.shape == data.shape
    assert np.allclose(back.affine, affine)
    assert np.array_equal(np.asanyarray(back.dataobj), (data > 0).astype(np.uint8))
    assert back.header.get_data_dtype() == np.uint8
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["scan_seg.nii.gz"]  # no temporary left


def test_a_4d_image_is_one_clear_error(tmp_path):
    src = _save(tmp_path / "cine.nii.gz", np.zeros((4, 4, 3, 2), np.float32), np.eye(4))
    with pytest.raises(VolumeError, match=r"4-D image of shape \(4, 4, 3, 2\).*one 3-D file each"):
        volumes.read_nifti(src)
    one = _save(tmp_path / "one.nii.gz", np.zeros((4, 4, 3, 1), np.float32), np.eye(4))
    assert volumes.read_nifti(one).data.shape == (4, 4, 3)  # a single volume in a 4-D file is fine


def test_label_checks(tmp_path):
    img = volumes.read_nifti(_save(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.int16), np.diag([1, 1, 2, 1.0])))
    bad_shape = _save(tmp_path / "s.nii.gz", np.zeros((4, 5, 7), np.uint8), np.diag([1, 1, 2, 1.0]))
    with pytest.raises(VolumeError, match=r"label shape \(4, 5, 7\) differs from its image's \(4, 5, 6\)"):
        volumes.read_label(bad_shape, like=img)
    bad_aff = _save(tmp_path / "f.nii.gz", np.zeros((4, 5, 6), np.uint8), np.diag([1, 1, 3, 1.0]))
    with pytest.raises(VolumeError, match="label affine differs"):
        volumes.read_label(bad_aff, like=img)
    fl = np.zeros((4, 5, 6), np.float32)
    fl[1, 1, 1] = 0.5
    with pytest.raises(VolumeError, match=r"float values such as 0.5"):
        volumes.read_label(_save(tmp_path / "fl.nii.gz", fl, np.diag([1, 1, 2, 1.0])), like=img)
    whole = np.zeros((4, 5, 6), np.float32)
    whole[0, 0, 0] = 2.0  # a float file holding whole numbers is a label map
    lab = volumes.read_label(_save(tmp_path / "w.nii.gz", whole, np.diag([1, 1, 2, 1.0])), like=img, allowed=[0, 2])
    assert lab.data.dtype == np.int16 and lab.data.max() == 2
    with pytest.raises(VolumeError, match=r"label values \[2\] are not in dataset.json's labels \[0, 1\]"):
        volumes.read_label(tmp_path / "w.nii.gz", like=img, allowed=[0, 1])


# ----------------------------------------------------------------------------- DICOM
def _write_series(folder, uid, hu, spacing=(0.7, 0.7, 2.5), slope=2.0, intercept=-1024.0, names=None, origin_z=-40.0):
    """A synthetic CT series: one file per slice, pixel = (HU - intercept) / slope, LPS geometry."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rows, cols, n = hu.shape[1], hu.shape[0], hu.shape[2]  # hu indexed (column i, row j, slice k)
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = names[k] if names else f"{uid[-6:]}_{k}.dcm"
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID = uid
        ds.StudyInstanceUID = "1.2.3"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing, column spacing
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, -20.0, origin_z + k * spacing[2]]
        ds.SliceThickness = spacing[2]
        ds.InstanceNumber = n - k  # deliberately not the spatial order
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        stored = np.round((hu[:, :, k].T - intercept) / slope).astype(np.uint16)  # rows x columns
        ds.PixelData = stored.tobytes()
        ds.save_as(str(folder / name), enforce_file_format=True)
        paths.append(folder / name)
    return paths


def test_dicom_series_read_sorted_rescaled_and_split_by_series(tmp_path):
    rng = np.random.default_rng(1)
    hu_a = (rng.integers(-500, 500, size=(6, 5, 4)) * 2).astype(np.float32)  # even: exact after slope 2
    hu_b = np.full((3, 3, 2), 40.0, np.float32)
    folder = tmp_path / "study"
    folder.mkdir()
    names = [f"IM{n:04d}" for n in random.Random(0).sample(range(100), 4)]  # shuffled, no .dcm suffix
    _write_series(folder, "1.2.3.4.1", hu_a, names=names)
    _write_series(folder, "1.2.3.4.2", hu_b)
    assert volumes.is_dicom_dir(folder)
    listed = r"holds 2 DICOM series \(1\.2\.3\.4\.1 \(4 files\), 1\.2\.3\.4\.2 \(2 files\)\)"
    with pytest.raises(VolumeError, match=listed):
        volumes.read_dicom_series(folder)
    vol = volumes.read_dicom_series(folder, series_uid="1.2.3.4.1")
    # LPS -> RAS: x and y flip, so the canonical array is the series mirrored in-plane, z kept (sorted by position)
    assert vol.data.shape == (6, 5, 4)
    assert np.array_equal(vol.data, hu_a[::-1, ::-1, :])
    assert vol.spacing == (0.7, 0.7, 2.5)
    assert vol.meta["modality"] == "CT"
    # the world position of voxel (0, 0, 0) of the series is its first slice's ImagePositionPatient (LPS -> RAS)
    ras0 = np.array([10.0, 20.0, -40.0])
    canon_index = np.linalg.solve(vol.affine, [*ras0, 1])[:3].round().astype(int)
    assert tuple(canon_index) == (5, 4, 0)


def test_predict_refuses_a_folder_mixing_series(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_series(folder, "9.1", np.zeros((4, 4, 2), np.float32))
    _write_series(folder, "9.2", np.zeros((4, 4, 2), np.float32))
    adapter = tmp_path / "a.safetensors"
    _organ_adapter(adapter)
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--adapter", str(adapter), "--out", str(out)]) == 2
    assert not out.exists()


def _organ_adapter(path, names=("background", "liver", "spleen")):
    from samadapt import adapters
    from samadapt.recipes.model import load_base

    sam = load_base(image_size=64)
    adapters.attach(sam, adapters.config("classes", names=list(names)), name="org", decoder="full")
    adapters.save(sam, path, name="org", domain="organs")
    return path


def test_16bit_slices_keep_their_depth(tmp_path):
    import cv2

    planes = [np.full((3, 4), 1000 * i + 40000, np.uint16) for i in range(3)]
    paths = []
    for i, p in enumerate(planes):
        path = tmp_path / f"s{i}.{'png' if i % 2 else 'tif'}"
        assert cv2.imwrite(str(path), p)
        paths.append(path)
    vol = volumes.read_slice_stack(paths, spacing=(0.5, 0.5, 2.0))
    assert vol.data.dtype == np.uint16 and vol.data.shape == (4, 3, 3)
    assert vol.data[..., 2].max() == 42000 and vol.spacing == (0.5, 0.5, 2.0)
    rgb = tmp_path / "rgb.png"
    cv2.imwrite(str(rgb), np.zeros((3, 4, 3), np.uint8))
    with pytest.raises(VolumeError, match="3-channel image; slices must be grayscale"):
        volumes.read_slice_stack([rgb])


# ----------------------------------------------------------------------------- intensity
def test_ct_windows_mr_percentiles_and_channels():
    hu = np.array([-2000.0, -160.0, 40.0, 240.0, 3000.0])
    assert medical.ct_window(hu, "abdomen").tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert np.allclose(medical.ct_window(hu, level=40, width=400), medical.ct_window(hu, "abdomen"))
    for name, (level, width) in medical.CT_WINDOWS.items():
        assert medical.ct_window(np.array([level]), name)[0] == pytest.approx(0.5)
        assert medical.ct_window(np.array([level + width / 2]), name)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not one of"):
        medical.ct_window(hu, "pelvis")
    mr = np.random.default_rng(0).gamma(2.0, 100.0, size=(20, 20, 5))
    out = medical.normalise(mr, "MR")  # auto: percentiles for MR
    lo, hi = np.percentile(mr, [0.5, 99.5])
    assert out.min() == 0 and out.max() == 1
    assert np.allclose(out, np.clip((mr - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert np.allclose(medical.normalise(hu, "CT"), medical.ct_window(hu, "abdomen"))  # auto: the window for CT
    vol = np.stack([np.full((2, 3), v) for v in (0.0, 0.5, 1.0)], axis=-1)
    assert medical.slice_channels(vol, 2, "2.5d")[0, 0].tolist() == [127, 255, 255]
    assert medical.slice_channels(vol, 1, "repeat").shape == (3, 2, 3)  # rows = the second axis


# ----------------------------------------------------------------------------- layouts
def _nnunet(tmp_path, labels, suffix="_0000", n=2, label_value=1):
    root = tmp_path / "Dataset001_Test"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        lab = np.zeros((8, 8, 4), np.uint8)
        lab[2:5, 2:5, 1:3] = label_value
        _save(root / "imagesTr" / f"c{i}{suffix}.nii.gz", np.zeros((8, 8, 4), np.int16), np.eye(4))
        _save(root / "labelsTr" / f"c{i}.nii.gz", lab, np.eye(4))
    _save(root / "imagesTs" / f"t0{suffix}.nii.gz", np.zeros((8, 8, 4), np.int16), np.eye(4))
    (root / "dataset.json").write_text(json.dumps(labels))
    return root


@pytest.mark.parametrize("form", ["v1", "v2"])
def test_nnunet_layout_is_detected_with_both_label_forms(tmp_path, form):
    meta = ({"labels": {"0": "background", "1": "liver"}, "modality": {"0": "CT"}} if form == "v1" else
            {"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"})
    root = _nnunet(tmp_path, meta, suffix="_0000" if form == "v2" else "")
    assert medical.detect_volume_layout(root) == "nnunet"
    ds = medical.find_volume_dataset(root)
    assert ds.classes == {0: "background", 1: "liver"} and ds.modality == "CT"
    assert [c.case_id for c in ds.train] == ["c0", "c1"] and [c.case_id for c in ds.test] == ["t0"]
    assert all(c.label.name == f"{c.case_id}.nii.gz" for c in ds.train)


def test_plain_pairs_layout(tmp_path):
    for i in range(2):
        lab = np.zeros((6, 6, 3), np.uint8)
        lab[1:3, 1:3, :] = 3
        _save(tmp_path / f"p{i}.nii.gz", np.zeros((6, 6, 3), np.int16), np.eye(4))
        _save(tmp_path / f"p{i}_seg.nii.gz", lab, np.eye(4))
    assert medical.detect_volume_layout(tmp_path) == "pairs"
    ds = medical.find_volume_dataset(tmp_path)
    assert ds.classes == {0: "background", 3: "class_3"} and len(ds.train) == 2


def test_labels_not_in_dataset_json_are_refused_by_train(tmp_path, capsys):
    root = _nnunet(tmp_path, {"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"}}, label_value=7)
    out = tmp_path / "run"
    code = main(["train", "organs", "--data", str(root), "--out", str(out), "--quiet",
                 "--set", "base.arch=tiny", "--set", "base.image_size=64", "--set", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "label values [7] are not in dataset.json's labels [0, 1]" in err
    assert not (out / "adapter.safetensors").exists()


def test_region_labels_and_missing_background_are_refused():
    with pytest.raises(VolumeError, match="region labels"):
        medical.parse_labels({"background": 0, "whole": [1, 2]}, "dataset.json")
    with pytest.raises(VolumeError, match="background value 0"):
        medical.parse_labels({"1": "liver"}, "dataset.json")


# ----------------------------------------------------------------------------- slices from volumes
def test_slice_sampling_is_foreground_aware_and_decodes_each_volume_once(tmp_path, monkeypatch):
    root = medical.write_phantom_dataset(tmp_path, n_train=2, n_test=0, shape=(32, 32, 12), name="")
    ds = medical.find_volume_dataset(root)
    # empty slices: blank the labels of the top 4 slices of each case
    for c in ds.train:
        img = nib.load(str(c.label))
        lab = np.asanyarray(img.dataobj).copy()
        lab[:, :, 8:] = 0
        nib.save(nib.Nifti1Image(lab, img.affine), str(c.label))
    reads = []
    real = volumes.read_nifti
    monkeypatch.setattr(medical, "read_nifti", lambda p, **kw: reads.append(p) or real(p, **kw))
    cache = medical.VolumeCache({"mode": "window", "window": "abdomen"}, "CT", list(ds.classes))
    sds = medical.SliceDataset(ds.train, cache, ds.classes, image_size=64, empty_share=0.2, seed=0)
    n_fg = sum(int(np.asanyarray(nib.load(str(c.label)).dataobj).reshape(-1, 12).any(0).sum()) for c in ds.train)
    assert sds.n_foreground == n_fg and sds.n_empty == round(0.2 / 0.8 * n_fg)
    items = [sds[i] for i in range(len(sds))]
    assert len(reads) == 2  # one decode per volume, however many slices are read
    assert sum(int(it["labels"].max() == 0) for it in items) == sds.n_empty
    assert items[0]["image"].shape == (3, 64, 64) and items[0]["labels"].shape == (64, 64)
    assert set(np.unique(np.concatenate([it["labels"].numpy().ravel() for it in items]))) <= set(range(5))


def test_phantoms_have_organs_of_distinct_hu_anisotropic_spacing_and_a_flipped_affine(tmp_path):
    root = medical.write_phantom_dataset(tmp_path, n_train=3, n_test=1, shape=(64, 64, 12), name="")
    ds = medical.find_volume_dataset(root)
    assert ds.classes == medical.PHANTOM_CLASSES and len(ds.train) == 3 and len(ds.test) == 1
    img = nib.load(str(ds.train[0].images[0]))
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), (0.8, 0.8, 3.0)) and img.affine[0, 0] < 0
    vol = volumes.read_nifti(ds.train[0].images[0])
    lab = volumes.read_label(ds.train[0].label, like=vol).data
    means = {c: float(vol.data[lab == c].mean()) for c in range(1, 5) if (lab == c).any()}
    assert len(means) >= 3
    assert sorted(means.values()) == [means[c] for c in sorted(means)]  # liver < spleen < kidney < vertebra
    for s in range(5):  # 3 to 5 organ ellipsoids per body
        _, lab_s = medical.make_phantom(s, (64, 64, 12))
        import scipy.ndimage as ndi

        n = sum(ndi.label(lab_s == c)[1] for c in range(1, 5))
        assert 3 <= n <= 5


# ----------------------------------------------------------------------------- metrics against the references
def _random_blobs(rng, shape, p=0.45, smooth=1.2):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.standard_normal(shape), smooth) > np.quantile(gaussian_filter(
        rng.standard_normal(shape), smooth), 1 - p)


def _monai_nsd(pred, gt, spacing, tol):
    import torch
    from monai.metrics import compute_surface_dice

    y_pred = torch.from_numpy(np.stack([~pred, pred])[None].astype(np.float32))
    y = torch.from_numpy(np.stack([~gt, gt])[None].astype(np.float32))
    return float(compute_surface_dice(y_pred, y, class_thresholds=[tol], spacing=list(spacing))[0, 0])


CASES = {
    "random": lambda rng: (_random_blobs(rng, (20, 18, 9)), _random_blobs(rng, (20, 18, 9))),
    "shifted": lambda rng: (lambda g: (np.roll(g, 2, axis=0), g))(_random_blobs(rng, (16, 16, 8), p=0.3, smooth=2)),
    "single voxels": lambda rng: (np.pad(np.ones((1, 1, 1), bool), ((3, 10), (4, 9), (1, 5))),
                                  np.pad(np.ones((1, 1, 1), bool), ((9, 4), (2, 11), (5, 1)))),
    "touching the border": lambda rng: (np.ones((8, 8, 4), bool), np.pad(np.ones((6, 8, 4), bool), ((2, 0), (0, 0),
                                                                                                    (0, 0)))),
    "identical": lambda rng: (lambda g: (g.copy(), g))(_random_blobs(rng, (12, 12, 6))),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spacing", [(0.8, 0.8, 3.0), (1.5, 0.6, 2.2)])
def test_hd95_and_nsd_equal_medpy_and_monai(case, spacing):
    pytest.importorskip("medpy")
    pytest.importorskip("monai")
    from medpy.metric.binary import hd95 as medpy_hd95

    rng = np.random.default_rng(sum(map(ord, case)))  # stable across runs (hash() is salted)
    pred, gt = CASES[case](rng)
    assert pred.any() and gt.any()
    assert metrics.hd95(pred, gt, spacing) == pytest.approx(medpy_hd95(pred, gt, voxelspacing=spacing), abs=1e-9)
    for tol in (0.0, 1.0, 2.5):
        assert metrics.nsd(pred, gt, spacing, tol) == pytest.approx(_monai_nsd(pred, gt, spacing, tol), abs=1e-6)
    d = metrics.volume_dice(pred, gt)
    assert d == pytest.approx(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))


def test_empty_masks_return_what_the_docs_say():
    pytest.importorskip("monai")
    gt = np.zeros((6, 6, 3), bool)
    gt[1:4, 1:4, 1] = True
    empty = np.zeros_like(gt)
    sp = (0.8, 0.8, 3.0)
    diagonal = np.sqrt((5 * 0.8) ** 2 + (5 * 0.8) ** 2 + (2 * 3.0) ** 2)
    assert metrics.hd95(empty, gt, sp) == pytest.approx(diagonal) == metrics.hd95(gt, empty, sp)
    assert metrics.nsd(empty, gt, sp, 1.0) == 0.0 == _monai_nsd(empty, gt, sp, 1.0)  # MONAI gives 0 too
    assert metrics.volume_dice(empty, gt) == 0.0 and metrics.volume_iou(gt, empty) == 0.0
    for f in (lambda: metrics.hd95(empty, empty, sp), lambda: metrics.nsd(empty, empty, sp),
              lambda: metrics.volume_dice(empty, empty)):
        assert np.isnan(f())
    assert np.isnan(_monai_nsd(empty, empty, sp, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(gt, gt, spacing=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="binary mask"):
        metrics.nsd(gt.astype(int) * 2, gt, sp)


def test_label_map_metrics_per_class_and_mean_skip_absent_classes():
    gt = np.zeros((10, 10, 4), np.uint8)
    gt[1:4, 1:4] = 1
    gt[6:9, 6:9] = 2
    pred = gt.copy()
    pred[6:9, 6:9] = 0  # class 2 missed
    m = metrics.label_map_metrics(pred, gt, {0: "background", 1: "a", 2: "b", 3: "c"}, spacing=(1, 1, 2))
    assert m["a"]["dice"] == 1.0 and m["b"]["dice"] == 0.0 and np.isnan(m["c"]["dice"])
    assert m["mean"]["dice"] == 0.5  # the absent class c is not scored
    assert m["mean"]["nsd"] == pytest.approx(0.5)
