"""Per-domain augmentation pipelines (albumentations 2.x) as `(image, mask) -> (image, mask)` callables.

Every pipeline first resizes so the longest side is `image_size` (`datasets.resize_longest`, the
rule and filter of `sam_core.transforms.ResizeLongestSide`, nearest for masks), so the random ops
run at the resolution the model sees and the valid (unpadded) size is the one the predictor uses;
padding to a square is left to `sam_resize_pad`, which records that size. Evaluation pipelines
(`train=False`) only resize.

Domain choices (geometric ops use nearest-neighbour masks and a black/0 fill):

* `camouflage` -- horizontal + vertical flips and `RandomRotate90` (animals
  hide in every orientation), scale 0.75-1.25 / shift 10 % / rotate +-15 deg,
  mild colour jitter with a *tiny* hue range (+-0.02): camouflage is decided by
  subtle colour/texture differences, which blur or noise would erase, so
  neither is used.
* `shadow` -- horizontal flip only, scale 0.8-1.2 / shift 10 % / rotate
  +-10 deg, and photometric changes that are global and monotonic
  (brightness +-0.1, contrast +-0.1, gamma 0.9-1.1, small saturation jitter), so a
  shadow stays darker than the lit surface beside it.  Not used, because they
  break the "darker and bluer" semantics of a shadow: inversion/solarize,
  channel shuffle, gray conversion, hue shifts, CLAHE/equalisation (local
  contrast stretching brightens shadow regions) and vertical flips (light comes
  from above).
* `polyp` -- flips + `RandomRotate90` (endoscopes have no canonical
  orientation), scale 0.75-1.25 / shift 10 % / rotate +-30 deg, brightness and
  contrast +-0.2 with small saturation/hue jitter (tissue colour is a cue), and
  occasional Gaussian blur (defocus and motion blur are common in colonoscopy).
* `generic` / `demo` -- horizontal flip, scale 0.8-1.2 / shift 10 % /
  rotate +-10 deg, moderate colour jitter.

Determinism: `seed` goes to `A.Compose(seed=...)`; the same seed gives the
same sequence of augmentations.  albumentations 2.0 does not reseed per
`DataLoader` worker, so workers would repeat each other's augmentations: pass
`worker_init_fn` to the `DataLoader` (or call `Augmentation.reseed`).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import albumentations as A
import cv2
import numpy as np

from .datasets import resize_longest

__all__ = ["DOMAINS", "Augmentation", "build_augmentation", "worker_init_fn"]

# Domains understood by `build_augmentation`.
DOMAINS: Tuple[str, ...] = ("camouflage", "shadow", "polyp", "generic", "demo")


def _affine(scale: Tuple[float, float], rotate: float, p: float) -> A.BasicTransform:
    return A.Affine(
        scale=scale,
        translate_percent=(-0.1, 0.1),
        rotate=(-rotate, rotate),
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
        p=p,
    )


def _train_ops(domain: str) -> List[A.BasicTransform]:
    if domain == "camouflage":
        return [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            _affine((0.75, 1.25), 15.0, p=0.7),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]
    if domain == "shadow":
        return [
            A.HorizontalFlip(p=0.5),
            _affine((0.8, 1.2), 10.0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            A.RandomGamma(gamma_limit=(90, 110), p=0.3),
            A.HueSaturationValue(hue_shift_limit=0, sat_shift_limit=10, val_shift_limit=0, p=0.3),
        ]
    if domain == "polyp":
        return [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            _affine((0.75, 1.25), 30.0, p=0.7),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.01, p=0.5),
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 1.5), p=0.2),
        ]
    # generic / demo
    return [
        A.HorizontalFlip(p=0.5),
        _affine((0.8, 1.2), 10.0, p=0.5),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.5),
    ]


class Augmentation:
    """Callable `(image, mask) -> (image, mask)` around an `A.Compose`.

    `image` is uint8 H x W x 3; `mask` is H x W (bool or 0/1 ints); the
    returned mask is `bool`, the returned image `uint8`.

    Args:
        compose: the albumentations pipeline (the random ops).
        domain: name, for `repr`.
        image_size: when given, the pair is first resized so its longest side is this many pixels
            (`resize_longest`), before `compose`.

    Example:
        >>> import numpy as np
        >>> aug = build_augmentation("generic", 32, seed=0)
        >>> im, m = aug(np.zeros((20, 40, 3), np.uint8), np.ones((20, 40), bool))
        >>> im.shape, m.dtype
        ((16, 32, 3), dtype('bool'))
    """

    def __init__(self, compose: A.Compose, domain: str = "", image_size: Optional[int] = None) -> None:
        self.compose = compose
        self.domain = domain
        self.image_size = image_size

    def reseed(self, seed: Optional[int]) -> None:
        """Reset the random state (same seed -> same following augmentations).

        Args:
            seed: new seed, or None for a random one.

        Example:
            >>> aug = build_augmentation("polyp", 64); aug.reseed(3)
        """
        self.compose.set_random_seed(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        image = np.asarray(image)
        mask = np.asarray(mask)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image must be H x W x 3, got shape {image.shape}; read it with samadapt.recipes.data.read_image"
            )
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} must equal the image's H x W {image.shape[:2]}")
        if image.dtype != np.uint8:
            raise ValueError(f"image dtype must be uint8 (0..255), got {image.dtype}; convert it first")
        mask = mask > 0
        if self.image_size is not None:
            image, mask = resize_longest(image, mask, self.image_size)
        out = self.compose(image=np.ascontiguousarray(image), mask=mask.astype(np.uint8))
        return out["image"], out["mask"].astype(bool)

    def __repr__(self) -> str:
        return f"Augmentation(domain={self.domain!r}, image_size={self.image_size!r}, compose={self.compose!r})"


def build_augmentation(domain: str, image_size: int, train: bool = True, seed: Optional[int] = None) -> Augmentation:
    """Build the augmentation pipeline of a domain (see the module docstring for the choices).

    Args:
        domain: `"camouflage"`, `"shadow"`, `"polyp"`, `"generic"` or `"demo"`.
        image_size: longest side after the initial resize.
        train: random ops when True; resize only when False.
        seed: makes the sequence of random ops reproducible.

    Returns:
        an `Augmentation`.

    Raises:
        ValueError: unknown domain or bad `image_size`.

    Example:
        >>> import numpy as np
        >>> aug = build_augmentation("shadow", 64, seed=1)
        >>> img, mask = aug(np.full((100, 50, 3), 128, np.uint8), np.zeros((100, 50), bool))
        >>> img.shape, mask.shape
        ((64, 32, 3), (64, 32))
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r} is unknown; use one of {list(DOMAINS)}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive int, e.g. 1024 for SAM")
    ops: List[A.BasicTransform] = _train_ops(domain) if train else []
    return Augmentation(A.Compose(ops, seed=seed, strict=True), domain, image_size=image_size)


def worker_init_fn(worker_id: int) -> None:
    """`DataLoader(worker_init_fn=...)`: give each worker's augmentation its own seed.

    Looks for an `Augmentation` at `dataset.transform` (also through
    `.dataset` wrappers) and reseeds it from torch's per-worker seed, which
    depends on the loader's base seed and the worker id.

    Args:
        worker_id: passed by the DataLoader.

    Example:
        >>> # DataLoader(ds, num_workers=4, worker_init_fn=worker_init_fn)
    """
    import torch.utils.data as tud

    info = tud.get_worker_info()
    if info is None:
        return
    obj: Any = info.dataset
    for _ in range(8):
        tr = getattr(obj, "transform", None)
        if isinstance(tr, Augmentation):
            tr.reseed(int(info.seed % (2**32)))
        if not hasattr(obj, "dataset"):
            break
        obj = obj.dataset
