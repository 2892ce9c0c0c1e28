"""A recipe's data pipeline: the (train, eval) datasets of SAM-ready items it names, and their batching.

Shared by `samadapt train` and `samadapt eval`.
"""
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.utils.data import Dataset

from ..errors import RecipeError, UserError
from .datasets import sam_resize_pad


class AugmentedItems(Dataset):
    """SAM-ready items of a raw dataset, augmented with a seed derived from (seed, epoch, index): the
    same item of the same epoch is augmented the same way in every process and after a resume.

    Args:
        base: a dataset of `{"image", "mask", "name"}` items.
        aug: an augmentation from `augment.build_augmentation` (None: none).
        image_size: the core's input side.
        seed: the run's seed.
        dtype: the items' image and mask dtype (`sam_resize_pad`): uint8 for training batches.
    """

    def __init__(self, base, aug, image_size: int, seed: int, dtype: torch.dtype = torch.float32) -> None:
        self.base, self.aug, self.image_size, self.seed, self.epoch = base, aug, image_size, seed, 0
        self.dtype = dtype

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        image, mask = item["image"], item["mask"]
        if self.aug is not None:
            self.aug.reseed((self.seed * 1_000_003 + self.epoch * 10_007 + i) % (2**31))
            image, mask = self.aug(image, mask)
        out = dict(sam_resize_pad(image, mask, self.image_size, dtype=self.dtype))
        out["name"] = item.get("name", str(i))
        return out


