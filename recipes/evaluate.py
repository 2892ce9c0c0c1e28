"""Evaluation: metrics of the frozen core or an adapter on a loader, overlays, and `samadapt eval`."""
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from samadapt import adapters

from .checkpointing import atomic_write_bytes, atomic_write_text
from .config import load_recipe
from .data.prompts import box_from_mask
from .metrics import MetricSuite
from .model import build_core, load_base
from .rundir import check_writable_file

LOWER_IS_BETTER = {"mae", "ber"}


def eval_prompts(cfg: Dict[str, Any], masks: torch.Tensor, input_sizes: torch.Tensor):
    """Deterministic evaluation prompts for the recipe's `prompts.mode`: none, the tight box, or the
    interior point farthest inside the mask.

    Args:
        cfg: the validated recipe.
        masks: B x 1 x S x S ground truth in the padded input frame.
        input_sizes: B x 2 (h, w) of each image before padding.

    Returns:
        `(point_coords, point_labels, boxes)`, each None where the mode has none.

    Example:
        >>> import torch
        >>> m = torch.zeros(1, 1, 8, 8); m[0, 0, 2:5, 3:6] = 1
        >>> cfg = {"prompts": {"mode": "box"}}
        >>> eval_prompts(cfg, m, torch.tensor([[8, 8]]))[2].tolist()
        [[3.0, 2.0, 5.0, 4.0]]
    """
    mode = cfg["prompts"]["mode"]
    if mode == "none":
        return None, None, None
    import cv2

    b = masks.shape[0]
    boxes, coords = [], []
    for i in range(b):
        h, w = int(input_sizes[i, 0]), int(input_sizes[i, 1])
        m = masks[i, 0, :h, :w].cpu().numpy() > 0.5
        boxes.append(box_from_mask(m, jitter=0.0, rng=0))
        if m.any():
            dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
            y, x = np.unravel_index(int(dist.argmax()), dist.shape)
        else:
            y, x = h // 2, w // 2
        coords.append([x, y])
    dev = masks.device
    if mode in ("box", "box+points", "mixed"):
        return None, None, torch.tensor(np.array(boxes), dtype=torch.float32, device=dev)
    return (torch.tensor(coords, dtype=torch.float32, device=dev)[:, None],
            torch.ones(b, 1, dtype=torch.int64, device=dev), None)


@torch.no_grad()
def predict_probs(sam, batch: Dict[str, torch.Tensor], cfg: Dict[str, Any]) -> torch.Tensor:
    """Probability maps B x 1 x S x S in the padded input frame, with `eval_prompts`' prompts."""
    pc, pl, boxes = eval_prompts(cfg, batch["mask"], batch["input_size"])
    low, iou = sam.forward_masks(batch["image"], pc, pl, boxes, None, multimask_output=False)
    size = batch["image"].shape[-2:]
    return torch.sigmoid(F.interpolate(low.float(), size=size, mode="bilinear", align_corners=False))


def evaluate(accelerator, sam, loader, cfg: Dict[str, Any],
             adapter_name: Optional[str]) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
    """Metrics of `adapter_name` (None: the frozen core) on the eval loader, gathered over processes.

    Args:
        accelerator: the run's `accelerate.Accelerator`.
        sam: the (unwrapped) core.
        loader: the prepared eval loader (items carry `index`).
        cfg: the validated recipe (`eval.metrics`, `eval.select`, `eval.samples`, `prompts.mode`).
        adapter_name: the adapter to activate, or None for the plain core.

    Returns:
        `(metrics, kept)`: metric name -> value on the main process (`{}` elsewhere), and up to
        `eval.samples` probability maps by dataset index, for overlays.
    """
    if adapter_name is not None or adapters.attached(sam):
        adapters.activate(sam, adapter_name)
    sam.eval()
    ev = cfg["eval"]
    suite = MetricSuite(ev["metrics"] + ([ev["select"]] if ev["select"] not in ev["metrics"] else []))
    kept: Dict[str, np.ndarray] = {}
    for batch in loader:
        probs = predict_probs(sam, batch, cfg)
        probs, masks, sizes, idx = accelerator.gather_for_metrics(
            (probs, batch["mask"], batch["input_size"], batch["index"]))
        if accelerator.is_main_process:
            for p, m, s, i in zip(probs, masks, sizes, idx):
                h, w = int(s[0]), int(s[1])
                pm = p[0, :h, :w].cpu().numpy().astype(np.float64)
                gm = m[0, :h, :w].cpu().numpy() > 0.5
                suite.update(np.clip(pm, 0, 1), gm)
                if len(kept) < ev["samples"]:
                    kept[str(int(i))] = pm
    results = suite.results() if accelerator.is_main_process else {}
    return results, kept


