"""Helpers for automatic mask generation: point grids, crop boxes, mask scores, boxes, run-length
encoding and small-region clean-up. Pure functions over tensors / arrays, no model inside.
"""
import math
from itertools import product
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

Rle = Dict[str, Any]  # uncompressed COCO run-length encoding: {"size": [h, w], "counts": [...]}
Column = Union[torch.Tensor, np.ndarray, list]


class MaskRecords:
    """Columns of per-mask values (tensors, arrays or lists) kept row-aligned through filters and joins.

    Example:
        >>> import torch
        >>> r = MaskRecords(iou=torch.tensor([0.9, 0.2]), rles=[{"a": 1}, {"b": 2}])
        >>> r.filter(r["iou"] > 0.5); len(r), r["rles"]
        (1, [{'a': 1}])
    """

    def __init__(self, **columns: Column) -> None:
        self._cols: Dict[str, Column] = {}
        for key, value in columns.items():
            self[key] = value

    def __setitem__(self, key: str, value: Column) -> None:
        if not isinstance(value, (torch.Tensor, np.ndarray, list)):
            raise TypeError(f"column {key!r} is a {type(value).__name__}; use a tensor, an array or a list")
        self._cols[key] = value

    def __getitem__(self, key: str) -> Column:
        return self._cols[key]

    def __delitem__(self, key: str) -> None:
        del self._cols[key]

    def __contains__(self, key: str) -> bool:
        return key in self._cols

    def __len__(self) -> int:
        return len(next(iter(self._cols.values()))) if self._cols else 0

    def keys(self):
        return self._cols.keys()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep the rows selected by a boolean mask or an index tensor (in the index order)."""
        keep = torch.as_tensor(keep).cpu()
        index = keep.nonzero().flatten() if keep.dtype == torch.bool else keep.long()
        for key, col in self._cols.items():
            if isinstance(col, torch.Tensor):
                self._cols[key] = col[index.to(col.device)]
            elif isinstance(col, np.ndarray):
                self._cols[key] = col[index.numpy()]
            else:
                self._cols[key] = [col[i] for i in index.tolist()]

    def cat(self, other: "MaskRecords") -> None:
        """Append the rows of `other` (columns missing here are taken over)."""
        for key, col in other._cols.items():
            mine = self._cols.get(key)
            if mine is None:
                self._cols[key] = col
            elif isinstance(col, torch.Tensor):
                self._cols[key] = torch.cat([mine, col.to(mine.device)], dim=0)
            elif isinstance(col, np.ndarray):
                self._cols[key] = np.concatenate([mine, col], axis=0)
            else:
                self._cols[key] = mine + list(col)


# ---------------------------------------------------------------------------- point grids and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """An n x n grid of (x, y) cell centres in [0, 1]^2, row by row: shape n^2 x 2."""
    half_step = 1.0 / (2 * n_per_side)
    ticks = np.linspace(half_step, 1.0 - half_step, n_per_side)
    xs, ys = np.meshgrid(ticks, ticks)  # xs varies along a row, ys down the rows
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """One grid per crop layer; layer i has int(n_per_side / scale_per_layer**i) points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer ** i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Tuple[int, int], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """Crop boxes (x0, y0, x1, y1) and their layer: the whole image, then (2^i)^2 overlapping crops
    for layer i = 1..n_layers. Overlap is `overlap_ratio` of the short side, halved per layer.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(1, n_layers + 1):
        n = 2 ** layer
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        x_starts = [int((crop_w - overlap) * i) for i in range(n)]
        y_starts = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x_starts, y_starts):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift ... x 4 boxes from crop to image coordinates."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift ... x 2 points from crop to image coordinates."""
    return points + torch.tensor([crop_box[0], crop_box[1]], device=points.device)


def uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Zero-pad B x h x w crop masks to B x orig_h x orig_w at the crop's place."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return torch.nn.functional.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """True for (crop-frame) boxes within `atol` px of a crop edge that is not also an image edge."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)[None]
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)[None]
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - orig).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