class IndexedDataset(Dataset):
    """Adds each item's dataset index (`index`, a tensor) so gathered metrics and overlays know it."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item["index"] = torch.tensor(i)
        return item


def build_datasets(cfg: Dict[str, Any], image_size: int, data_root=None):
    """The (train, eval) datasets of SAM-ready items a recipe names: folders or a synthetic domain.

    Args:
        cfg: the validated recipe.
        image_size: the core's input side.
        data_root: the CLI's `--data` folder(s), overriding `data.root`.

    Returns:
        `(train, eval)`, both `AugmentedItems` (only train is augmented; its images and masks are
        uint8, the same values as eval's float32 ones, cast on the device).

    Raises:
        RecipeError: no data is named.

    Example:
        >>> from samadapt.recipes.config import load_recipe
        >>> cfg = load_recipe("demo", ["data.synthetic_train_size=2", "data.synthetic_eval_size=1"])
        >>> [len(d) for d in build_datasets(cfg, 64)]
        [2, 1]
    """
    from . import FolderDataset, SyntheticDataset
    from .augment import DOMAINS, build_augmentation

    d = cfg["data"]
    root = data_root or d["root"]
    domain = cfg["augment"]["domain"] or cfg["domain"] or "generic"
    seed = cfg["train"]["seed"]
    if root:
        common = dict(layout=d["layout"], strict=d["strict"], val_fraction=d["val_fraction"], seed=seed)
        try:
            train_raw = FolderDataset(root, split=d["train_split"], **common)
            eval_raw = FolderDataset(root, split=d["eval_split"], **common)
        except ValueError as e:  # a folder the layouts do not know, a split it lacks: the user's data
            if isinstance(e, UserError):  # already says what to do (empty folder, unpaired files)
                raise
            raise RecipeError(f"data: {str(e).splitlines()[0]}") from None
    elif d["synthetic"]:
        s = d["synthetic_image_size"]
        # the training images are read again every epoch: keep up to 512 MB of them
        train_raw = SyntheticDataset(d["synthetic"], size=d["synthetic_train_size"], image_size=s, seed=seed,
                                     cache_mb=512)
        eval_raw = SyntheticDataset(d["synthetic"], size=d["synthetic_eval_size"], image_size=s, seed=seed + 10_000)
    else:
        raise RecipeError("no data: pass --data DIR, set data.root, or set data.synthetic to a synthetic domain")
    aug = None
    if cfg["augment"]["enabled"]:
        aug = build_augmentation(domain if domain in DOMAINS else "generic", image_size, train=True)
    return (AugmentedItems(train_raw, aug, image_size, seed, dtype=torch.uint8),
            AugmentedItems(eval_raw, None, image_size, seed))


def describe_datasets(cfg: Dict[str, Any], train_ds, eval_ds, data_root=None) -> List[str]:
    """Lines saying how many train and eval images a run uses and where they came from.

    Args:
        cfg: the validated recipe.
        train_ds: the train dataset `build_datasets` returned.
        eval_ds: its eval dataset.
        data_root: the `--data` folder(s), if given.

    Returns:
        One line for each split, plus a warning line when the eval split is too small to trust.

    Example:
        >>> from samadapt.recipes.config import load_recipe
        >>> cfg = load_recipe("demo", ["data.synthetic_train_size=3", "data.synthetic_eval_size=2"])
        >>> tr, ev = build_datasets(cfg, 64)
        >>> print(describe_datasets(cfg, tr, ev)[0])
        data: 3 train images, synthetic camouflage (data.synthetic_train_size)
    """
    from .layouts import LAYOUTS

    d = cfg["data"]
    n_tr, n_ev = len(train_ds), len(eval_ds)
    lines = []
    root = data_root or d["root"]
    if root:
        roots = [root] if isinstance(root, (str, Path)) else list(root)
        layouts = getattr(getattr(train_ds, "base", None), "layouts", None) or ["?"] * len(roots)
        where = ", ".join(f"{r} (layout {lay})" for r, lay in zip(roots, layouts))
        lines.append(f"data: {n_tr} train images from {where}, split {d['train_split']!r}")
        held = [lay for lay in layouts if lay in LAYOUTS and LAYOUTS[lay].test is None]
        how = (f"held out of the same folder(s): data.val_fraction={d['val_fraction']}, seed {cfg['train']['seed']}"
               if held else f"the layout's own {d['eval_split']!r} split")
        lines.append(f"data: {n_ev} eval images, {how}")
    else:
        lines.append(f"data: {n_tr} train images, synthetic {d['synthetic']} (data.synthetic_train_size)")
        lines.append(f"data: {n_ev} eval images, synthetic {d['synthetic']} (data.synthetic_eval_size, other seeds)")
    if n_ev < 5:
        lines.append(f"warning: only {n_ev} eval image(s): its metrics are noise; add images, raise "
                     "data.val_fraction, or give a folder with a test split")
    return lines


def build_keep_prompts_data(cfg: Dict[str, Any], image_size: int):
    """The SAM-ready items of `prompts.keep_prompts_data` (None for `"self"`): a synthetic domain
    (as many images as the training set, their own seed) or a folder (every image in it).

    Example:
        >>> from samadapt.recipes.config import load_recipe
        >>> cfg = load_recipe("demo", ["prompts.keep_prompts=0.5", "prompts.keep_prompts_data=objects",
        ...                            "data.synthetic_train_size=3"])
        >>> len(build_keep_prompts_data(cfg, 64))
        3
    """
    from . import FolderDataset, SyntheticDataset
    from .synthetic import SYNTHETIC_DOMAINS

    src = cfg["prompts"]["keep_prompts_data"]
    d, seed = cfg["data"], cfg["train"]["seed"]
    if src == "self":
        return None
    if src in SYNTHETIC_DOMAINS:
        raw = SyntheticDataset(src, size=d["synthetic_train_size"], image_size=d["synthetic_image_size"],
                               seed=seed + 20_000, cache_mb=256)
    else:
        from pathlib import Path

        if not Path(src).is_dir():
            raise RecipeError(f"prompts.keep_prompts_data={src!r} is neither 'self', a synthetic domain "
                              f"{list(SYNTHETIC_DOMAINS)} nor a folder; pass a folder of images/ and masks/")
        raw = FolderDataset(src, split="all", layout="auto", strict=d["strict"], seed=seed)
    return AugmentedItems(raw, None, image_size, seed)
