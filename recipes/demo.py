"""`samadapt demo`: a camouflage adapter on the frozen tiny core against three baselines, on CPU.

The rows, all scored by the same code on the same held-out images (`compare`):

* frozen -- the core as it is (promptless, it does not know what to segment);
* fixed prior -- the mean training mask, the same map for every image: what a model that learnt
  where objects tend to be, and not how to find them, would score;
* decoder only -- the small decoder fine-tuned on the frozen encoder;
* adapted -- the demo recipe: adapters in the encoder plus the decoder.

The masks follow the objects when the mean IoU between masks of *different* images is what the
ground truth's own masks score (the objects are placed anywhere); a location prior scores near 1.
"""
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .compare import fixed_prior, pairwise_iou, run_method
from .config import load_recipe
from .rundir import check_writable, clear_run

ROWS = (("frozen", "frozen core"), ("prior", "fixed prior"), ("decoder-only", "decoder only"),
        ("adapted", "adapted"))
COLUMNS = (("s_measure", "S"), ("e_measure_mean", "E"), ("weighted_f", "wF"), ("mae", "MAE"), ("iou", "IoU"))


def demo_rows(cfg: Dict[str, Any], out: Path, log=None) -> Dict[str, Dict[str, Any]]:
    """Train and score the demo's four rows (see the module docstring).

    Args:
        cfg: the validated demo recipe.
        out: the run directory: the adapted run writes here (`adapter.safetensors`), decoder-only
            under `out / "decoder-only"`.
        log: where training progress lines go.

    Returns:
        Row key -> `compare.run_method`'s row, plus `"follow"`: the mean pairwise IoU between the
        binarised masks of different held-out images.
    """
    from .data.pipeline import build_datasets
    from .model import build_core

    sam = build_core(cfg)
    train_ds, _ = build_datasets(cfg, sam.image_size)
    prior = fixed_prior(train_ds.base, sam.image_size)  # training masks only
    del train_ds, sam  # their cached images are not needed again (the demo stays under 2 GiB)
    rows: Dict[str, Dict[str, Any]] = {}
    for key, _ in ROWS:
        if key == "adapted":
            rows[key] = run_method(cfg, "adapted", out, log=log)
        else:
            rows[key] = run_method(cfg, key, out, prior=prior, log=log)
    for row in rows.values():
        row["follow"] = pairwise_iou([p > 0.5 for p in row["probs"]])
    rows["prior"]["map"] = prior
    return rows


def follow_limit(rows: Dict[str, Dict[str, Any]]) -> float:
    """The ground truth's own mean pairwise IoU between different held-out images."""
    return pairwise_iou(rows["frozen"]["gts"])


def print_table(rows: Dict[str, Dict[str, Any]], n_images: int, seconds: float, out: Path) -> None:
    """The demo's printout (the README quotes it)."""
    gt_follow = follow_limit(rows)
    print()
    print(f"{n_images} held-out synthetic camouflage images (promptless; 1-3 objects of several sizes, anywhere):")
    print(f"{'':<14}" + "".join(f"{c:>7}" for _, c in COLUMNS) + f"{'follow':>8}{'trained':>10}{'train s':>9}")
    for key, label in ROWS:
        r = rows[key]
        vals = "".join(f"{r['metrics'][m]:>7.3f}" for m, _ in COLUMNS)
        trained = f"{r['params']:>10,}" if r["params"] else f"{'-':>10}"
        secs = f"{r['seconds']:>9.0f}" if r["params"] else f"{'-':>9}"
        print(f"{label:<14}{vals}{r['follow']:>8.3f}{trained}{secs}")
    print(f"{'ground truth':<14}" + " " * 7 * len(COLUMNS) + f"{gt_follow:>8.3f}")
    print("follow: mean IoU between the masks of different images (the ground truth's own is the target; "
          "one fixed map scores 1)")
    print(f"\nadapter: {out / 'adapter.safetensors'}  ({(out / 'adapter.safetensors').stat().st_size:,} bytes)")
    print(f"picture: {out / 'demo.png'}  (image | ground truth | frozen | fixed prior | decoder only | adapted)")
    print(f"done in {seconds:.0f} s")


def write_picture(rows: Dict[str, Dict[str, Any]], eval_ds, path: Path, n: int = 6) -> None:
    """One row per held-out image: image | ground truth | each demo row's mask, in red over the image."""
    from .checkpointing import atomic_write_bytes
    from .evaluate import overlay, png_bytes, tile_row

    lines = []
    for i in range(min(n, len(eval_ds))):
        item = eval_ds[i]
        gt = rows["frozen"]["gts"][i]
        h, w = gt.shape
        img = item["image"][:, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8)
        tiles = [img, overlay(img, gt)] + [overlay(img, rows[k]["probs"][i] > 0.5) for k, _ in ROWS]
        lines.append(tile_row(tiles))
    atomic_write_bytes(path, png_bytes(np.concatenate(lines, 0)))


def run_demo(out_dir: str = "runs/demo", quick: bool = False, overrides: Optional[List[str]] = None) -> int:
    """Train the `demo` recipe and its decoder-only baseline into `out_dir` and print the four rows.

    Args:
        out_dir: the run directory; a previous demo run there is replaced.
        quick: a few steps on fewer images (a smoke test; its numbers mean nothing).
        overrides: `key=value` recipe overrides, as `--set` takes them.

    Returns:
        0 (the exit status).

    Example (shell):
        samadapt demo --quick
    """
    from .data.pipeline import build_datasets

    overrides = list(overrides or [])
    if quick:
        overrides = ["train.max_steps=4", "train.epochs=1", "eval.every_epochs=1", "data.synthetic_train_size=32",
                     "data.synthetic_eval_size=8"] + overrides
    cfg = load_recipe("demo", overrides)
    out = Path(out_dir)
    check_writable(out)
    clear_run(out)  # the demo starts fresh: an earlier demo's files go, anything else there stops it
    t0 = time.time()
    rows = demo_rows(cfg, out, log=print)
    _, eval_ds = build_datasets(cfg, cfg["data"]["synthetic_image_size"])
    write_picture(rows, eval_ds, out / "demo.png")
    print_table(rows, cfg["data"]["synthetic_eval_size"], time.time() - t0, out)
    return 0

