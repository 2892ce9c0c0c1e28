"""Adaptation against its baselines, on the same held-out images: the frozen core, a fixed prior (the
mean training mask), the decoder fine-tuned alone, each adapter kind, and the whole core fine-tuned.

`samadapt demo` prints four of these rows; `benchmarks/adaptation.py` runs them all over domains
and seeds. Every row is scored by the same code from probability maps, so the rows compare.
"""
import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from samadapt import adapters

from .config import load_recipe
from .data.datasets import sam_resize_pad
from .metrics import MetricSuite
from .rundir import clear_run

# Each method's recipe changes (dotted keys). Every adapter kind trains with its own copy of the
# decoder, as SAM-Adapter does; "decoder-only" is that decoder alone, so what the encoder kinds add
# shows against it. None: nothing is trained.
COMBINED = [
    {"kind": "sam_adapter", "scale_factor": 4},
    {"kind": "bottleneck", "width": 48},
    {"kind": "lora", "r": 8, "targets": ["qkv", "proj"]},
]
METHODS: Dict[str, Optional[Dict[str, Any]]] = {
    "frozen": None,
    "prior": None,
    "decoder-only": {"adapter.kinds": [], "adapter.decoder": "full"},
    "lora": {"adapter.kinds": [{"kind": "lora", "r": 8, "targets": ["qkv", "proj"]}], "adapter.decoder": "full"},
    "dora": {"adapter.kinds": [{"kind": "lora", "r": 8, "targets": ["qkv", "proj"], "use_dora": True}],
             "adapter.decoder": "full"},
    "sam_adapter": {"adapter.kinds": [COMBINED[0]], "adapter.decoder": "full"},
    "bottleneck": {"adapter.kinds": [COMBINED[1]], "adapter.decoder": "full"},
    "combined": {"adapter.kinds": COMBINED, "adapter.decoder": "full"},
    # promptless recipes only: half of the batches are prompted generic scenes, so prompts keep working
    "combined + keep prompts": {"adapter.kinds": COMBINED, "adapter.decoder": "full", "prompts.keep_prompts": 0.5,
                                "prompts.keep_prompts_data": "objects"},
    # the whole core at a tenth of the adapters' rate (at theirs, 3e-3, it collapsed to empty masks)
    "full fine-tune": {"adapter.kinds": [], "train.full_core": True, "train.lr": 3e-4},
}


def method_recipe(cfg: Dict[str, Any], method: str) -> Dict[str, Any]:
    """`cfg` with `method`'s changes applied and validated again.

    Args:
        cfg: a validated recipe (the domain's).
        method: a key of `METHODS` that trains something.

    Example:
        >>> cfg = method_recipe(load_recipe("demo"), "decoder-only")
        >>> cfg["adapter"]["kinds"], cfg["adapter"]["decoder"]
        ([], 'full')
    """
    if METHODS.get(method) is None:
        raise ValueError(f"method {method!r} trains nothing or is unknown; use one of "
                         f"{[m for m, v in METHODS.items() if v is not None]}")
    raw = copy.deepcopy(cfg)
    for key, value in METHODS[method].items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = copy.deepcopy(value)
    return load_recipe(raw)


def fixed_prior(train_raw, image_size: int) -> np.ndarray:
    """The mean training mask in the core's padded input frame: the best single guess that ignores
    the image. It is computed from `train_raw`'s masks alone (no evaluation image is read).

    Args:
        train_raw: a dataset of `{"image", "mask"}` items (unaugmented; e.g. `SyntheticDataset`).
        image_size: the core's input side.

    Returns:
        float64 `image_size x image_size` map in [0, 1].

    Example:
        >>> from samadapt.recipes.data import SyntheticDataset
        >>> p = fixed_prior(SyntheticDataset("camouflage", 4, 64), 64)
        >>> p.shape, bool(0 <= p.min() <= p.max() <= 1)
        ((64, 64), True)
    """
    acc = np.zeros((image_size, image_size), np.float64)
    for i in range(len(train_raw)):
        item = train_raw[i]
        acc += sam_resize_pad(item["image"], item["mask"], image_size)["mask"][0].numpy()
    return acc / max(1, len(train_raw))


