"""Folder layouts of public segmentation benchmarks and the deterministic train/val split.

`resolve_layout` knows the folder trees of a few public benchmarks (see `LAYOUTS`); directory
names are matched case-insensitively, and a root that holds a single sub-folder (an archive
extracted into a folder of its own name) is looked into once.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = ["LAYOUTS", "detect_layout", "resolve_layout", "split_names"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class _Layout:
    """Candidate (image_dir, mask_dir) pairs per split; `None` for a split = not in the dataset."""

    train: Tuple[Tuple[str, str], ...]
    test: Optional[Tuple[Tuple[str, str], ...]] = None
    description: str = ""


# Known public folder layouts (paths relative to the dataset root, matched case-insensitively).
LAYOUTS: Dict[str, _Layout] = {
    "cod10k": _Layout(
        train=(("Train/Image", "Train/GT_Object"),),
        test=(("Test/Image", "Test/GT_Object"),),
        description="COD10K-v3: Train/Image + Train/GT_Object, Test/Image + Test/GT_Object",
    ),
    "camo": _Layout(
        train=(("Images/Train", "GT"),),
        test=(("Images/Test", "GT"),),
        description="CAMO: Images/Train, Images/Test, masks of both in GT/",
    ),
    "istd": _Layout(
        train=(("train/train_A", "train/train_B"),),
        test=(("test/test_A", "test/test_B"),),
        description="ISTD: train/train_A (images) + train/train_B (shadow masks), test/test_A + test/test_B",
    ),
    "sbu": _Layout(
        train=(("SBUTrain4KRecoveredSmall/ShadowImages", "SBUTrain4KRecoveredSmall/ShadowMasks"),),
        test=(("SBU-Test/ShadowImages", "SBU-Test/ShadowMasks"),),
        description="SBU: SBUTrain4KRecoveredSmall/{ShadowImages,ShadowMasks}, SBU-Test/{ShadowImages,ShadowMasks}",
    ),
    "cvc_clinicdb": _Layout(
        train=(
            ("Original", "Ground Truth"),
            ("PNG/Original", "PNG/Ground Truth"),
            ("TIF/Original", "TIF/Ground Truth"),
        ),
        description="CVC-ClinicDB: Original/ + Ground Truth/ (also under PNG/ or TIF/); no test split",
    ),
    "kvasir": _Layout(
        train=(("images", "masks"),),
        description="Kvasir-SEG: images/ + masks/; no test split",
    ),
    "generic": _Layout(
        train=(("images", "masks"),),
        description="generic: images/ + masks/; no test split",
    ),
}

# Detection order: most specific trees first; generic (== kvasir's tree) last.
_DETECT_ORDER = ("cod10k", "camo", "istd", "sbu", "cvc_clinicdb", "generic")
SPLITS = ("train", "val", "test", "all")  # the splits a dataset folder can be asked for
_SPLITS = SPLITS


def _find_ci(root: Path, rel: str) -> Optional[Path]:
    """`root/rel` with each component matched case-insensitively (exact spelling tried first)."""
    parts = Path(rel).parts
    if not parts:
        return root if root.is_dir() else None
    head, rest = parts[0], str(Path(*parts[1:])) if len(parts) > 1 else ""
    try:
        hits = sorted(c for c in root.iterdir() if c.is_dir() and c.name.lower() == head.lower())
    except OSError:
        return None
    hits.sort(key=lambda c: c.name != head)
    for hit in hits:
        found = _find_ci(hit, rest) if rest else hit
        if found is not None:
            return found
    return None


def _match(root: Path, candidates: Iterable[Tuple[str, str]]) -> Optional[Tuple[Path, Path]]:
    for img_rel, mask_rel in candidates:
        i, m = _find_ci(root, img_rel), _find_ci(root, mask_rel)
        if i is not None and m is not None:
            return i, m
    return None


def _check_root(root: PathLike) -> Path:
    r = Path(root)
    if not r.exists():
        raise FileNotFoundError(f"dataset root not found: '{r}' (check the path)")
    if not r.is_dir():
        raise FileNotFoundError(f"dataset root '{r}' is a file, not a folder; pass the folder that holds the images")
    return r


def _roots_to_try(root: Path) -> List[Path]:
    out = [root]
    subs = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if len(subs) == 1:
        out.append(subs[0])
    return out


def _looked_for() -> str:
    return "; ".join(f"{name}: {LAYOUTS[name].description}" for name in _DETECT_ORDER + ("kvasir",))


def detect_layout(root: PathLike) -> str:
    """Name of the known layout found under `root` (see `LAYOUTS`).

    `images/` + `masks/` is reported as `"kvasir"` when the root folder's
    name contains "kvasir" and as `"generic"` otherwise (the trees are the same).

    Args:
        root: dataset root folder.

    Returns:
        the layout name.

    Raises:
        FileNotFoundError: `root` does not exist.
        ValueError: no known layout matches; the message lists what was looked for.

    Example:
        >>> import tempfile, pathlib
        >>> r = pathlib.Path(tempfile.mkdtemp()); (r / "train" / "train_A").mkdir(parents=True)
        >>> (r / "train" / "train_B").mkdir()
        >>> detect_layout(r)
        'istd'
    """
    r = _check_root(root)
    for base in _roots_to_try(r):
        for name in _DETECT_ORDER:
            if _match(base, LAYOUTS[name].train) is not None or (
                LAYOUTS[name].test is not None and _match(base, LAYOUTS[name].test) is not None
            ):
                if name == "generic" and "kvasir" in r.name.lower():
                    return "kvasir"
                return name
    raise ValueError(
        f"no known dataset layout under '{r}'. Looked for -> {_looked_for()}. "
        "Rearrange the folders into one of these, or pass layout='generic' with images/ and masks/"
    )


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not valid; use one of {list(_SPLITS)}")
    return split


def _resolve(root: PathLike, layout: str, split: str) -> Tuple[str, Path, Path, bool]:
    """-> (layout name, image_dir, mask_dir, split_is_native)."""
    r = _check_root(root)
    _check_split(split)
    if layout == "auto":
        layout = detect_layout(r)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; use 'auto' or one of {sorted(LAYOUTS)}")
    spec = LAYOUTS[layout]
    native = spec.test is not None
    if native and split == "all":
        raise ValueError(
            f"layout '{layout}' has separate train and test folders, so split='all' is not one folder pair; "
            "use split='train' or 'test' (FolderDataset accepts split='all' and joins both)"
        )
    candidates = spec.train
    if spec.test is not None and split in ("val", "test"):
        candidates = spec.test
    for base in _roots_to_try(r):
        hit = _match(base, candidates)
        if hit is not None:
            return layout, hit[0], hit[1], native
    wanted = ", ".join(f"{i}/ + {m}/" for i, m in candidates)
    raise FileNotFoundError(
        f"layout '{layout}' (split '{split}') expects {wanted} under '{r}', but they are missing; "
        "check the root folder or pass layout='auto' to detect it"
    )


def resolve_layout(root: PathLike, layout: str = "auto", split: str = "train") -> Tuple[Path, Path]:
    """Find the image and mask folders of one split of a dataset.

    Layouts with a test split (cod10k, camo, istd, sbu) map `"train"` to the
    train folders and `"val"`/`"test"` to the test folders.  Layouts without
    one (generic, kvasir, cvc_clinicdb) return the same folders for every split;
    `FolderDataset` then holds out a deterministic `val_fraction`.

    Args:
        root: dataset root folder.
        layout: `"auto"` (detect) or a name from `LAYOUTS`.
        split: `"train"`, `"val"`, `"test"` or `"all"` (only for layouts without a test split).

    Returns:
        `(image_dir, mask_dir)`.

    Raises:
        FileNotFoundError: `root` or the layout's folders are missing.
        ValueError: unknown layout/split, or nothing detected (lists what was looked for).

    Example:
        >>> import tempfile, pathlib
        >>> r = pathlib.Path(tempfile.mkdtemp()); (r / "images").mkdir(); (r / "masks").mkdir()
        >>> [p.name for p in resolve_layout(r)]
        ['images', 'masks']
    """
    _, i, m, _ = _resolve(root, layout, split)
    return i, m


def _stable_hash(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{name}".encode()).digest()[:8], "big")


def split_names(names: Sequence[str], val_fraction: float, seed: int = 0) -> Tuple[List[str], List[str]]:
    """Deterministic train/val split of names.

    Names are ordered by a seeded SHA-1 hash (independent of listing order and
    of Python's hash randomisation) and the first `round(n * val_fraction)`
    (at least 1 when `val_fraction > 0` and n >= 2) go to val.  Adding files
    moves few existing names across the split.

    Args:
        names: unique names (file stems).
        val_fraction: fraction in [0, 1) held out.
        seed: changes which names are held out.

    Returns:
        `(train_names, val_names)`, each in the input order.

    Example:
        >>> tr, va = split_names([f"im{i}" for i in range(10)], 0.2, seed=0)
        >>> len(tr), len(va), sorted(tr + va) == sorted(f"im{i}" for i in range(10))
        (8, 2, True)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1); e.g. 0.2 holds out 20 %")
    n = len(names)
    k = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    order = sorted(range(n), key=lambda j: (_stable_hash(seed, names[j]), names[j]))
    val = set(order[:k])
    return [x for j, x in enumerate(names) if j not in val], [x for j, x in enumerate(names) if j in val]

