"""Scoring K-class adapters on held-out volumes: per class and per volume (Dice, IoU, HD95, NSD), the
per-class table the CLI and the organs demo print, and box/click IoU through SAM's prompt path under a
K-class adapter (prompts must survive the multi-class tuning).
"""
from typing import Any, Dict, List, Optional

import numpy as np

from samadapt import adapters

from .data.medical import Case, VolumeCache
from .metrics import label_map_metrics
from .predict_volume import segment_volume


def evaluate_volumes(sam, cases: List[Case], cache: VolumeCache, classes: Dict[int, str], cfg: Dict[str, Any],
                     adapter: Optional[str], progress: bool = False) -> Dict[str, Any]:
    """Per-volume and per-class metrics of `adapter` on held-out volumes.

    Returns:
        {"per_volume": {case: {class: {dice, iou, hd95, nsd}, "mean": ...}}, "per_class": {class: mean over
        volumes}, "mean": the mean over foreground classes}; NaN entries (a class absent and not
        predicted) are skipped by the means.
    """
    v = cfg["volume"]
    values = np.array(sorted(classes), dtype=np.int32)
    adapters.activate(sam, adapter)
    was = sam.training
    sam.eval()
    per_volume = {}
    for c in cases:
        pv = cache.get(c)
        idx, _ = segment_volume(sam, pv.image.astype(np.float32), channels=v["channels"],
                                batch_size=v["slice_batch"], progress=progress, desc=c.case_id)
        per_volume[c.case_id] = label_map_metrics(values[idx], pv.labels, classes, spacing=pv.volume.spacing,
                                                  tolerance=v["nsd_tolerance"], surface=v["surface_metrics"])
    sam.train(was)
    names = [classes[k] for k in sorted(classes) if k != 0]
    keys = list(next(iter(per_volume.values()))["mean"]) if per_volume else []

    def nanmean(xs):
        xs = [x for x in xs if x == x]
        return float(np.mean(xs)) if xs else float("nan")

    per_class = {n: {k: nanmean([pv[n][k] for pv in per_volume.values()]) for k in keys} for n in names}
    mean = {k: nanmean([per_class[n][k] for n in names]) for k in keys}
    return {"per_volume": per_volume, "per_class": per_class, "mean": mean}


def format_class_table(rows: Dict[str, Dict[str, Any]], names: List[str], metric: str = "dice") -> str:
    """A per-class table: one row per model, one column per class plus the mean.

    Example:
        >>> print(format_class_table({"a": {"per_class": {"liver": {"dice": 0.5}}, "mean": {"dice": 0.5}}}, ["liver"]))
        dice          liver   mean
        a             0.500  0.500
    """
    width = max(7, *(len(n) + 1 for n in names))
    head = f"{metric:<12}" + "".join(f"{n:>{width}}" for n in names) + f"{'mean':>{width}}"
    lines = [head]
    for label, res in rows.items():
        vals = [res["per_class"][n][metric] for n in names] + [res["mean"][metric]]
        lines.append(f"{label:<12}" + "".join(f"{x:>{width}.3f}" for x in vals))
    return "\n".join(lines)


def prompt_ious(sam, cases: List[Case], cache: VolumeCache, adapter: Optional[str], channels: str = "repeat",
                slices_per_volume: int = 4) -> Dict[str, float]:
    """Box and click IoU on organs of held-out volumes, through SAM's prompt path (`SamPredictor`) under
    `adapter` (None: the frozen core): every organ piece of `slices_per_volume` evenly spaced slices with
    organs, prompted by its tight box, and by one click at its innermost pixel (best of SAM's 3 masks by
    predicted IoU, as SAM answers one click). Masks are class-agnostic: the prompt says which organ.

    Returns:
        {"box": mean IoU, "click": mean IoU, "n": prompts per mode}.
    """
    import cv2
    from scipy.ndimage import distance_transform_edt

    from samadapt.sam_core import SamPredictor

    from .data.medical import label_slice, slice_channels

    adapters.activate(sam, adapter)
    pred = SamPredictor(sam)
    box_iou, click_iou = [], []
    for c in cases:
        pv = cache.get(c)
        img01 = pv.image.astype(np.float32)
        has = np.flatnonzero(pv.labels.reshape(-1, pv.labels.shape[-1]).any(axis=0))
        if not has.size:
            continue
        for k in has[np.linspace(0, has.size - 1, min(slices_per_volume, has.size)).round().astype(int)]:
            lab = label_slice(pv.labels, int(k))
            pred.set_image(slice_channels(img01, int(k), channels))
            for cls in [v for v in np.unique(lab) if v != 0]:
                n, comp = cv2.connectedComponents((lab == cls).astype(np.uint8))
                for j in range(1, n):
                    gt = comp == j
                    if gt.sum() < 16:
                        continue  # a sliver at an organ's tip: no clinician prompts it
                    ys, xs = np.nonzero(gt)
                    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
                    m, _, _ = pred.predict(box=box, multimask_output=False)
                    box_iou.append(_iou(m[0], gt))
                    dt = distance_transform_edt(gt)
                    y, x = np.unravel_index(int(dt.argmax()), dt.shape)
                    m, s, _ = pred.predict(point_coords=np.array([[x, y]], np.float32), point_labels=np.array([1]),
                                           multimask_output=True)
                    click_iou.append(_iou(m[int(np.argmax(s))], gt))
    return {"box": float(np.mean(box_iou)) if box_iou else float("nan"),
            "click": float(np.mean(click_iou)) if click_iou else float("nan"), "n": len(box_iou)}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0
