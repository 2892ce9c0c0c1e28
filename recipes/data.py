"""Folder datasets: robust image/mask reading, stem pairing, public layouts, SAM batching.

Reading
-------
:func:`read_image` always returns ``uint8`` H x W x 3 RGB and :func:`read_mask`
always returns ``bool`` H x W, whatever the file holds (gray, gray+alpha, RGBA,
palette, 1-bit, 16-bit PNG/TIFF, 32-bit int or float TIFF).  Files are decoded
with Pillow; 16-bit colour images (which Pillow truncates to 8 bits) and TIFFs
Pillow cannot decode are decoded with OpenCV instead.  EXIF orientation is *not*
applied: dataset masks are stored in the raw pixel order of their images, so
rotating only one of the two would misalign them.

Layouts
-------
``resolve_layout`` knows the folder trees of a few public benchmarks (see
:data:`LAYOUTS`); directory names are matched case-insensitively, and a root
that holds a single sub-folder (an archive extracted into a folder of its own
name) is looked into once.

Batching
--------
:func:`sam_resize_pad`, :class:`TransformedDataset` and :class:`SamCollate`
produce what ``sam_core.sam.Sam.forward_masks`` expects: float pixels 0..255,
longest side resized to ``image_size`` (PIL bilinear, rounding as
``sam_core.transforms.ResizeLongestSide``) and zero-padded at the bottom/right
to a square; normalisation is left to the model.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MASK_SUFFIXES",
    "LAYOUTS",
    "ImageReadError",
    "EmptyDatasetError",
    "UnpairedFilesError",
    "read_image",
    "read_mask",
    "list_images",
    "pair_by_stem",
    "detect_layout",
    "resolve_layout",
    "split_names",
    "FolderDataset",
    "sam_resize_pad",
    "TransformedDataset",
    "SamCollate",
    "collate_batch",
]

PathLike = Union[str, Path]

#: Extensions (lower case) recognised as images; matching is case-insensitive.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

#: Suffixes tried after an image stem to find its mask, in order of preference.
DEFAULT_MASK_SUFFIXES: Tuple[str, ...] = (
    "",
    "_mask",
    "_gt",
    "_GT",
    "-mask",
    "_Mask",
    "_segmentation",
    "_label",
    "_labels",
)

# Preferred mask extension when one stem has several files (lossless first).
_EXT_RANK = {".png": 0, ".bmp": 1, ".tif": 2, ".tiff": 3, ".jpg": 4, ".jpeg": 5}


from .errors import EmptyDatasetError, ImageReadError, UnpairedFilesError  # noqa: E402,F401


# ----------------------------------------------------------------------------- reading
def _check_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: '{p}' (check the path and the dataset root)")
    if not p.is_file():
        raise ImageReadError(f"'{p}' is a directory, not an image file; pass a file path")
    return p


def _rawmode(im: Image.Image) -> str:
    try:
        args = im.tile[0].args if hasattr(im.tile[0], "args") else im.tile[0][3]
    except (IndexError, AttributeError, TypeError):
        return ""
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _decode_cv2(p: Path) -> Optional[np.ndarray]:
    """OpenCV decode in RGB(A) order, or None."""
    try:
        buf = np.fromfile(str(p), dtype=np.uint8)
        arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    except (cv2.error, OSError, ValueError):
        return None
    if arr is None or arr.size == 0:
        return None
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [2, 1, 0, 3]]
    return np.ascontiguousarray(arr)


def _decode(path: PathLike) -> np.ndarray:
    """Decode a file to H x W, H x W x 2 (gray+alpha), H x W x 3 (RGB) or H x W x 4 (RGBA).

    The dtype is bool (1-bit), uint8, uint16, int32 or float32.
    """
    p = _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's EXIF/metadata chatter; real failures raise
            with Image.open(p) as im:
                raw = _rawmode(im)
                mode = im.mode
                if ";16" in raw and mode in ("RGB", "RGBA", "LA"):
                    # Pillow truncates 16-bit colour to 8 bits; OpenCV keeps them.
                    arr = _decode_cv2(p)
                    if arr is not None:
                        return arr
                im.load()
                if mode == "1":
                    return np.array(im, dtype=bool)
                if mode in ("L", "LA", "RGB", "RGBA"):
                    return np.array(im)
                if mode in ("P", "PA"):
                    keep_alpha = mode == "PA" or "transparency" in im.info
                    return np.array(im.convert("RGBA" if keep_alpha else "RGB"))
                if mode.startswith("I;16"):
                    return np.array(im).astype(np.uint16)
                if mode == "I":
                    return np.array(im).astype(np.int32)
                if mode == "F":
                    return np.array(im).astype(np.float32)
                if mode in ("La",):
                    return np.array(im.convert("LA"))
                if mode in ("RGBa",):
                    return np.array(im.convert("RGBA"))
                return np.array(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, RGBX
    except UnidentifiedImageError as exc:
        err: Exception = exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if p.suffix.lower() not in (".tif", ".tiff"):
            raise ImageReadError(
                f"cannot decode image file '{p.name}' ({p}): {exc}; the file is corrupt or "
                "truncated - re-download or re-export it, or remove it from the dataset"
            ) from exc
        err = exc
    arr = _decode_cv2(p)  # formats/variants Pillow does not know (some TIFFs)
    if arr is None:
        raise ImageReadError(
            f"cannot decode image file '{p.name}' ({p}): {err}; the file is corrupt or not an "
            f"image - re-download or re-export it, or remove it from the dataset"
        ) from err
    return arr


def _to_uint8(arr: np.ndarray, depth16: str) -> np.ndarray:
    """Scale any numeric array to uint8 (see :func:`read_image` for the rules)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    fits16 = np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 65535
    if arr.dtype == np.uint16 or fits16:
        a = arr.astype(np.uint16)
        if depth16 == "shift":
            return (a >> 8).astype(np.uint8)
        m = int(a.max()) if a.size else 0
        return np.zeros(a.shape, np.uint8) if m == 0 else np.round(a.astype(np.float32) * (255.0 / m)).astype(np.uint8)
    a = np.nan_to_num(arr.astype(np.float32))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0 and np.issubdtype(arr.dtype, np.floating):
        return np.round(a * 255.0).astype(np.uint8)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_image(path: PathLike, depth16: str = "shift", alpha: str = "composite") -> np.ndarray:
    """Read any image file as ``uint8`` H x W x 3 RGB.

    Conversions: gray -> replicated to 3 channels; palette -> its RGB colours;
    1-bit -> 0/255.  16-bit data is scaled to 8 bits with ``depth16``:
    ``"shift"`` (default, ``value >> 8``: content-independent, so the same raw
    value always gives the same pixel) or ``"max"`` (``value * 255 / image
    max``: stretches images that only use part of the 16-bit range, e.g. 12-bit
    sensors).  32-bit integer data within 0..65535 is treated as 16-bit; float
    data in [0, 1] is multiplied by 255, other float/int data is min-max
    stretched.  An alpha channel is composited on black (``alpha="composite"``:
    transparent pixels become black) or ignored (``alpha="drop"``).

    Args:
        path: image file (.jpg .jpeg .png .bmp .tif .tiff and anything else Pillow or OpenCV read).
        depth16: ``"shift"`` or ``"max"``, how 16-bit values are brought to 0..255.
        alpha: ``"composite"`` or ``"drop"``.

    Returns:
        ``np.ndarray`` uint8 of shape (H, W, 3), RGB order.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file cannot be decoded (its name is in the message).

    Example:
        >>> import tempfile, os, numpy as np
        >>> from PIL import Image
        >>> f = os.path.join(tempfile.mkdtemp(), "g.png")
        >>> Image.fromarray(np.full((4, 5), 7, np.uint8)).save(f)
        >>> im = read_image(f); im.shape, im.dtype, int(im[0, 0, 2])
        ((4, 5, 3), dtype('uint8'), 7)
    """
    if depth16 not in ("shift", "max"):
        raise ValueError(
            f"depth16={depth16!r} is not valid; use 'shift' (value >> 8) or 'max' (scale by the image max)"
        )
    if alpha not in ("composite", "drop"):
        raise ValueError(f"alpha={alpha!r} is not valid; use 'composite' (on black) or 'drop'")
    arr = _decode(path)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    a: Optional[np.ndarray] = None
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        a = arr[..., -1]
        arr = arr[..., :-1]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] > 3:
        arr = arr[..., :3]
    rgb = _to_uint8(arr, depth16)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    if a is not None and alpha == "composite":
        a8 = _to_uint8(a, depth16).astype(np.uint16)[..., None]
        rgb = ((rgb.astype(np.uint16) * a8 + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def _binarise(arr: np.ndarray) -> np.ndarray:
    """Threshold one channel (or H x W x C any-channel) at half range."""
    if arr.dtype == bool:
        return arr
    if arr.size and np.issubdtype(arr.dtype, np.integer) and arr.max() <= 1 and arr.min() >= 0:
        return arr > 0  # a 0/1 label map: > 127 would read it as empty
    if np.issubdtype(arr.dtype, np.floating):
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        thr = 0.5 if hi <= 1.0 else (127.0 if hi <= 255.0 else 32767.0)
        return np.nan_to_num(arr) > thr
    if arr.dtype == np.uint8:
        return arr > 127
    if arr.dtype == np.uint16 or (arr.size and arr.max() <= 65535):
        return arr > 32767
    return arr > (int(arr.max()) // 2)


def read_mask(path: PathLike) -> np.ndarray:
    """Read any mask file as ``bool`` H x W.

    Rules: 8-bit values are foreground when ``> 127``; 16-bit values when
    ``> 32767`` (half range); 1-bit as is; float data when ``> 0.5`` (if it lies
    in [0, 1]); colour (RGB or palette, via its colours) masks when *any*
    channel is ``> 127``.  A mask whose values are only 0 and 1 is a label map
    and is read as ``value == 1`` (the ``> 127`` rule would make it empty).
    With an alpha channel the colour channels are used, unless they are uniform
    while alpha varies (a mask drawn as transparency), then alpha is used.
    JPEG masks work: compression noise stays on its side of the threshold.

    Args:
        path: mask file.

    Returns:
        ``np.ndarray`` bool of shape (H, W).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file cannot be decoded.

    Example:
        >>> import tempfile, os, numpy as np
        >>> from PIL import Image
        >>> f = os.path.join(tempfile.mkdtemp(), "m.png")
        >>> Image.fromarray(np.array([[0, 255], [200, 100]], np.uint8)).save(f)
        >>> read_mask(f).tolist()
        [[False, True], [True, False]]
    """
    arr = _decode(path)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        colour, a = arr[..., :-1], arr[..., -1]
        if colour.size and colour.min() == colour.max() and a.min() != a.max():
            return _binarise(a)
        arr = colour
    if arr.ndim == 3:
        if arr.size and np.issubdtype(arr.dtype, np.integer) and arr.max() <= 1:
            return arr.max(axis=2) > 0
        return _binarise(arr).any(axis=2)
    return _binarise(arr)


# ----------------------------------------------------------------------------- pairing
def list_images(folder: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """Image files directly inside ``folder``, sorted by name; hidden files (``.x``, ``._x``) skipped.

    Args:
        folder: directory to list (not recursive).
        extensions: accepted extensions, compared case-insensitively.

    Returns:
        sorted list of paths.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a directory.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.PNG").write_bytes(b""); _ = (d / "b.txt").write_bytes(b"")
        >>> [p.name for p in list_images(d)]
        ['a.PNG']
    """
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder not found: '{d}' (check the dataset root and layout)")
    exts = {e.lower() for e in extensions}
    return sorted(
        (p for p in d.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts),
        key=lambda p: p.name,
    )


def pair_by_stem(
    image_dir: PathLike,
    mask_dir: PathLike,
    mask_suffixes: Sequence[str] = DEFAULT_MASK_SUFFIXES,
) -> Tuple[List[Tuple[Path, Path]], List[Path], List[Path]]:
    """Pair images with masks that share a file stem (plus an optional mask suffix).

    An image ``foo.jpg`` is paired with the mask whose stem is ``foo + suffix``
    for the first suffix in ``mask_suffixes`` that exists (``foo.png``,
    ``foo_mask.png``, ...).  Stems are compared case-insensitively, extensions
    are any of :data:`IMAGE_EXTENSIONS` in any case; when several mask files fit
    (``foo.png`` and ``foo.jpg``) the lossless one is preferred.  Hidden files are
    ignored.  ``image_dir`` and ``mask_dir`` may be the same folder (masks named
    with a suffix next to their images): files that are taken as masks are then
    not listed as images.

    Args:
        image_dir: folder of images.
        mask_dir: folder of masks.
        mask_suffixes: suffixes tried after the image stem, in order.

    Returns:
        ``(pairs, unpaired_images, unpaired_masks)``: ``pairs`` is a list of
        ``(image_path, mask_path)`` sorted by image name; the two others list the
        files left over.

    Raises:
        FileNotFoundError: a folder does not exist.

    Example:
        >>> import tempfile, pathlib
        >>> r = pathlib.Path(tempfile.mkdtemp()); (r / "im").mkdir(); (r / "gt").mkdir()
        >>> for n in ["im/a.jpg", "im/b.jpg", "gt/a_mask.png", "gt/c.png"]: _ = (r / n).write_bytes(b"")
        >>> pairs, lone_images, lone_masks = pair_by_stem(r / "im", r / "gt")
        >>> [(i.name, m.name) for i, m in pairs], [p.name for p in lone_images], [p.name for p in lone_masks]
        ([('a.jpg', 'a_mask.png')], ['b.jpg'], ['c.png'])
    """
    images = list_images(image_dir)
    masks = list_images(mask_dir)
    same_dir = Path(image_dir).resolve() == Path(mask_dir).resolve()
    by_stem: Dict[str, List[Path]] = {}
    for m in masks:
        by_stem.setdefault(m.stem.lower(), []).append(m)
    for lst in by_stem.values():
        lst.sort(key=lambda p: (_EXT_RANK.get(p.suffix.lower(), 9), p.name))
    suffixes = list(dict.fromkeys(s.lower() for s in mask_suffixes))

    if same_dir:
        # A file is a mask if its stem is another file's stem + a non-empty suffix.
        stems = {p.stem.lower() for p in images}
        mask_like = set()
        for p in images:
            s = p.stem.lower()
            for suf in suffixes:
                if suf and s.endswith(suf) and s[: -len(suf)] in stems:
                    mask_like.add(p)
        images = [p for p in images if p not in mask_like]
        suffixes = [s for s in suffixes if s]

    pairs: List[Tuple[Path, Path]] = []
    unpaired_images: List[Path] = []
    used: set = set()
    for img in images:
        stem = img.stem.lower()
        found = None
        for suf in suffixes:
            for cand in by_stem.get(stem + suf, []):
                if cand != img and cand not in used:
                    found = cand
                    break
            if found is not None:
                break
        if found is None:
            unpaired_images.append(img)
        else:
            used.add(found)
            pairs.append((img, found))
    image_set = set(images)
    unpaired_masks = [m for m in masks if m not in used and not (same_dir and m in image_set)]
    return pairs, unpaired_images, unpaired_masks


# ----------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Layout:
    """Candidate (image_dir, mask_dir) pairs per split; ``None`` for a split = not in the dataset."""

    train: Tuple[Tuple[str, str], ...]
    test: Optional[Tuple[Tuple[str, str], ...]] = None
    description: str = ""


#: Known public folder layouts (paths relative to the dataset root, matched case-insensitively).
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
_SPLITS = ("train", "val", "test", "all")


def _find_ci(root: Path, rel: str) -> Optional[Path]:
    """``root/rel`` with each component matched case-insensitively (exact spelling tried first)."""
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
    """Name of the known layout found under ``root`` (see :data:`LAYOUTS`).

    ``images/`` + ``masks/`` is reported as ``"kvasir"`` when the root folder's
    name contains "kvasir" and as ``"generic"`` otherwise (the trees are the same).

    Args:
        root: dataset root folder.

    Returns:
        the layout name.

    Raises:
        FileNotFoundError: ``root`` does not exist.
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

    Layouts with a test split (cod10k, camo, istd, sbu) map ``"train"`` to the
    train folders and ``"val"``/``"test"`` to the test folders.  Layouts without
    one (generic, kvasir, cvc_clinicdb) return the same folders for every split;
    :class:`FolderDataset` then holds out a deterministic ``val_fraction``.

    Args:
        root: dataset root folder.
        layout: ``"auto"`` (detect) or a name from :data:`LAYOUTS`.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (only for layouts without a test split).

    Returns:
        ``(image_dir, mask_dir)``.

    Raises:
        FileNotFoundError: ``root`` or the layout's folders are missing.
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
    of Python's hash randomisation) and the first ``round(n * val_fraction)``
    (at least 1 when ``val_fraction > 0`` and n >= 2) go to val.  Adding files
    moves few existing names across the split.

    Args:
        names: unique names (file stems).
        val_fraction: fraction in [0, 1) held out.
        seed: changes which names are held out.

    Returns:
        ``(train_names, val_names)``, each in the input order.

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


def _resize_longest(image: np.ndarray, mask: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    nh, nw = _preprocess_shape(h, w, size)
    if (nh, nw) == (h, w):
        return image, mask
    interp = cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR
    image = cv2.resize(image, (nw, nh), interpolation=interp)
    mask = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
    return image, mask


class FolderDataset(Dataset):
    """Image/mask pairs from one or several dataset roots.

    Each item is ``{"image": uint8 H x W x 3 RGB, "mask": bool H x W, "name": stem}``;
    with ``transform`` the pair is passed through ``transform(image, mask)`` and
    whatever it returns (arrays or tensors) is stored under the same keys.
    Masks whose size differs from their image are resized (nearest) to it with
    a warning.  Images without a mask are listed in a warning (and kept in
    ``unpaired_images``); ``strict=True`` makes that an error.

    Splits: for layouts with a test split, ``"val"`` and ``"test"`` are the test
    folders and ``"all"`` joins train and test.  For layouts without one,
    ``"train"`` and ``"val"``/``"test"`` are complementary deterministic subsets
    (see :func:`split_names`, ``val_fraction`` and ``seed``) and ``"all"`` is
    everything.

    Args:
        root_or_roots: a dataset root or a list of roots (e.g. COD10K and CAMO trained together).
        layout: ``"auto"``, a name from :data:`LAYOUTS`, or a list with one entry per root.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        transform: optional callable ``(image, mask) -> (image, mask)``, e.g. from
            :func:`recipes.augment.build_augmentation`.
        image_size: optional; resize (before ``transform``) so the longest side is
            this many pixels, keeping the aspect ratio (no padding; area
            interpolation when shrinking, nearest for the mask).
        mask_suffixes: see :func:`pair_by_stem`.
        strict: raise :class:`UnpairedFilesError` when an image has no mask.
        val_fraction: held-out fraction for layouts without a test split.
        seed: seed of that hold-out.

    Raises:
        FileNotFoundError: a root or its folders are missing.
        EmptyDatasetError: no pair was found (the message says where it looked).
        UnpairedFilesError: ``strict`` and images without masks.

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> from pathlib import Path
        >>> r = Path(tempfile.mkdtemp()); (r / "images").mkdir(); (r / "masks").mkdir()
        >>> Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(r / "images" / "a.png")
        >>> Image.fromarray(np.full((8, 6), 255, np.uint8)).save(r / "masks" / "a.png")
        >>> ds = FolderDataset(r, split="all"); item = ds[0]
        >>> len(ds), item["name"], item["image"].shape, item["mask"].dtype
        (1, 'a', (8, 6, 3), dtype('bool'))
    """

    def __init__(
        self,
        root_or_roots: Union[PathLike, Sequence[PathLike]],
        layout: Union[str, Sequence[str]] = "auto",
        split: str = "train",
        transform: Optional[Callable[[np.ndarray, np.ndarray], Tuple[Any, Any]]] = None,
        image_size: Optional[int] = None,
        *,
        mask_suffixes: Sequence[str] = DEFAULT_MASK_SUFFIXES,
        strict: bool = False,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        roots = [root_or_roots] if isinstance(root_or_roots, (str, Path)) else list(root_or_roots)
        if not roots:
            raise ValueError("root_or_roots is empty; pass a dataset folder or a list of them")
        layouts = [layout] * len(roots) if isinstance(layout, str) else list(layout)
        if len(layouts) != len(roots):
            raise ValueError(
                f"got {len(roots)} roots but {len(layouts)} layouts; pass one layout per root or a single string"
            )
        _check_split(split)
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"image_size={image_size!r} must be a positive int (or None to keep file sizes)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1); e.g. 0.2 holds out 20 %")
        if transform is not None and not callable(transform):
            raise ValueError(
                f"transform must be callable (image, mask) -> (image, mask), got {type(transform).__name__}"
            )
        self.transform = transform
        self.image_size = image_size
        self.split = split
        self.pairs: List[Tuple[Path, Path]] = []
        self.unpaired_images: List[Path] = []
        self.unpaired_masks: List[Path] = []
        self.layouts: List[str] = []
        looked: List[str] = []
        held_out_split = False
        for root, lay in zip(roots, layouts):
            _check_root(root)
            name = detect_layout(root) if lay == "auto" else lay
            if name not in LAYOUTS:
                raise ValueError(f"layout={name!r} is unknown; use 'auto' or one of {sorted(LAYOUTS)}")
            native = LAYOUTS[name].test is not None
            self.layouts.append(name)
            held_out_split = held_out_split or not native
            if native:
                wanted = ["train", "test"] if split == "all" else ([split] if split == "train" else ["test"])
            else:
                wanted = ["train"]
            for sp in wanted:
                _, idir, mdir, _ = _resolve(root, name, sp)
                pairs, lone_i, lone_m = pair_by_stem(idir, mdir, mask_suffixes)
                if not native and split != "all":
                    tr, va = split_names([p[0].name for p in pairs], val_fraction, seed)
                    keep = set(tr if split == "train" else va)
                    pairs = [p for p in pairs if p[0].name in keep]
                looked.append(
                    f"'{idir}' + '{mdir}' (layout {name}, {len(list_images(idir))} images, "
                    f"{len(list_images(mdir))} masks)"
                )
                self.pairs.extend(pairs)
                self.unpaired_images.extend(lone_i)
                self.unpaired_masks.extend(lone_m)
        if self.unpaired_images:
            shown = ", ".join(p.name for p in self.unpaired_images[:5])
            more = f" and {len(self.unpaired_images) - 5} more" if len(self.unpaired_images) > 5 else ""
            msg = (
                f"{len(self.unpaired_images)} image(s) have no mask: {shown}{more}; masks are matched by "
                f"file stem plus one of the suffixes {list(mask_suffixes)} - rename the masks or pass mask_suffixes"
            )
            if strict:
                raise UnpairedFilesError(msg)
            warnings.warn(msg, stacklevel=2)
        if not self.pairs:
            extra = ""
            if split in ("val", "test") and val_fraction == 0 and held_out_split:
                extra = " (val_fraction=0 holds out no images; pass val_fraction > 0)"
            raise EmptyDatasetError(
                f"no image/mask pairs for split '{split}'{extra}; looked in: " + "; ".join(looked)
                + f". Images need one of the extensions {list(IMAGE_EXTENSIONS)} and a mask with the same stem"
            )
        self._warned_size = False

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray, str]:
        """Read pair ``index`` without transform: ``(image uint8 HxWx3, mask bool HxW, name)``.

        Args:
            index: position in the dataset.

        Example:
            >>> # ds = FolderDataset("data/kvasir"); image, mask, name = ds.load(0)
        """
        img_path, mask_path = self.pairs[index]
        image = read_image(img_path)
        mask = read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            if not self._warned_size:
                warnings.warn(
                    f"mask '{mask_path.name}' is {mask.shape[1]}x{mask.shape[0]} but image '{img_path.name}' is "
                    f"{image.shape[1]}x{image.shape[0]}; resizing the mask (nearest). Further cases are not reported",
                    stacklevel=2,
                )
                self._warned_size = True
            mask = cv2.resize(
                mask.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST
            ).astype(bool)
        if self.image_size is not None:
            image, mask = _resize_longest(image, mask, self.image_size)
        return image, mask, img_path.stem

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        image, mask, name = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": name}


# ----------------------------------------------------------------------------- SAM batching
def _preprocess_shape(h: int, w: int, long_side: int) -> Tuple[int, int]:
    """Same rounding as ``sam_core.transforms.ResizeLongestSide.get_preprocess_shape``."""
    scale = long_side * 1.0 / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def _as_hwc_uint8(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[2] not in (1, 3):
            t = t.permute(1, 2, 0)
        arr = t.numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"image must be H x W x 3 (or 3 x H x W tensor), got shape {tuple(arr.shape)}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(arr.max()) <= 1.0:
            raise ValueError(
                "image is float in [0, 1]; SAM batches expect 0..255 pixel values - pass uint8 or multiply by 255"
            )
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _as_hw_mask(mask: Any, shape: Tuple[int, int]) -> np.ndarray:
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    arr = np.squeeze(arr)
    if arr.ndim != 2 or arr.shape != shape:
        raise ValueError(f"mask shape {tuple(np.shape(mask))} does not match the image's {shape}; pass an H x W mask")
    return arr.astype(np.float32)


def sam_resize_pad(image: Any, mask: Any = None, image_size: int = 1024) -> Dict[str, torch.Tensor]:
    """SAM pre-processing of one pair: resize longest side to ``image_size``, zero-pad bottom/right to square.

    The image keeps 0..255 values (float32, normalisation is the model's job)
    and is resized with PIL bilinear like ``sam_core.transforms.ResizeLongestSide``;
    the mask is resized with nearest neighbour.

    Args:
        image: H x W x 3 uint8 array (or 3 x H x W / H x W x 3 tensor of 0..255 values).
        mask: optional H x W mask (bool or 0/1).
        image_size: side of the square output.

    Returns:
        dict with ``"image"`` float32 (3, S, S), ``"mask"`` float32 (1, S, S)
        (only if a mask was given), ``"original_size"`` int64 (2,) = (H, W) of
        the input and ``"input_size"`` int64 (2,) = (h, w) of the unpadded resized image.

    Example:
        >>> import numpy as np
        >>> out = sam_resize_pad(np.zeros((50, 100, 3), np.uint8), np.ones((50, 100), bool), 64)
        >>> tuple(out["image"].shape), out["input_size"].tolist(), float(out["mask"][0, 40, 10])
        ((3, 64, 64), [32, 64], 0.0)
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int (SAM uses 1024)")
    img = _as_hwc_uint8(image)
    h, w = img.shape[:2]
    nh, nw = _preprocess_shape(h, w, image_size)
    if (nh, nw) != (h, w):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out_img = torch.zeros(3, image_size, image_size, dtype=torch.float32)
    out_img[:, :nh, :nw] = torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1).float()
    out: Dict[str, torch.Tensor] = {
        "image": out_img,
        "original_size": torch.tensor([h, w], dtype=torch.int64),
        "input_size": torch.tensor([nh, nw], dtype=torch.int64),
    }
    if mask is not None:
        m = _as_hw_mask(mask, (h, w))
        if (nh, nw) != (h, w):
            m = cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST)
        out_mask = torch.zeros(1, image_size, image_size, dtype=torch.float32)
        out_mask[0, :nh, :nw] = torch.from_numpy(np.require(m, requirements=["C", "W"]))
        out["mask"] = out_mask
    return out


class TransformedDataset(Dataset):
    """Wrap a dataset of ``{"image", "mask", "name"}`` items into SAM-ready tensors.

    Item ``i`` is ``dataset[i]``, then ``transform(image, mask)`` if given, then
    :func:`sam_resize_pad`; the result has ``"image"`` (3, S, S) float32 0..255,
    ``"mask"`` (1, S, S) float32 0/1, ``"original_size"``, ``"input_size"`` and
    ``"name"``.  Batch with :func:`collate_batch` (or the default collate).

    Args:
        dataset: a :class:`FolderDataset`, ``SyntheticDataset`` or anything with the same items.
        image_size: square side S.
        transform: optional ``(image, mask) -> (image, mask)`` applied before resizing.

    Example:
        >>> import numpy as np
        >>> base = [{"image": np.zeros((10, 20, 3), np.uint8), "mask": np.ones((10, 20), bool), "name": "x"}]
        >>> ds = TransformedDataset(base, image_size=32)
        >>> tuple(ds[0]["mask"].shape), ds[0]["input_size"].tolist()
        ((1, 32, 32), [16, 32])
    """

    def __init__(self, dataset: Any, image_size: int = 1024, transform: Optional[Callable] = None) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive int (SAM uses 1024)")
        if transform is not None and not callable(transform):
            raise ValueError("transform must be callable (image, mask) -> (image, mask)")
        self.dataset = dataset
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.dataset[index]
        image, mask = item["image"], item["mask"]
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        out: Dict[str, Any] = dict(sam_resize_pad(image, mask, self.image_size))
        out["name"] = item.get("name", str(index))
        return out


def collate_batch(batch: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack items of :class:`TransformedDataset`: tensors are stacked, other values become lists.

    Args:
        batch: list of item dicts with equal keys and equal tensor shapes.

    Returns:
        dict: ``image`` (B, 3, S, S), ``mask`` (B, 1, S, S), ``original_size`` and
        ``input_size`` (B, 2), ``name`` list of B strings.

    Example:
        >>> import numpy as np
        >>> items = [sam_resize_pad(np.zeros((4, 8, 3), np.uint8), np.zeros((4, 8)), 16) for _ in range(2)]
        >>> tuple(collate_batch(items)["image"].shape)
        (2, 3, 16, 16)
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch; check the dataset length and batch_size")
    keys = list(batch[0].keys())
    out: Dict[str, Any] = {}
    for k in keys:
        vals = [b[k] for b in batch]
        if all(isinstance(v, torch.Tensor) for v in vals):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) != 1:
                raise ValueError(
                    f"cannot stack '{k}' of shapes {sorted(shapes)}; resize items to one size first "
                    "(use SamCollate / TransformedDataset with image_size)"
                )
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out


class SamCollate:
    """``collate_fn`` for raw ``{"image", "mask", "name"}`` items of any sizes.

    Applies :func:`sam_resize_pad` to each item (items that are already
    preprocessed, i.e. have ``"input_size"``, pass through) and stacks them with
    :func:`collate_batch`.

    Args:
        image_size: square side S of the batch.

    Example:
        >>> import numpy as np
        >>> items = [{"image": np.zeros((h, 30, 3), np.uint8), "mask": np.zeros((h, 30), bool), "name": str(h)}
        ...          for h in (10, 60)]
        >>> b = SamCollate(64)(items); tuple(b["image"].shape), b["input_size"].tolist()
        ((2, 3, 64, 64), [[21, 64], [64, 32]])
    """

    def __init__(self, image_size: int = 1024) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size={image_size!r} must be a positive int (SAM uses 1024)")
        self.image_size = image_size

    def __call__(self, batch: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        items = []
        for i, it in enumerate(batch):
            if "input_size" in it:
                items.append(it)
                continue
            out: Dict[str, Any] = dict(sam_resize_pad(it["image"], it.get("mask"), self.image_size))
            out["name"] = it.get("name", str(i))
            items.append(out)
        return collate_batch(items)
