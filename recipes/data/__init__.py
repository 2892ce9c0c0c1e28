"""Data for the recipes: files, folder layouts, datasets, synthetic domains, augmentation and prompts.

Submodules: `files` (reading images and masks, listing folders, pairing by stem), `layouts` (the
public benchmark trees), `datasets` (`FolderDataset`, SAM resizing and batching), `synthetic`
(generated domains), `augment` (albumentations pipelines per domain) and `prompts` (boxes, points,
correction clicks). The names below are the package's public surface; the augmentation names are
imported on first use, so reading data does not pay for importing albumentations.

Example:
    >>> from samadapt.recipes.data import SyntheticDataset, sam_resize_pad
    >>> item = SyntheticDataset("generic", size=1, image_size=32)[0]
    >>> sam_resize_pad(item["image"], item["mask"], 64)["input_size"].tolist()
    [64, 64]
"""
from typing import Any, List

from .datasets import FolderDataset, collate_batch, resize_longest, sam_resize_pad
from .files import DEFAULT_MASK_SUFFIXES, IMAGE_EXTENSIONS, list_images, pair_by_stem, read_image, read_mask
from .layouts import LAYOUTS, detect_layout, resolve_layout, split_names
from .prompts import (
    PROMPT_MODES,
    PromptSampler,
    append_correction_clicks,
    box_from_mask,
    correction_click,
    pad_points,
    sample_points,
)
from .synthetic import SYNTHETIC_DOMAINS, SyntheticDataset, make_sample, write_synthetic_folder

# why lazy: albumentations takes about half a second to import; `samadapt serve`/`predict` never augment.
_AUGMENT = {"AUGMENT_DOMAINS": "DOMAINS", "Augmentation": "Augmentation", "build_augmentation": "build_augmentation",
            "worker_init_fn": "worker_init_fn"}

__all__ = [
    "IMAGE_EXTENSIONS", "DEFAULT_MASK_SUFFIXES", "read_image", "read_mask", "list_images", "pair_by_stem",
    "LAYOUTS", "detect_layout", "resolve_layout", "split_names",
    "FolderDataset", "resize_longest", "sam_resize_pad", "collate_batch",
    "SYNTHETIC_DOMAINS", "SyntheticDataset", "make_sample", "write_synthetic_folder",
    "PROMPT_MODES", "PromptSampler", "append_correction_clicks", "box_from_mask", "correction_click", "pad_points",
    "sample_points",
    *_AUGMENT,
]


def __getattr__(name: str) -> Any:
    if name in _AUGMENT:
        from . import augment

        return getattr(augment, _AUGMENT[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_AUGMENT))