def write_overlays(sample_dir: Path, dataset, frozen: Dict[str, np.ndarray],
                   adapted: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """One PNG per kept sample: image | ground truth | frozen core | adapted, masks in red over the image.

    Returns:
        Sample name -> the H x W x 3 uint8 row written (TensorBoard logs the same rows).
    """
    sample_dir.mkdir(parents=True, exist_ok=True)
    rows: Dict[str, np.ndarray] = {}
    for key, pa in adapted.items():
        item = dataset[int(key)]
        h, w = pa.shape
        img = item["image"][:, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8)
        gt = item["mask"][0, :h, :w].numpy() > 0.5
        tiles = [img, overlay(img, gt)]
        if key in frozen:
            tiles.append(overlay(img, frozen[key] > 0.5))
        tiles.append(overlay(img, pa > 0.5))
        row = tile_row(tiles)
        atomic_write_bytes(sample_dir / f"{item['name']}.png", png_bytes(row))
        rows[item["name"]] = row
    return rows


def overlay(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`img` (H x W x 3 uint8) with `mask` (H x W bool) painted in red at 55 %, as every overlay shows it.

    Example:
        >>> m = np.zeros((2, 2), bool); m[0, 0] = True
        >>> overlay(np.zeros((2, 2, 3), np.uint8), m)[:, :, 0].tolist()
        [[140, 0], [0, 0]]
    """
    o = img.copy()
    o[mask] = (0.45 * o[mask] + 0.55 * np.array([255, 40, 40])).astype(np.uint8)
    return o


def tile_row(tiles, pad: int = 2) -> np.ndarray:
    """Equal-height H x W x 3 tiles side by side, each framed by `pad` white pixels."""
    return np.concatenate([np.pad(t, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for t in tiles], axis=1)


def png_bytes(arr: np.ndarray) -> bytes:
    """An H x W x 3 uint8 array as PNG bytes."""
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def is_better(metric: str, new: float, old: Optional[float]) -> bool:
    """Whether `new` beats `old` for `metric` (lower is better for MAE and BER; anything beats None/NaN).

    Example:
        >>> is_better("mae", 0.1, 0.2), is_better("s_measure", 0.1, 0.2), is_better("dice", 0.1, None)
        (True, False, True)
    """
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


def format_metrics(res: Dict[str, float]) -> str:
    """`name=value` pairs on one line, for logs.

    Example:
        >>> format_metrics({"mae": 0.25})
        'mae=0.2500'
    """
    return "  ".join(f"{k}={v:.4f}" for k, v in res.items())


def run_eval(args) -> int:
    """Print frozen vs adapted metrics; `--json PATH` also writes them.

    Example (shell):
        samadapt eval --recipe demo --adapter runs/demo/adapter.safetensors
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from .data import collate_batch
    from .data.pipeline import IndexedDataset, build_datasets

    cfg = load_recipe(args.recipe, args.set)
    if args.json:
        check_writable_file(Path(args.json), "--json")  # before the evaluation, not after it
    sam = (load_base(args.base, cfg["base"]["image_size"]) if args.base
           else build_core(cfg, allow_random_base=bool(getattr(args, "allow_random_base", False))))
    name = None
    if args.adapter:
        name = adapters.load(sam, args.adapter, allow_base_mismatch=getattr(args, "allow_base_mismatch", False))
        meta = adapters.inspect(args.adapter)
        # evaluate with the prompts the adapter was trained with
        cfg["prompts"]["mode"] = meta.get("prompt_mode", cfg["prompts"]["mode"]) or "none"
    train_ds, eval_ds = build_datasets(cfg, sam.image_size, args.data)
    from .data.pipeline import describe_datasets

    for line in describe_datasets(cfg, train_ds, eval_ds, args.data)[1:]:  # eval reads the eval split only
        print(line, file=sys.stderr)
    loader = DataLoader(IndexedDataset(eval_ds), batch_size=cfg["eval"]["batch_size"], collate_fn=collate_batch)
    accelerator = Accelerator()
    loader = accelerator.prepare(loader)
    out: Dict[str, Any] = {"images": len(eval_ds)}
    out["frozen"], _ = evaluate(accelerator, sam, loader, cfg, None)
    if name is not None:
        out["adapted"], _ = evaluate(accelerator, sam, loader, cfg, name)
    if accelerator.is_main_process:
        cols = ["frozen"] + (["adapted"] if name else [])
        print(f"{'metric':<20}" + "".join(f"{c:>10}" for c in cols))
        for k in out["frozen"]:
            print(f"{k:<20}" + "".join(f"{out[c][k]:>10.4f}" for c in cols))
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(out, indent=2))
            print(f"wrote {args.json}", file=sys.stderr)
    return 0
