"""Masks as JSON: segment_anything's mask records and COCO files, shared by `samadapt predict`, the server
and the Label Studio backend.

One schema for automatic masks everywhere: segment_anything's keys (`segmentation`, `area`, `bbox`
[x, y, w, h], `predicted_iou`, `point_coords`, `stability_score`, `crop_box`), with the segmentation
as COCO RLE where JSON needs it (`output_mode="coco_rle"`: compressed string counts, through
pycocotools; or `"uncompressed_rle"`: a list of counts, both segment_anything's own modes).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .errors import UserError

__all__ = ["SAM_KEYS", "CocoError", "json_rle_mode",
           "encode_rle", "decode_rle", "mask_record", "json_record", "coco_file"]

SAM_KEYS = ("segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box")


class CocoError(UserError, ImportError):
    """COCO output was asked for and pycocotools is missing."""


def _mask_api():
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise CocoError('COCO output needs pycocotools; install it with: pip install "samadapt[coco]"') from None
    return mask_utils


def json_rle_mode() -> str:
    """The RLE a JSON file gets: `coco_rle` (compressed) with pycocotools installed, else `uncompressed_rle`
    (segment_anything's other JSON mode: the same keys, counts as a list), so a base install still writes JSON.

    Example:
        >>> json_rle_mode() in ("coco_rle", "uncompressed_rle")
        True
    """
    try:
        import pycocotools.mask  # noqa: F401
    except ImportError:
        return "uncompressed_rle"
    return "coco_rle"


def encode_rle(mask: np.ndarray) -> Dict[str, Any]:
    """A binary H x W mask as compressed COCO RLE `{"size": [h, w], "counts": str}` (pycocotools).

    Example:
        >>> m = np.zeros((4, 5), bool); m[1:3, 2:4] = True
        >>> r = encode_rle(m); r["size"], bool((decode_rle(r) == m).all())
        ([4, 5], True)
    """
    mask_utils = _mask_api()
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: Dict[str, Any]) -> np.ndarray:
    """A COCO RLE (compressed string counts, or uncompressed list counts) -> H x W bool mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed: column-major runs, zeros first
        flat = np.zeros(h * w, dtype=bool)
        pos, val = 0, False
        for c in counts:
            flat[pos:pos + int(c)] = val
            pos, val = pos + int(c), not val
        return flat.reshape(w, h).T
    mask_utils = _mask_api()
    return mask_utils.decode({"size": [h, w], "counts": counts.encode("ascii")}).astype(bool)


def _box_xywh(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def mask_record(mask: np.ndarray, predicted_iou: float, point_coords: Optional[Sequence] = None,
                stability_score: Optional[float] = None, crop_box: Optional[Sequence] = None) -> Dict[str, Any]:
    """A segment_anything mask record of one binary mask (prompted masks get the same keys as automatic
    ones: `point_coords` are the prompt's points (empty for a box or no prompt), `stability_score` is
    None when not computed, `crop_box` the whole image).

    Example:
        >>> m = np.zeros((4, 6), bool); m[1:3, 2:5] = True
        >>> r = mask_record(m, 0.9); r["area"], r["bbox"], r["crop_box"]
        (6, [2.0, 1.0, 3.0, 2.0], [0, 0, 6, 4])
    """
    h, w = mask.shape[:2]
    return {"segmentation": mask, "area": int(np.count_nonzero(mask)), "bbox": _box_xywh(mask),
            "predicted_iou": float(predicted_iou),
            "point_coords": [[float(v) for v in p] for p in (point_coords if point_coords is not None else [])],
            "stability_score": None if stability_score is None else float(stability_score),
            "crop_box": [int(v) for v in crop_box] if crop_box is not None else [0, 0, int(w), int(h)]}


def json_record(record: Dict[str, Any], output_mode: str = "coco_rle", **extra: Any) -> Dict[str, Any]:
    """A mask record (segment_anything's keys) made JSON-ready: the segmentation as RLE, numbers as floats.

    Args:
        record: a dict with segment_anything's keys; `segmentation` a bool array or already an RLE dict.
        output_mode: `coco_rle` (compressed counts, pycocotools) or `uncompressed_rle` (list counts).
        **extra: more keys to add after segment_anything's (e.g. `file` for the PNG written).

    Example:
        >>> m = np.zeros((3, 3), bool); m[0, 0] = True
        >>> json_record(mask_record(m, 0.5), "uncompressed_rle")["segmentation"]
        {'size': [3, 3], 'counts': [0, 1, 8]}
    """
    seg = record["segmentation"]
    if isinstance(seg, np.ndarray):
        if output_mode == "coco_rle":
            seg = encode_rle(seg)
        else:
            flat = np.asarray(seg, bool).T.reshape(-1)
            change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
            bounds = np.concatenate([[0], change, [flat.size]])
            counts = np.diff(bounds).tolist()
            if flat.size and flat[0]:
                counts = [0] + counts
            seg = {"size": [int(seg.shape[0]), int(seg.shape[1])], "counts": [int(c) for c in counts]}
    out = {"segmentation": seg, "area": int(record["area"]), "bbox": [float(v) for v in record["bbox"]],
           "predicted_iou": float(record["predicted_iou"]),
           "point_coords": [[float(v) for v in p] for p in record.get("point_coords") or []],
           "stability_score": None if record.get("stability_score") is None else float(record["stability_score"]),
           "crop_box": [int(v) for v in record.get("crop_box") or [0, 0, 0, 0]]}
    out.update(extra)
    return out


def coco_file(images: Sequence[Dict[str, Any]], annotations: Sequence[Dict[str, Any]],
              classes: Optional[Sequence[str]] = None, default_class: str = "object") -> Dict[str, Any]:
    """A COCO instance-segmentation file.

    Args:
        images: `{"id", "file_name", "width", "height"}` per image.
        annotations: `{"image_id", "mask" (H x W bool) or "segmentation" (RLE), "score", "category_id"?}`;
            ids, areas, boxes and compressed RLE are filled in here.
        classes: category names (an adapter's `classes`); None: one category, `default_class`.
        default_class: the single category's name when `classes` is None (the adapter's domain).

    Returns:
        `{"info", "images", "annotations", "categories"}` that `pycocotools.coco.COCO` reads.

    Example:
        >>> m = np.zeros((4, 4), bool); m[:2, :2] = True
        >>> c = coco_file([{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
        ...               [{"image_id": 1, "mask": m, "score": 0.9}])
        >>> c["annotations"][0]["bbox"], c["annotations"][0]["area"], c["categories"]
        ([0.0, 0.0, 2.0, 2.0], 4, [{'id': 1, 'name': 'object', 'supercategory': 'object'}])
    """
    names = list(classes) if classes else [default_class]
    cats = [{"id": i + 1, "name": str(n), "supercategory": "object"} for i, n in enumerate(names)]
    anns = []
    for k, a in enumerate(annotations):
        if "mask" in a:
            m = np.asarray(a["mask"], bool)
            seg, area, bbox = encode_rle(m), int(np.count_nonzero(m)), _box_xywh(m)
        else:
            seg = a["segmentation"]
            m = decode_rle(seg)
            if isinstance(seg.get("counts"), list):
                seg = encode_rle(m)
            area, bbox = int(np.count_nonzero(m)), _box_xywh(m)
        ann = {"id": k + 1, "image_id": a["image_id"], "category_id": int(a.get("category_id", 1)),
               "segmentation": seg, "area": area, "bbox": bbox, "iscrowd": 0}
        if a.get("score") is not None:
            ann["score"] = float(a["score"])
        anns.append(ann)
    return {"info": {"description": "samadapt masks"}, "images": list(images), "annotations": anns,
            "categories": cats}
