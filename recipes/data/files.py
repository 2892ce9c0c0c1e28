"""Reading image and mask files, listing image folders and pairing images with masks by file stem.

`read_image` always returns `uint8` H x W x 3 RGB and `read_mask` always returns `bool` H x W,
whatever the file holds (gray, gray+alpha, RGBA, palette, 1-bit, 16-bit PNG/TIFF, 32-bit int or
float TIFF). Files are decoded with Pillow; 16-bit colour images (which Pillow truncates to 8 bits)
and TIFFs Pillow cannot decode are decoded with OpenCV instead. EXIF orientation is *not* applied:
dataset masks are stored in the raw pixel order of their images, so rotating only one of the two
would misalign them.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MASK_SUFFIXES",
    "read_image",
    "read_mask",
    "list_images",
    "pair_by_stem",
]

PathLike = Union[str, Path]

# Extensions (lower case) recognised as images; matching is case-insensitive.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Suffixes tried after an image stem to find its mask, in order of preference.
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


def exif_orientation(path: PathLike) -> int:
    """The EXIF orientation tag (1..8) of an image file; 1 (as stored) when it has none or is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                v = im.getexif().get(0x0112, 1)
    except Exception:  # not Pillow's format: no EXIF to honour
        return 1
    return v if isinstance(v, int) and 1 <= v <= 8 else 1


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """`arr` (H x W[ x C]) turned the way EXIF `orientation` says a viewer shows it: the transform of
    `PIL.ImageOps.exif_transpose`, on arrays of any dtype (16-bit, masks, what OpenCV decoded).

    Example:
        >>> a = np.arange(6).reshape(2, 3)
        >>> apply_orientation(a, 6).tolist()  # 6: the camera was turned 90 degrees clockwise
        [[3, 0], [4, 1], [5, 2]]
    """
    ops = {
        2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops[orientation](arr)) if orientation in ops else arr


def _decode(path: PathLike) -> np.ndarray:
    """Decode a file to H x W, H x W x 2 (gray+alpha), H x W x 3 (RGB) or H x W x 4 (RGBA), turned as
    its EXIF orientation says (what a viewer shows, and what `samadapt serve` reads from an upload).

    The dtype is bool (1-bit), uint8, uint16, int32 or float32.
    """
    return apply_orientation(_decode_stored(path), exif_orientation(path))


def _decode_stored(path: PathLike) -> np.ndarray:
    """`_decode` without the EXIF orientation: the pixels as stored."""
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
    """Scale any numeric array to uint8 (see `read_image` for the rules)."""
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
    """Read any image file as `uint8` H x W x 3 RGB.

    Conversions: gray -> replicated to 3 channels; palette -> its RGB colours;
    1-bit -> 0/255.  16-bit data is scaled to 8 bits with `depth16`:
    `"shift"` (default, `value >> 8`: content-independent, so the same raw
    value always gives the same pixel) or `"max"` (`value * 255 / image
    max`: stretches images that only use part of the 16-bit range, e.g. 12-bit
    sensors).  32-bit integer data within 0..65535 is treated as 16-bit; float
    data in [0, 1] is multiplied by 255, other float/int data is min-max
    stretched.  An alpha channel is composited on black (`alpha="composite"`:
    transparent pixels become black) or ignored (`alpha="drop"`).

    Args:
        path: image file (.jpg .jpeg .png .bmp .tif .tiff and anything else Pillow or OpenCV read).
        depth16: `"shift"` or `"max"`, how 16-bit values are brought to 0..255.
        alpha: `"composite"` or `"drop"`.

    Returns:
        `np.ndarray` uint8 of shape (H, W, 3), RGB order.

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
    """Read any mask file as `bool` H x W.

    Rules: 8-bit values are foreground when `> 127`; 16-bit values when
    `> 32767` (half range); 1-bit as is; float data when `> 0.5` (if it lies
    in [0, 1]); colour (RGB or palette, via its colours) masks when *any*
    channel is `> 127`.  A mask whose values are only 0 and 1 is a label map
    and is read as `value == 1` (the `> 127` rule would make it empty).
    With an alpha channel the colour channels are used, unless they are uniform
    while alpha varies (a mask drawn as transparency), then alpha is used.
    JPEG masks work: compression noise stays on its side of the threshold.

    Args:
        path: mask file.

    Returns:
        `np.ndarray` bool of shape (H, W).

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
    """Image files directly inside `folder`, sorted by name; hidden files (`.x`, `._x`) skipped.

    Args:
        folder: directory to list (not recursive).
        extensions: accepted extensions, compared case-insensitively.

    Returns:
        sorted list of paths.

    Raises:
        FileNotFoundError: `folder` does not exist or is not a directory.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.PNG").write_bytes(b""); _ = (d / "b.txt").write_bytes(b"")
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

    An image `foo.jpg` is paired with the mask whose stem is `foo + suffix`
    for the first suffix in `mask_suffixes` that exists (`foo.png`,
    `foo_mask.png`, ...).  Stems are compared case-insensitively, extensions
    are any of `IMAGE_EXTENSIONS` in any case; when several mask files fit
    (`foo.png` and `foo.jpg`) the lossless one is preferred.  Hidden files are
    ignored.  `image_dir` and `mask_dir` may be the same folder (masks named
    with a suffix next to their images): files that are taken as masks are then
    not listed as images.

    Args:
        image_dir: folder of images.
        mask_dir: folder of masks.
        mask_suffixes: suffixes tried after the image stem, in order.

    Returns:
        `(pairs, unpaired_images, unpaired_masks)`: `pairs` is a list of
        `(image_path, mask_path)` sorted by image name; the two others list the
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