@torch.no_grad()
def predict_eval(sam, eval_items, cfg: Dict[str, Any], adapter_name: Optional[str] = None,
                 batch_size: int = 8) -> List[np.ndarray]:
    """Probability maps of `sam` (with `adapter_name` active; None: the plain core) on every item of
    `eval_items`, each cropped to its image, with the evaluation prompts of `cfg["prompts"]["mode"]`.

    Args:
        sam: the core.
        eval_items: SAM-ready items (`build_datasets`' eval dataset).
        cfg: the recipe (its prompt mode).
        adapter_name: the adapter to activate.
        batch_size: images per forward pass.
    """
    from .data import collate_batch
    from .evaluate import predict_probs

    if adapter_name is not None or adapters.attached(sam):
        adapters.activate(sam, adapter_name)
    sam.eval()
    out: List[np.ndarray] = []
    for start in range(0, len(eval_items), batch_size):
        batch = collate_batch([eval_items[i] for i in range(start, min(len(eval_items), start + batch_size))])
        probs = predict_probs(sam, batch, cfg)
        for p, s in zip(probs, batch["input_size"]):
            out.append(p[0, : int(s[0]), : int(s[1])].cpu().numpy().astype(np.float64))
    return out


def ground_truth(eval_items) -> List[np.ndarray]:
    """The eval items' masks, each cropped to its image (bool)."""
    out = []
    for i in range(len(eval_items)):
        item = eval_items[i]
        h, w = (int(v) for v in item["input_size"])
        out.append(item["mask"][0, :h, :w].numpy() > 0.5)
    return out


def prior_maps(prior: np.ndarray, eval_items) -> List[np.ndarray]:
    """The fixed prior cropped to each eval image (the same map for every image of one size)."""
    out = []
    for i in range(len(eval_items)):
        h, w = (int(v) for v in eval_items[i]["input_size"])
        out.append(prior[:h, :w].copy())
    return out


def score(probs: Sequence[np.ndarray], gts: Sequence[np.ndarray], metrics: Sequence[str]) -> Dict[str, float]:
    """Mean of each metric over the images (`metrics.MetricSuite`).

    Example:
        >>> g = np.zeros((8, 8), bool); g[2:6, 2:6] = True
        >>> score([g.astype(float)], [g], ["iou", "mae"])
        {'iou': 1.0, 'mae': 0.0}
    """
    suite = MetricSuite(list(metrics))
    for p, g in zip(probs, gts):
        suite.update(np.clip(p, 0, 1), g)
    return suite.results()


def pairwise_iou(masks: Sequence[np.ndarray]) -> float:
    """Mean IoU between the masks of *different* images (pairs with an empty union count as 1).

    A model that paints the same place whatever the image scores near 1; masks that follow objects
    which move about score what the ground truth's own masks score.

    Example:
        >>> a = np.zeros((4, 4), bool); a[:2] = True
        >>> pairwise_iou([a, a, ~a])
        0.3333333333333333
    """
    flat = [np.asarray(m, bool).ravel() for m in masks]
    vals = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            if flat[i].shape != flat[j].shape:
                continue
            union = np.count_nonzero(flat[i] | flat[j])
            vals.append(1.0 if union == 0 else np.count_nonzero(flat[i] & flat[j]) / union)
    return float(np.mean(vals)) if vals else float("nan")


def file_tensors(path: Path) -> int:
    """Number of values stored in a `.safetensors` file (its trained parameters)."""
    from safetensors import safe_open

    n = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            n += int(np.prod(f.get_slice(k).get_shape()))
    return n


