# why over 500 lines: the medical data path in one place (CT windows, MR percentiles, nnU-Net layout, phantoms)
"""Medical volumes for the recipes: intensity (CT windows, MR percentiles), slices as SAM images (one
channel made three, or 2.5-D), the MSD / nnU-Net raw layout and plain image/label folders, a slice
dataset that samples foreground-aware from cached volumes, and synthetic CT phantoms.

Example:
    >>> import numpy as np
    >>> ct_window(np.array([-1000.0, 40.0, 1000.0]), "abdomen").round(3).tolist()
    [0.0, 0.5, 1.0]
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .volumes import NIFTI_SUFFIXES, Volume, VolumeError, read_label, read_nifti, volume_stem

# name -> (level, width) in HU (the usual radiology presets)
CT_WINDOWS: Dict[str, Tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (50.0, 350.0),
}
NORMALISE = ("auto", "window", "percentile", "none")
CHANNELS = ("repeat", "2.5d")


# ---------------------------------------------------------------------------- intensity
def ct_window(hu: np.ndarray, window: Optional[str] = None, level: Optional[float] = None,
              width: Optional[float] = None) -> np.ndarray:
    """Clip HU to a window and scale it to [0, 1].

    Args:
        hu: CT values in Hounsfield units.
        window: a name in `CT_WINDOWS` (abdomen, liver, lung, bone, brain, soft_tissue).
        level: window centre in HU (with `width`, instead of a name).
        width: window width in HU (> 0).

    Raises:
        ValueError: an unknown name, or neither a name nor level and width.

    Example:
        >>> ct_window(np.array([-160.0, 240.0]), level=40, width=400).tolist()
        [0.0, 1.0]
    """
    if level is None or width is None:
        if window is None:
            raise ValueError("a CT window needs a name (e.g. abdomen) or both level and width in HU")
        if window not in CT_WINDOWS:
            raise ValueError(f"CT window {window!r} is not one of {sorted(CT_WINDOWS)}; or give level and width in HU")
        level, width = CT_WINDOWS[window]
    if not width > 0:
        raise ValueError(f"CT window width={width!r} must be > 0 HU, e.g. 400")
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, np.float32) - lo) / float(width), 0.0, 1.0)


def percentile_normalise(x: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles of the volume (MR: no absolute scale) and scale to [0, 1].

    Example:
        >>> percentile_normalise(np.arange(1001.0), 0.5, 99.5)[[0, 500, 1000]].round(3).tolist()
        [0.0, 0.5, 1.0]
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles ({low}, {high}) must satisfy 0 <= low < high <= 100, e.g. (0.5, 99.5)")
    a = np.asarray(x, np.float32)
    lo, hi = np.percentile(a, [low, high])
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def normalise(vol: np.ndarray, modality: str = "CT", mode: str = "auto", window: Optional[str] = "abdomen",
              level: Optional[float] = None, width: Optional[float] = None,
              percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """A volume's intensities in [0, 1] as a recipe's `volume` section asks.

    Args:
        vol: the voxels.
        modality: `CT`, `MR`, ... (dataset.json's channel name); `auto` windows CT and takes percentiles
            of anything else.
        mode: `auto`, `window`, `percentile` or `none` (min-max of the volume).
        window: the CT window's name (see `ct_window`).
        level: the window's centre in HU (with `width`, instead of the name).
        width: the window's width in HU.
        percentiles: (low, high) for `percentile`.

    Example:
        >>> normalise(np.array([0.0, 10.0, 20.0]), "MR", percentiles=(0, 100)).tolist()
        [0.0, 0.5, 1.0]
    """
    if mode not in NORMALISE:
        raise ValueError(f"volume.normalise={mode!r} is not one of {list(NORMALISE)}")
    if mode == "auto":
        mode = "window" if str(modality).upper().startswith("CT") else "percentile"
    if mode == "window":
        return ct_window(vol, window, level, width)
    if mode == "percentile":
        return percentile_normalise(vol, *percentiles)
    return percentile_normalise(vol, 0.0, 100.0)


def slice_channels(vol01: np.ndarray, k: int, channels: str = "repeat") -> np.ndarray:
    """Slice `k` (along the last axis) of a [0, 1] volume as a H x W x 3 uint8 image: the slice three times
    (`repeat`), or slices k-1, k, k+1 as the three channels (`2.5d`, the edges repeat the end slice).
    Rows are the volume's second axis, columns its first (the radiological screen layout of RAS data).

    Example:
        >>> v = np.stack([np.full((2, 2), i / 2) for i in range(3)], axis=-1)
        >>> slice_channels(v, 0, "2.5d")[0, 0].tolist(), slice_channels(v, 1)[0, 0].tolist()
        ([0, 0, 127], [127, 127, 127])
    """
    if channels not in CHANNELS:
        raise ValueError(f"volume.channels={channels!r} is not one of {list(CHANNELS)}")
    n = vol01.shape[-1]
    idx = [k, k, k] if channels == "repeat" else [max(k - 1, 0), k, min(k + 1, n - 1)]
    img = np.stack([vol01[:, :, i].T for i in idx], axis=-1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def label_slice(labels: np.ndarray, k: int) -> np.ndarray:
    """Slice `k` of a label volume in the same layout as `slice_channels`."""
    return np.ascontiguousarray(labels[:, :, k].T)


# ---------------------------------------------------------------------------- layouts
@dataclass
class Case:
    """One case: its image channel files (the model reads the first) and its label file."""

    case_id: str
    images: List[Path]
    label: Optional[Path] = None


@dataclass
class VolumeDataset:
    """A volume dataset as found on disk.

    Attributes:
        root: the folder.
        layout: `nnunet` (MSD / nnU-Net raw: dataset.json, imagesTr, labelsTr, imagesTs) or `pairs`.
        classes: label value -> class name (background 0 included).
        modality: the first channel's name (`CT`, `MR`, ...).
        train: labelled cases (imagesTr + labelsTr).
        test: unlabelled cases (imagesTs).
    """

    root: Path
    layout: str
    classes: Dict[int, str]
    modality: str = "CT"
    train: List[Case] = field(default_factory=list)
    test: List[Case] = field(default_factory=list)


def parse_labels(labels: Any, where: str) -> Dict[int, str]:
    """dataset.json's `labels` in either form: v1 (MSD) `{"0": "background", "1": "liver"}` or v2 (nnU-Net)
    `{"background": 0, "liver": 1}`.

    Raises:
        VolumeError: neither form, region labels (lists of values), or no background 0.

    Example:
        >>> parse_labels({"background": 0, "liver": 1}, "x") == parse_labels({"0": "background", "1": "liver"}, "x")
        True
    """
    if not isinstance(labels, dict) or not labels:
        raise VolumeError(f"{where}: 'labels' must be a mapping such as {{\"background\": 0, \"liver\": 1}}")
    out: Dict[int, str] = {}
    v1 = all(isinstance(k, str) and k.strip().lstrip("-").isdigit() for k in labels)
    for k, v in labels.items():
        if v1:
            value, name = int(k), v
        elif isinstance(v, bool) or not isinstance(v, int):
            raise VolumeError(f"{where}: label {k!r} maps to {v!r}; samadapt reads one integer value per class "
                              "(nnU-Net region labels, lists of values, are not supported)")
        else:
            value, name = v, k
        if not isinstance(name, str) or not name.strip() or value < 0:
            raise VolumeError(f"{where}: label {k!r}: {v!r} is not a class name and a value >= 0")
        out[int(value)] = name
    if 0 not in out:
        raise VolumeError(f"{where}: labels lack the background value 0; add \"background\": 0")
    return dict(sorted(out.items()))


def _strip_channel(stem: str) -> Tuple[str, Optional[int]]:
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        return stem[:-5], int(stem[-4:])
    return stem, None


def _nifti_files(folder: Path) -> List[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(NIFTI_SUFFIXES)) \
        if folder.is_dir() else []


def _cases(images_dir: Path, labels_dir: Optional[Path]) -> List[Case]:
    groups: Dict[str, Dict[int, Path]] = {}
    for f in _nifti_files(images_dir):
        case, ch = _strip_channel(volume_stem(f))
        groups.setdefault(case, {})[ch or 0] = f
    labels = {volume_stem(f): f for f in _nifti_files(labels_dir)} if labels_dir is not None else {}
    out = []
    for case, chans in sorted(groups.items()):
        out.append(Case(case, [chans[c] for c in sorted(chans)], labels.get(case)))
    return out


def detect_volume_layout(root: Union[str, os.PathLike]) -> Optional[str]:
    """`nnunet` (dataset.json, or imagesTr/), `pairs` (images/ + labels/ of NIfTI files, or NIfTI files with
    `_label`/`_seg` twins in one folder), or None.

    Example:
        >>> import tempfile
        >>> detect_volume_layout(tempfile.mkdtemp()) is None
        True
    """
    r = Path(root)
    if (r / "dataset.json").is_file() or (r / "imagesTr").is_dir():
        return "nnunet"
    if _nifti_files(r / "images") and _nifti_files(r / "labels"):
        return "pairs"
    if any(_label_twin_stem(volume_stem(f)) for f in _nifti_files(r)):
        return "pairs"
    return None


def _label_twin_stem(stem: str) -> Optional[str]:
    for suffix in ("_label", "_labels", "_seg", "_mask"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return None


def find_volume_dataset(root: Union[str, os.PathLike], layout: str = "auto") -> VolumeDataset:
    """Read a volume dataset's layout: the cases, their classes and modality.

    nnU-Net / MSD: `imagesTr/CASE_0000.nii.gz` (or MSD's `CASE.nii.gz`), `labelsTr/CASE.nii.gz`,
    `imagesTs/`, `dataset.json` with `labels` (v1 or v2) and `channel_names` (v2) or `modality` (v1).
    Pairs: `images/` + `labels/` matched by name, or `CASE.nii.gz` + `CASE_seg.nii.gz` in one folder; the
    classes are then the label values found (named `class_<v>`), or a `dataset.json` beside them.

    Raises:
        VolumeError: no such layout, no labelled case, an image without its label, bad dataset.json.
    """
    r = Path(root)
    if not r.is_dir():
        raise VolumeError(f"{r}: no such dataset folder")
    found = detect_volume_layout(r) if layout == "auto" else layout
    if found is None:
        raise VolumeError(f"{r}: not a volume dataset: expected the nnU-Net/MSD layout (dataset.json, imagesTr/, "
                          "labelsTr/) or NIfTI image/label pairs (images/ + labels/, or CASE + CASE_seg files)")
    meta: Dict[str, Any] = {}
    if (r / "dataset.json").is_file():
        try:
            meta = json.loads((r / "dataset.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise VolumeError(f"{r / 'dataset.json'}: not valid JSON ({e})") from None
    if found == "nnunet":
        if "labels" not in meta:
            raise VolumeError(f"{r}: the nnU-Net layout needs dataset.json with 'labels', e.g. "
                              "{\"labels\": {\"background\": 0, \"liver\": 1}, \"channel_names\": {\"0\": \"CT\"}}")
        train = _cases(r / "imagesTr", r / "labelsTr")
        test = _cases(r / "imagesTs", None)
    else:
        if (r / "images").is_dir():
            train = _cases(r / "images", r / "labels")
        else:
            files = _nifti_files(r)
            twins = {_label_twin_stem(volume_stem(f)): f for f in files if _label_twin_stem(volume_stem(f))}
            train = [Case(volume_stem(f), [f], twins.get(volume_stem(f))) for f in files
                     if not _label_twin_stem(volume_stem(f))]
        test = []
    missing = [c.case_id for c in train if c.label is None]
    if missing:
        raise VolumeError(f"{r}: {len(missing)} images have no label file (e.g. {missing[0]}); add the labels or move "
                          "those images to imagesTs/")
    if not train:
        raise VolumeError(f"{r}: no labelled volumes found")
    chans = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    modality = str(chans.get("0", next(iter(chans.values()), "CT"))) if isinstance(chans, dict) else "CT"
    if "labels" in meta:
        classes = parse_labels(meta["labels"], str(r / "dataset.json"))
    else:
        values = set()
        for c in train:
            values |= set(np.unique(read_label(c.label).data).tolist())
        classes = {0: "background", **{int(v): f"class_{int(v)}" for v in sorted(values) if v != 0}}
    return VolumeDataset(r, found, classes, modality, train, test)


# ---------------------------------------------------------------------------- slices from volumes
def resize_slice(img: np.ndarray, size: int, nearest: bool = False) -> Tuple[np.ndarray, Tuple[int, int]]:
    """SAM's input frame for one slice: the longer side resized to `size` (in-plane resampling), the rest
    zero-padded at the bottom/right. Returns the padded array and the resized (h, w).

    Example:
        >>> a, hw = resize_slice(np.ones((50, 100), np.uint8), 64, nearest=True); a.shape, hw
        ((64, 64), (32, 64))
    """
    import cv2

    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    pad = np.zeros((size, size) + img.shape[2:], img.dtype)
    pad[:nh, :nw] = out
    return pad, (nh, nw)


@dataclass
class PreparedVolume:
    """A volume decoded and normalised once: [0, 1] intensities (float16: half the memory) and labels."""

    case_id: str
    image: np.ndarray
    labels: Optional[np.ndarray]
    volume: Volume


class VolumeCache:
    """Each volume decoded, canonicalised and normalised once, then kept (a 512 x 512 x 200 CT is decoded
    once, not once per slice); `decodes` counts the reads.

    Args:
        norm: keyword arguments of `normalise` (mode, window, level, width, percentiles).
        modality: the dataset's first channel name.
        classes: the allowed label values.
    """

    def __init__(self, norm: Dict[str, Any], modality: str, classes: Sequence[int]) -> None:
        self.norm, self.modality, self.classes = norm, modality, list(classes)
        self.items: Dict[str, PreparedVolume] = {}
        self.decodes = 0

    def get(self, case: Case) -> PreparedVolume:
        """The prepared volume of `case` (decoded on first use)."""
        if case.case_id not in self.items:
            vol = read_nifti(case.images[0])
            self.decodes += 1
            lab = read_label(case.label, like=vol, allowed=self.classes).data if case.label is not None else None
            img = normalise(vol.data, self.modality, **self.norm).astype(np.float16)
            vol.data = np.empty((0,))  # the raw voxels are not kept: the normalised copy is what is read
            self.items[case.case_id] = PreparedVolume(case.case_id, img, lab, vol)
        return self.items[case.case_id]


class SliceDataset:
    """2-D training slices sampled from volumes, foreground-aware: every slice with any labelled voxel,
    plus `empty_share` of the set drawn from the empty slices (seeded), resized in-plane to the model's size.

    Items: `image` uint8 3 x S x S tensor, `labels` int64 S x S tensor (label values mapped to class indices
    0..K-1), `input_size` (resized h, w), `case`, `slice`.

    Args:
        cases: labelled cases.
        cache: the `VolumeCache` that decodes each volume once.
        classes: label value -> class name (the model's class order is this order).
        image_size: the model's input side.
        channels: `repeat` or `2.5d`.
        empty_share: share of the items that are empty slices, in [0, 1).
        seed: the draw of the empty slices.
    """

    def __init__(self, cases: Sequence[Case], cache: VolumeCache, classes: Dict[int, str], image_size: int,
                 channels: str = "repeat", empty_share: float = 0.1, seed: int = 0) -> None:
        if not 0.0 <= empty_share < 1.0:
            raise ValueError(f"volume.empty_share={empty_share} must be in [0, 1), e.g. 0.1")
        self.cases, self.cache, self.image_size, self.channels = list(cases), cache, image_size, channels
        self.lut = np.zeros(max(classes) + 1, np.int64)
        for i, v in enumerate(sorted(classes)):
            self.lut[v] = i
        fg, empty = [], []
        for ci, c in enumerate(self.cases):
            lab = cache.get(c).labels
            has = lab.reshape(-1, lab.shape[-1]).any(axis=0)
            fg += [(ci, k) for k in np.flatnonzero(has)]
            empty += [(ci, k) for k in np.flatnonzero(~has)]
        n_empty = min(len(empty), int(round(empty_share / (1.0 - empty_share) * len(fg)))) if empty_share else 0
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(empty), size=n_empty, replace=False) if n_empty else []
        self.index = fg + [empty[i] for i in sorted(pick)]
        self.n_foreground, self.n_empty = len(fg), n_empty

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        import torch

        ci, k = self.index[i]
        pv = self.cache.get(self.cases[ci])
        img, hw = resize_slice(slice_channels(pv.image, int(k), self.channels), self.image_size)
        lab, _ = resize_slice(label_slice(pv.labels, int(k)).astype(np.int32), self.image_size, nearest=True)
        return {"image": torch.from_numpy(img).permute(2, 0, 1).contiguous(),
                "labels": torch.from_numpy(self.lut[lab]), "input_size": torch.tensor(hw),
                "case": pv.case_id, "slice": int(k)}


def collate_slices(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack `SliceDataset` items into a batch."""
    import torch

    return {"image": torch.stack([x["image"] for x in items]), "labels": torch.stack([x["labels"] for x in items]),
            "input_size": torch.stack([x["input_size"] for x in items]), "case": [x["case"] for x in items],
            "slice": [x["slice"] for x in items]}


# ---------------------------------------------------------------------------- synthetic CT phantoms
PHANTOM_CLASSES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "vertebra"}
# organ -> (mean HU, texture amplitude HU, texture scale in voxels)
_ORGANS = {1: (60.0, 12.0, 3.0), 2: (110.0, 6.0, 1.5), 3: (170.0, 20.0, 5.0), 4: (600.0, 120.0, 2.0)}
PHANTOM_SPACING = (0.8, 0.8, 3.0)


def _texture(rng, shape, scale) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    t = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=(scale, scale, max(scale / 3, 0.5)))
    return t / (t.std() + 1e-6)


def make_phantom(seed: int, shape: Tuple[int, int, int] = (96, 96, 24)) -> Tuple[np.ndarray, np.ndarray]:
    """A synthetic abdominal CT (HU, int16) and its label map (uint8): a body ellipse of fat and muscle, and
    3 to 5 organ ellipsoids (liver, spleen, one or two kidneys, a vertebra), each of its own HU and texture,
    placed with jitter, plus noise. Axis order X, Y, Z (canonical RAS voxel axes).

    Example:
        >>> hu, lab = make_phantom(0, (48, 48, 8)); hu.dtype, sorted(np.unique(lab).tolist())[:2]
        (dtype('int16'), [0, 1])
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    cx, cy = nx / 2 + rng.normal(0, 2), ny / 2 + rng.normal(0, 2)
    ax, ay = nx * rng.uniform(0.40, 0.46), ny * rng.uniform(0.30, 0.36)
    body = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1
    inner = ((x - cx) / (ax - 4)) ** 2 + ((y - cy) / (ay - 4)) ** 2 <= 1
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = -100.0  # subcutaneous fat
    hu[inner] = -40.0 + 10.0 * _texture(rng, shape, 4.0)[inner]  # fat-rich soft tissue between the organs
    lab = np.zeros(shape, np.uint8)
    zc = nz / 2 + rng.normal(0, 1)
    # (class, centre as a share of the body's half axes from its centre, radii as shares of nx, ny, nz)
    organs = [(1, (-0.45, -0.15), (0.20, 0.17, 0.40)), (2, (0.55, -0.10), (0.09, 0.10, 0.25)),
              (4, (0.0, 0.62), (0.07, 0.08, 0.60))]
    kidneys = [(3, (-0.45, 0.38), (0.09, 0.11, 0.25)), (3, (0.45, 0.38), (0.09, 0.11, 0.25))]
    organs += kidneys[: int(rng.integers(0, 3))] if rng.random() < 0.85 else []
    for cls, (ox, oy), (rx, ry, rz) in organs:
        ex = cx + ox * ax + rng.normal(0, 1.5)
        ey = cy + oy * ay + rng.normal(0, 1.5)
        ez = zc + rng.normal(0, 1)
        r = np.array([rx * nx, ry * ny, rz * nz]) * rng.uniform(0.85, 1.15, 3)
        m = ((x - ex) / r[0]) ** 2 + ((y - ey) / r[1]) ** 2 + ((z - ez) / r[2]) ** 2 <= 1
        m &= inner
        mean, amp, scale = _ORGANS[cls]
        hu[m] = mean + amp * _texture(rng, shape, scale)[m]
        lab[m] = cls
    hu += rng.normal(0, 10.0, shape).astype(np.float32)
    return np.round(hu).astype(np.int16), lab


PHANTOM_AFFINE_SIGNS = (-1.0, -1.0, 1.0)  # stored as DICOM-derived scans often are: x and y flipped


def phantom_affine(spacing=PHANTOM_SPACING, shape=(96, 96, 24)) -> np.ndarray:
    """The phantoms' non-identity affine: x and y stored flipped (LPS-like storage), origin off-centre."""
    a = np.diag([*(s * f for s, f in zip(spacing, PHANTOM_AFFINE_SIGNS)), 1.0])
    a[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    return a


def _to_stored(arr: np.ndarray) -> np.ndarray:
    """Canonical RAS voxel axes -> the phantom files' storage (x and y flipped, as `phantom_affine` says)."""
    return np.ascontiguousarray(arr[::-1, ::-1, :])


def write_phantom_dataset(root: Union[str, os.PathLike], n_train: int = 8, n_test: int = 2,
                          shape: Tuple[int, int, int] = (96, 96, 24), seed: int = 0, name: str = "Dataset900_Phantom",
                          v1_labels: bool = False) -> Path:
    """Write synthetic CT phantoms in the nnU-Net raw layout: `imagesTr/case_XXX_0000.nii.gz`,
    `labelsTr/case_XXX.nii.gz`, `imagesTs/` (with its labels in `labelsTs/` for scoring) and `dataset.json`
    (v2 labels, or v1 with `v1_labels`), at 0.8 x 0.8 x 3 mm with a flipped, off-centre affine.

    Returns:
        The dataset folder.

    Example:
        >>> import tempfile
        >>> d = write_phantom_dataset(tempfile.mkdtemp(), n_train=1, n_test=1, shape=(32, 32, 6))
        >>> sorted(p.name for p in d.iterdir())
        ['dataset.json', 'imagesTr', 'imagesTs', 'labelsTr', 'labelsTs']
    """
    import nibabel as nib

    d = Path(root) / name if name else Path(root)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    affine = phantom_affine(PHANTOM_SPACING, shape)
    for i in range(n_train + n_test):
        hu, lab = make_phantom(seed * 100003 + i, shape)
        split = ("Tr" if i < n_train else "Ts")
        cid = f"case_{i:03d}"
        nib.save(nib.Nifti1Image(_to_stored(hu), affine), str(d / f"images{split}" / f"{cid}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(_to_stored(lab), affine), str(d / f"labels{split}" / f"{cid}.nii.gz"))
    labels = ({str(k): v for k, v in PHANTOM_CLASSES.items()} if v1_labels
              else {v: k for k, v in PHANTOM_CLASSES.items()})
    meta = {"name": name, "channel_names": {"0": "CT"}, "labels": labels, "numTraining": n_train,
            "file_ending": ".nii.gz"}
    (d / "dataset.json").write_text(json.dumps(meta, indent=2))
    return d