# ---------------------------------------------------------------------------- scores and boxes
def calculate_stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at `mask_threshold + offset` and `mask_threshold - offset`.

    The first mask lies inside the second, so the IoU is a ratio of pixel counts.
    """
    inner = (logits > (mask_threshold + offset)).flatten(-2).sum(-1, dtype=torch.int32)
    outer = (logits > (mask_threshold - offset)).flatten(-2).sum(-1, dtype=torch.int32)
    return inner / outer


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Tight integer XYXY boxes (inclusive max) of ... x H x W boolean masks; [0, 0, 0, 0] if empty."""
    *lead, h, w = masks.shape
    if masks.numel() == 0:
        return torch.zeros(*lead, 4, dtype=torch.long, device=masks.device)
    masks = masks.reshape(-1, h, w).bool()
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # N x H, N x W

    def first_last(hit: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(n, device=hit.device)
        first = torch.where(hit, idx, n).amin(dim=1)
        last = torch.where(hit, idx, -1).amax(dim=1)
        return first, last

    top, bottom = first_last(rows, h)
    left, right = first_last(cols, w)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    boxes[~rows.any(dim=1)] = 0
    return boxes.reshape(*lead, 4)


def box_xyxy_to_xywh(box: Sequence) -> List:
    """(x0, y0, x1, y1) -> [x, y, w, h] as plain Python numbers."""
    x0, y0, x1, y1 = (v.item() if hasattr(v, "item") else v for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


# ---------------------------------------------------------------------------- run-length encoding
def mask_to_rle(masks: torch.Tensor) -> List[Rle]:
    """Uncompressed COCO RLEs (column-major runs, starting with a run of zeros) of B x H x W masks."""
    b, h, w = masks.shape
    flat = masks.bool().transpose(1, 2).reshape(b, h * w)
    if h * w == 0:
        return [{"size": [h, w], "counts": [0]} for _ in range(b)]
    change = (flat[:, 1:] != flat[:, :-1]).nonzero()  # rows sorted by mask, then position
    per_mask = torch.bincount(change[:, 0], minlength=b).cpu().tolist()
    positions = (change[:, 1] + 1).cpu()
    first_on = flat[:, 0].cpu().tolist()
    out = []
    for i, cuts in enumerate(torch.split(positions, per_mask)):
        edges = torch.cat([torch.zeros(1, dtype=cuts.dtype), cuts, torch.full((1,), h * w, dtype=cuts.dtype)])
        runs = torch.diff(edges).tolist()
        out.append({"size": [h, w], "counts": ([0] if first_on[i] else []) + runs})
    return out


def rle_to_mask(rle: Rle) -> np.ndarray:
    """H x W boolean mask from an uncompressed RLE."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = (np.arange(len(counts)) % 2).astype(bool)  # runs alternate off, on, off, ...
    return np.repeat(values, counts).reshape(w, h).T


def area_from_rle(rle: Rle) -> int:
    """Number of on pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: Rle) -> Rle:
    """Compressed (string) COCO RLE, JSON-serialisable. Needs pycocotools."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError("output_mode='coco_rle' needs pycocotools: pip install pycocotools") from None
    h, w = rle["size"]
    encoded = mask_utils.frPyObjects(rle, h, w)
    encoded["counts"] = encoded["counts"].decode("utf-8")
    return encoded


# ---------------------------------------------------------------------------- clean-up
def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes (`mode="holes"`) or drop islands (`mode="islands"`) smaller than `area_thresh`
    pixels (8-connectivity). Returns the mask and whether it changed. When every island is small,
    the largest is kept. Needs opencv.
    """
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode={mode!r}; use 'holes' or 'islands'")
    holes = mode == "holes"
    working = (~mask if holes else mask).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is everything outside `working`
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    keep = np.zeros(n_labels, dtype=bool)
    if holes:
        keep[0] = True            # the mask itself
        keep[1:] = small          # plus the small holes, filled
    else:
        keep[1:] = ~small         # the large islands
        if not keep.any():
            keep[int(np.argmax(sizes)) + 1] = True
    return keep[labels], True