def run_method(cfg: Dict[str, Any], method: str, out_dir: Path, prior: Optional[np.ndarray] = None,
               log=None, check_prompts: bool = False, reuse: bool = False) -> Dict[str, Any]:
    """Train (if the method trains) and score one row on `cfg`'s held-out images.

    Args:
        cfg: the domain's validated recipe.
        method: a key of `METHODS`, or `"adapted"`: `cfg` as it is.
        out_dir: where a trained method's run directory goes (`out_dir / method`; `"adapted"`: `out_dir`).
        prior: the fixed prior (computed here from the training masks when None and needed).
        log: where the training's progress lines go (None: nowhere).
        check_prompts: also measure `prompt_following` under the row's model (`row["prompts"]`).
        reuse: score a finished run already in the method's run directory (its `metrics.json` has
            the final evaluation) instead of training again; `seconds` is then the one recorded there.

    Returns:
        `{"method", "metrics", "probs", "gts", "params", "file_bytes", "seconds", "file"}`; `params`,
        `file_bytes` and `file` are 0/None for rows that train nothing.
    """
    from .data.pipeline import build_datasets
    from .model import build_core
    from .train import train

    if method not in METHODS and method != "adapted":
        raise ValueError(f"method {method!r} is unknown; use one of {list(METHODS)}")
    sam = build_core(cfg)
    train_ds, eval_ds = build_datasets(cfg, sam.image_size)
    gts = ground_truth(eval_ds)
    row: Dict[str, Any] = {"method": method, "params": 0, "file_bytes": 0, "seconds": 0.0, "file": None}
    name = None
    if method == "frozen":
        probs = predict_eval(sam, eval_ds, cfg)
    elif method == "prior":
        prior = fixed_prior(train_ds.base, sam.image_size) if prior is None else prior
        probs = prior_maps(prior, eval_ds)
    else:
        mcfg = copy.deepcopy(cfg) if method == "adapted" else method_recipe(cfg, method)
        mcfg["eval"]["baseline"] = False
        run_dir = Path(out_dir) if method == "adapted" else Path(out_dir) / method.replace(" ", "_")
        done = run_dir / "compare.json"
        if reuse and done.is_file():
            row["seconds"] = json.loads(done.read_text())["seconds"]
        else:
            if method != "adapted":
                clear_run(run_dir)  # a fresh run: a comparison never resumes an older one (nor deletes others')
            t0 = time.perf_counter()
            train(mcfg, out_dir=str(run_dir), progress=False, log=log or (lambda *a: None))
            row["seconds"] = time.perf_counter() - t0
            done.write_text(json.dumps({"seconds": row["seconds"]}))
        if mcfg["train"]["full_core"]:
            from samadapt.sam_core import load_sam

            path = run_dir / "core.safetensors"
            sam = load_sam(path, image_size=sam.image_size)
            name = None
        else:
            path = run_dir / "adapter.safetensors"
            name = adapters.load(sam, path)
        row.update(file=str(path), file_bytes=path.stat().st_size, params=file_tensors(path))
        probs = predict_eval(sam, eval_ds, mcfg, name)
    row["metrics"] = score(probs, gts, cfg["eval"]["metrics"])
    if check_prompts and method != "prior":
        row["prompts"] = prompt_following(sam, name)
    row["probs"], row["gts"] = probs, gts
    return row


@torch.no_grad()
def prompt_following(sam, adapter_name: Optional[str] = None, n: int = 48, seed: int = 4242) -> Dict[str, float]:
    """Box and click IoU on held-out generic scenes (synthetic `objects`: 1-3 high-contrast shapes, the
    mask one of them) with `adapter_name` active (None: the plain core): whether prompts still select
    their object under an adapter trained for something else.

    The box is the object's tight box; the click is its innermost pixel; one mask per prompt.

    Args:
        sam: the core (with the adapter loaded).
        adapter_name: the adapter to activate.
        n: scenes.
        seed: the scenes' seed (`np.random.default_rng([seed, i])`).

    Returns:
        `{"box_iou", "click_iou"}`, means over the scenes.
    """
    import cv2

    from samadapt.sam_core import SamPredictor

    from .data.synthetic import make_sample

    if adapter_name is not None or adapters.attached(sam):
        adapters.activate(sam, adapter_name)
    sam.eval()
    pred = SamPredictor(sam)
    box, click = [], []
    for i in range(n):
        img, m = make_sample("objects", np.random.default_rng([seed, i]), sam.image_size)
        pred.set_image(img)
        ys, xs = np.nonzero(m)
        masks, _, _ = pred.predict(box=np.array([xs.min(), ys.min(), xs.max(), ys.max()], float),
                                   multimask_output=False)
        box.append((masks[0] & m).sum() / (masks[0] | m).sum())
        dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
        y, x = np.unravel_index(int(dist.argmax()), dist.shape)
        masks, _, _ = pred.predict(point_coords=np.array([[x, y]], float), point_labels=np.array([1]),
                                   multimask_output=False)
        click.append((masks[0] & m).sum() / (masks[0] | m).sum())
    return {"box_iou": float(np.mean(box)), "click_iou": float(np.mean(click))}
