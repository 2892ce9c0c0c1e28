"""Datasets of image/mask pairs and SAM batching.

`FolderDataset` reads pairs from one or several dataset roots (layouts from `layouts`, files
from `files`). `sam_resize_pad` turns one pair into what `Sam.forward_masks` expects: float pixels
0..255, longest side resized to `image_size` and zero-padded at the bottom/right to a square;
normalisation is left to the model. `collate_batch` stacks such items.

One longest-side rule everywhere: `resize_longest` uses `ResizeLongestSide.get_preprocess_shape`
and `ResizeLongestSide.apply_image` (PIL bilinear) of `sam_core.transforms`, so a training image
has exactly the shape the predictor gives the same image at inference.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from samadapt.sam_core.transforms import ResizeLongestSide

from ..errors import EmptyDatasetError, UnpairedFilesError
from .files import DEFAULT_MASK_SUFFIXES, IMAGE_EXTENSIONS, list_images, pair_by_stem, read_image, read_mask
from .layouts import LAYOUTS, _check_root, _check_split, _resolve, detect_layout, split_names

__all__ = ["FolderDataset", "resize_longest", "sam_resize_pad", "collate_batch"]

PathLike = Union[str, Path]


def resize_longest(image: np.ndarray, mask: Any = None, size: int = 1024) -> Tuple[np.ndarray, Any]:
    """Resize so the longest side is `size`, by SAM's rule (the one rule of the data pipeline).

    The shape is `ResizeLongestSide.get_preprocess_shape` and the image is resized by
    `ResizeLongestSide.apply_image` (PIL bilinear, the filter SAM was trained with), so a training
    image has the shape the predictor gives the same image. The mask is resized with nearest
    neighbour and keeps its dtype. A side that SAM's rounding would make 0 pixels (an image over
    `2 * size` times longer than wide) is kept at 1 pixel.

    Args:
        image: H x W x 3 uint8 array.
        mask: optional H x W mask (bool, integer or float).
        size: longest side after resizing.

    Returns:
        `(image, mask)` resized (the inputs themselves when the size is already right).

    Example:
        >>> import numpy as np
        >>> im, m = resize_longest(np.zeros((33, 77, 3), np.uint8), np.ones((33, 77), bool), 64)
        >>> im.shape, m.shape, m.dtype
        ((27, 64, 3), (27, 64), dtype('bool'))
    """
    h, w = image.shape[:2]
    rule = ResizeLongestSide.get_preprocess_shape(h, w, size)
    nh, nw = max(1, rule[0]), max(1, rule[1])
    if (nh, nw) == (h, w):
        return image, mask
    if min(rule) >= 1:
        image = ResizeLongestSide(size).apply_image(np.ascontiguousarray(image))
    else:  # why: apply_image would ask PIL for a 0-pixel side
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.BILINEAR))
    if mask is not None:
        m = np.asarray(mask)
        small = m.astype(np.uint8) if m.dtype == bool else m
        small = cv2.resize(np.ascontiguousarray(small), (nw, nh), interpolation=cv2.INTER_NEAREST)
        mask = small.astype(bool) if m.dtype == bool else small
    return image, mask


class FolderDataset(Dataset):
    """Image/mask pairs from one or several dataset roots.

    Each item is `{"image": uint8 H x W x 3 RGB, "mask": bool H x W, "name": stem}`;
    with `transform` the pair is passed through `transform(image, mask)` and
    whatever it returns (arrays or tensors) is stored under the same keys.
    Masks whose size differs from their image are resized (nearest) to it with
    a warning.  Images without a mask are listed in a warning (and kept in
    `unpaired_images`); `strict=True` makes that an error.

    Splits: for layouts with a test split, `"val"` and `"test"` are the test
    folders and `"all"` joins train and test.  For layouts without one,
    `"train"` and `"val"`/`"test"` are complementary deterministic subsets
    (see `split_names`, `val_fraction` and `seed`) and `"all"` is
    everything.

    Args:
        root_or_roots: a dataset root or a list of roots (e.g. COD10K and CAMO trained together).
        layout: `"auto"`, a name from `LAYOUTS`, or a list with one entry per root.
        split: `"train"`, `"val"`, `"test"` or `"all"`.
        transform: optional callable `(image, mask) -> (image, mask)`, e.g. from
            `build_augmentation`.
        image_size: optional; resize (before `transform`) so the longest side is this many
            pixels, keeping the aspect ratio: `resize_longest` (SAM's rule; no padding).
        mask_suffixes: see `pair_by_stem`.
        strict: raise `UnpairedFilesError` when an image has no mask.
        val_fraction: held-out fraction for layouts without a test split.
        seed: seed of that hold-out.

    Raises:
        FileNotFoundError: a root or its folders are missing.
        EmptyDatasetError: no pair was found (the message says where it looked).
        UnpairedFilesError: `strict` and images without masks.

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
        """Read pair `index` without transform: `(image uint8 HxWx3, mask bool HxW, name)`.

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
            image, mask = resize_longest(image, mask, self.image_size)
        return image, mask, img_path.stem

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        image, mask, name = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": name}


# ----------------------------------------------------------------------------- SAM batching
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
    if arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[1:] == shape:  # not np.squeeze: it flattens 1-row masks
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[2] == 1 and arr.shape[:2] == shape:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.shape != shape:
        raise ValueError(f"mask shape {tuple(np.shape(mask))} does not match the image's {shape}; pass an H x W mask")
    return arr.astype(np.float32)


def sam_resize_pad(image: Any, mask: Any = None, image_size: int = 1024,
                   dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """SAM pre-processing of one pair: longest side to `image_size`, zero-padded bottom/right to a square.

    The resize is `resize_longest` (SAM's rule and filter for the image, nearest neighbour for the
    mask); the image keeps 0..255 values (float32, normalisation is the model's job). This is what
    the trainer applies to every item, after the augmentation; its training items are uint8 (the same
    values, a quarter of the bytes to batch, pin and copy to the device).

    Args:
        image: H x W x 3 uint8 array (or 3 x H x W / H x W x 3 tensor of 0..255 values).
        mask: optional H x W mask (bool or 0/1).
        image_size: side of the square output.
        dtype: the image's and mask's dtype, `torch.float32` or `torch.uint8` (the resized pixels and
            the 0/1 mask are whole numbers either way).

    Returns:
        dict with `"image"` float32 (or `dtype`) (3, S, S), `"mask"` float32 (or `dtype`) (1, S, S) (only if a mask was
        given), `"original_size"` int64 (2,) = (H, W) of the input and `"input_size"` int64 (2,) =
        (h, w) of the unpadded resized image.

    Raises:
        ValueError: `image_size` is not a positive int, the image is not H x W x 3 (or is float in
            [0, 1]), or the mask's shape differs from the image's.

    Example:
        >>> import numpy as np
        >>> out = sam_resize_pad(np.zeros((50, 100, 3), np.uint8), np.ones((50, 100), bool), 64)
        >>> tuple(out["image"].shape), out["input_size"].tolist(), float(out["mask"][0, 40, 10])
        ((3, 64, 64), [32, 64], 0.0)
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int (SAM uses 1024)")
    if dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"dtype={dtype} must be torch.float32 or torch.uint8")
    img = _as_hwc_uint8(image)
    h, w = img.shape[:2]
    m = None if mask is None else _as_hw_mask(mask, (h, w))
    img, m = resize_longest(img, m, image_size)
    nh, nw = img.shape[:2]
    out_img = torch.zeros(3, image_size, image_size, dtype=dtype)
    out_img[:, :nh, :nw] = torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1)
    out: Dict[str, torch.Tensor] = {
        "image": out_img,
        "original_size": torch.tensor([h, w], dtype=torch.int64),
        "input_size": torch.tensor([nh, nw], dtype=torch.int64),
    }
    if m is not None:
        out_mask = torch.zeros(1, image_size, image_size, dtype=dtype)
        out_mask[0, :nh, :nw] = torch.from_numpy(np.require(m, requirements=["C", "W"]))
        out["mask"] = out_mask
    return out


def collate_batch(batch: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack items of `sam_resize_pad` (plus their `"name"`): tensors are stacked, other values become lists.

    Args:
        batch: list of item dicts with equal keys and equal tensor shapes.

    Returns:
        dict: `image` (B, 3, S, S), `mask` (B, 1, S, S), `original_size` and `input_size` (B, 2),
        `name` list of B strings.

    Raises:
        ValueError: the batch is empty, or a tensor's shape differs between items.

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
                    "(pass each item through sam_resize_pad with one image_size)"
                )
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out
