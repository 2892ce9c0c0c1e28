# why over 500 lines: one sampler and the prompt primitives it composes; split, each half would import the other
"""Prompt sampling for training SAM-style models: boxes, points, correction clicks, batched prompts.

Conventions (those of `sam_core`):

* Coordinates are pixel coordinates of the mask given, `(x, y)` = (column, row).
  Points sit on integer pixel indices (a point `(x, y)` means pixel
  `mask[y, x]`).
* Boxes are `(x0, y0, x1, y1)` with inclusive pixel indices, as SAM's
  `batched_mask_to_box`: a mask that is one pixel wide at column 5 has
  `x0 = x1 = 5`.
* Point labels: 1 positive, 0 negative, -1 padding (ignored by the prompt encoder).

Randomness comes from a passed `np.random.Generator` (or an int seed, or a
`torch.Generator`, from which a numpy seed is drawn); `None` means fresh OS
entropy (not reproducible).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "PROMPT_MODES",
    "one_component",
    "box_from_mask",
    "sample_points",
    "correction_click",
    "pad_points",
    "append_correction_clicks",
    "PromptSampler",
]

RngLike = Union[None, int, np.random.Generator, torch.Generator]

# Modes of `PromptSampler`.
PROMPT_MODES: Tuple[str, ...] = ("none", "box", "points", "box+points", "mixed")


def _as_rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng).item()))
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(
        f"rng must be a numpy Generator, a torch.Generator, an int seed or None, got {type(rng).__name__}"
    )


def _as_mask(mask: Any, name: str = "mask", threshold: float = 0.5) -> np.ndarray:
    """numpy/torch H x W (or 1 x H x W) -> bool H x W; non-bool values are thresholded at `> threshold`."""
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be H x W (or 1 x H x W), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} has no pixels (shape {tuple(arr.shape)})")
    return arr if arr.dtype == bool else arr > threshold


def box_from_mask(
    mask: Any,
    jitter: float = 0.1,
    rng: RngLike = None,
    max_noise: Optional[float] = 20.0,
    empty: str = "full",
) -> np.ndarray:
    """Tight box around a mask, each side moved by Gaussian noise (SAM's box prompts in training).

    The noise of the left/right sides has std `jitter * box width`, that of
    the top/bottom sides std `jitter * box height` (SAM: 10 % of the side
    length), clamped to `+-max_noise` pixels (SAM: at most 20 px; `None`
    means no clamp).  The result is clipped to the image and kept ordered
    (`x0 <= x1`, `y0 <= y1`).

    Args:
        mask: H x W bool/0-1 array or tensor.
        jitter: noise std as a fraction of the box side; 0 gives the tight box.
        rng: randomness source (see the module docstring).
        max_noise: clamp on each side's displacement in pixels, or None.
        empty: what an empty mask gives: `"full"` the whole-image box
            `(0, 0, W-1, H-1)` (a "segment nothing here" prompt), `"raise"` a ValueError.

    Returns:
        float32 array `[x0, y0, x1, y1]` (inclusive pixel indices).

    Example:
        >>> import numpy as np
        >>> m = np.zeros((10, 10), bool); m[2:5, 3:8] = True
        >>> box_from_mask(m, jitter=0).tolist()
        [3.0, 2.0, 7.0, 4.0]
    """
    m = _as_mask(mask)
    if jitter < 0:
        raise ValueError(f"jitter={jitter} must be >= 0 (0.1 = 10 % of the box side, as SAM)")
    if max_noise is not None and max_noise < 0:
        raise ValueError(f"max_noise={max_noise} must be >= 0 pixels or None")
    if empty not in ("full", "raise"):
        raise ValueError(f"empty={empty!r} is not valid; use 'full' or 'raise'")
    h, w = m.shape
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        if empty == "raise":
            raise ValueError("mask is empty, there is no object to box; pass empty='full' for a whole-image box")
        return np.array([0, 0, w - 1, h - 1], np.float32)
    cols = np.flatnonzero(m.any(axis=0))
    box = np.array([cols[0], rows[0], cols[-1], rows[-1]], np.float64)
    if jitter > 0:
        g = _as_rng(rng)
        bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
        noise = g.normal(0.0, 1.0, 4) * jitter * np.array([bw, bh, bw, bh])
        if max_noise is not None:
            noise = np.clip(noise, -max_noise, max_noise)
        box = box + noise
        box[[0, 2]] = np.clip(box[[0, 2]], 0, w - 1)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, h - 1)
        box = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])
    return box.astype(np.float32)


def _pick(coords: np.ndarray, n: int, g: np.random.Generator) -> np.ndarray:
    """N rows of `coords` (K x 2, (y, x)), without replacement when K >= n."""
    if n <= 0:
        return np.zeros((0, 2), np.int64)
    idx = g.choice(len(coords), size=n, replace=len(coords) < n)
    return coords[idx]


def sample_points(
    mask: Any,
    n_pos: int = 1,
    n_neg: int = 0,
    rng: RngLike = None,
    valid: Optional[Tuple[int, int]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Uniformly random positive points inside the mask and negative points outside it.

    Points are drawn without replacement while there are enough pixels.  When a
    class has no pixels its points are taken from the other class so that
    `n_pos + n_neg` points always come back: an empty mask gives only
    negatives (label 0), a full mask only positives.

    Args:
        mask: H x W bool/0-1 array or tensor.
        n_pos: number of positive points.
        n_neg: number of negative points.
        rng: randomness source.
        valid: optional `(h, w)`: only pixels in `[:h, :w]` are candidates
            (excludes the zero padding of a SAM batch).

    Returns:
        `(coords float32 (N, 2) as (x, y), labels int64 (N,))`, positives first.

    Example:
        >>> import numpy as np
        >>> m = np.zeros((8, 8), bool); m[2:4, 2:4] = True
        >>> xy, lab = sample_points(m, 2, 1, np.random.default_rng(0))
        >>> lab.tolist(), bool(m[int(xy[0, 1]), int(xy[0, 0])]), bool(m[int(xy[2, 1]), int(xy[2, 0])])
        ([1, 1, 0], True, False)
    """
    m = _as_mask(mask)
    for name, v in (("n_pos", n_pos), ("n_neg", n_neg)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}={v!r} must be a non-negative int")
    g = _as_rng(rng)
    region = np.ones(m.shape, bool)
    if valid is not None:
        vh, vw = int(valid[0]), int(valid[1])
        if vh < 1 or vw < 1:
            raise ValueError(f"valid={valid} must be a positive (h, w)")
        region[:] = False
        region[:vh, :vw] = True
    pos = np.argwhere(m & region)
    neg = np.argwhere(~m & region)
    if len(pos) == 0 and len(neg) == 0:
        raise ValueError(f"no candidate pixels (mask shape {m.shape}, valid={valid})")
    if len(pos) == 0:
        n_pos, n_neg = 0, n_pos + n_neg
    elif len(neg) == 0:
        n_pos, n_neg = n_pos + n_neg, 0
    p = _pick(pos, n_pos, g)
    q = _pick(neg, n_neg, g)
    yx = np.concatenate([p, q], axis=0)
    coords = yx[:, ::-1].astype(np.float32).reshape(-1, 2)
    labels = np.concatenate([np.ones(len(p), np.int64), np.zeros(len(q), np.int64)])
    return coords, labels


def correction_click(
    pred_mask: Any,
    gt_mask: Any,
    rng: RngLike = None,
    mode: str = "uniform",
    threshold: float = 0.5,
) -> Optional[Tuple[np.ndarray, int]]:
    """One corrective click from the error between a prediction and the ground truth.

    Errors are false negatives (object missed: the click is positive, label 1)
    and false positives (background taken: negative, label 0).  `mode`:

    * `"uniform"` (SAM's iterative training): a pixel drawn uniformly from
      all error pixels; its label follows its error type.
    * `"largest"`: the error type with more pixels is chosen, then a pixel
      uniformly within it.
    * `"center"`: the pixel farthest from the boundary of the larger error
      type (deterministic; the usual interactive-segmentation evaluation click).

    Args:
        pred_mask: H x W prediction; bool as is, other dtypes are thresholded
            at `> threshold` (pass `logits > 0` for logits).
        gt_mask: H x W ground truth.
        rng: randomness source (unused by `"center"`).
        mode: `"uniform"`, `"largest"` or `"center"`.
        threshold: see `pred_mask`.

    Returns:
        `(coord float32 (2,) as (x, y), label int)`, or `None` when the prediction has no error.

    Example:
        >>> import numpy as np
        >>> gt = np.zeros((6, 6), bool); gt[1:4, 1:4] = True
        >>> pred = np.zeros((6, 6), bool)
        >>> xy, label = correction_click(pred, gt, np.random.default_rng(0))
        >>> label, bool(gt[int(xy[1]), int(xy[0])])
        (1, True)
    """
    if mode not in ("uniform", "largest", "center"):
        raise ValueError(f"mode={mode!r} is not valid; use 'uniform' (SAM), 'largest' or 'center'")
    p = _as_mask(pred_mask, "pred_mask", threshold)
    t = _as_mask(gt_mask, "gt_mask")
    if p.shape != t.shape:
        raise ValueError(f"pred_mask shape {p.shape} differs from gt_mask shape {t.shape}; resize one of them")
    fn = t & ~p
    fp = p & ~t
    n_fn, n_fp = int(fn.sum()), int(fp.sum())
    if n_fn + n_fp == 0:
        return None
    if mode == "uniform":
        g = _as_rng(rng)
        k = int(g.integers(0, n_fn + n_fp))
        if k < n_fn:
            y, x = np.argwhere(fn)[k]
            return np.array([x, y], np.float32), 1
        y, x = np.argwhere(fp)[k - n_fn]
        return np.array([x, y], np.float32), 0
    region, label = (fn, 1) if n_fn >= n_fp else (fp, 0)
    if mode == "largest":
        g = _as_rng(rng)
        cand = np.argwhere(region)
        y, x = cand[int(g.integers(0, len(cand)))]
        return np.array([x, y], np.float32), label
    import cv2  # local: only this mode needs it

    padded = np.pad(region.astype(np.uint8), 1)  # image borders count as boundary
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], np.float32), label


def pad_points(
    coords: Sequence[np.ndarray], labels: Sequence[np.ndarray], min_points: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch variable-length point lists: pad with `(0, 0)` and label -1.

    Args:
        coords: B arrays (N_i, 2).
        labels: B arrays (N_i,).
        min_points: pad to at least this many points.

    Returns:
        `(point_coords float32 (B, N, 2), point_labels int64 (B, N))` with `N = max(N_i, min_points)`.

    Example:
        >>> import numpy as np
        >>> c, l = pad_points([np.ones((2, 2)), np.ones((1, 2))], [np.array([1, 0]), np.array([1])])
        >>> tuple(c.shape), l.tolist()
        ((2, 2, 2), [[1, 0], [1, -1]])
    """
    if len(coords) != len(labels):
        raise ValueError(
            f"got {len(coords)} coordinate arrays but {len(labels)} label arrays; pass one of each per item"
        )
    b = len(coords)
    n = max([len(np.asarray(c).reshape(-1, 2)) for c in coords] + [min_points, 0])
    out_c = torch.zeros(b, n, 2, dtype=torch.float32)
    out_l = torch.full((b, n), -1, dtype=torch.int64)
    for i, (c, lab) in enumerate(zip(coords, labels)):
        c = np.asarray(c, np.float32).reshape(-1, 2)
        lab = np.asarray(lab, np.int64).reshape(-1)
        if len(c) != len(lab):
            raise ValueError(f"item {i}: {len(c)} points but {len(lab)} labels")
        out_c[i, : len(c)] = torch.from_numpy(c)
        out_l[i, : len(lab)] = torch.from_numpy(lab)
    return out_c, out_l


def _batch_masks(masks: Any) -> List[np.ndarray]:
    if isinstance(masks, torch.Tensor):
        arr = masks.detach().cpu().numpy()
    elif isinstance(masks, (list, tuple)):
        return [_as_mask(m) for m in masks]
    else:
        arr = np.asarray(masks)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"masks must be B x H x W or B x 1 x H x W (or a list of H x W), got shape {arr.shape}")
    return [_as_mask(m) for m in arr]


def append_correction_clicks(
    point_coords: Optional[torch.Tensor],
    point_labels: Optional[torch.Tensor],
    pred_masks: Any,
    gt_masks: Any,
    rng: RngLike = None,
    mode: str = "uniform",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Add one `correction_click` per item to batched points (SAM's iterative training step).

    Items whose prediction has no error get a padding point (label -1).

    Args:
        point_coords: (B, N, 2) or None (no points yet).
        point_labels: (B, N) or None.
        pred_masks: (B, 1, H, W) / (B, H, W) boolean predictions (e.g. `logits > 0`) in the same frame as the points.
        gt_masks: same shape, ground truth.
        rng: randomness source.
        mode: see `correction_click`.

    Returns:
        `(point_coords (B, N+1, 2), point_labels (B, N+1))` on the device of the inputs.

    Example:
        >>> import torch
        >>> gt = torch.zeros(2, 1, 8, 8); gt[:, :, 2:5, 2:5] = 1
        >>> c, l = append_correction_clicks(None, None, torch.zeros(2, 1, 8, 8, dtype=torch.bool), gt, 0)
        >>> tuple(c.shape), l.tolist()
        ((2, 1, 2), [[1], [1]])
    """
    preds, gts = _batch_masks(pred_masks), _batch_masks(gt_masks)
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth masks")
    g = _as_rng(rng)
    b = len(gts)
    device = point_coords.device if point_coords is not None else (
        gt_masks.device if isinstance(gt_masks, torch.Tensor) else torch.device("cpu")
    )
    new_c = torch.zeros(b, 1, 2, dtype=torch.float32)
    new_l = torch.full((b, 1), -1, dtype=torch.int64)
    for i, (p, t) in enumerate(zip(preds, gts)):
        click = correction_click(p, t, g, mode)
        if click is not None:
            new_c[i, 0] = torch.from_numpy(click[0])
            new_l[i, 0] = click[1]
    new_c, new_l = new_c.to(device), new_l.to(device)
    if point_coords is None or point_labels is None:
        return new_c, new_l
    if point_coords.shape[0] != b or point_labels.shape[0] != b:
        raise ValueError(f"points are for {point_coords.shape[0]} items but masks for {b}")
    return (torch.cat([point_coords.to(torch.float32), new_c], dim=1),
            torch.cat([point_labels.to(torch.int64), new_l], dim=1))


def _count(spec: Union[int, Tuple[int, int]], g: np.random.Generator) -> int:
    if isinstance(spec, (tuple, list)):
        lo, hi = int(spec[0]), int(spec[1])
        return int(g.integers(lo, hi + 1))
    return int(spec)


def _check_count(spec: Any, name: str) -> None:
    if isinstance(spec, (tuple, list)):
        ok = len(spec) == 2 and all(isinstance(v, (int, np.integer)) and v >= 0 for v in spec) and spec[0] <= spec[1]
    else:
        ok = isinstance(spec, (int, np.integer)) and not isinstance(spec, bool) and spec >= 0
    if not ok:
        raise ValueError(f"{name}={spec!r} must be a non-negative int or an inclusive range (lo, hi) with lo <= hi")


def one_component(masks: torch.Tensor, rng: RngLike = None, min_pixels: int = 16) -> torch.Tensor:
    """Each item's mask cut down to one of its connected components, chosen at random among those
    of at least `min_pixels` pixels (the largest when none is that big; an empty mask stays empty).

    A union mask of several objects has no single object a box or click could point at; one
    component is one object, so prompted batches can be cut from promptless data.

    Args:
        masks: (B, 1, H, W) binary tensor.
        rng: numpy Generator or seed.
        min_pixels: the smallest component that may be chosen.

    Returns:
        A (B, 1, H, W) tensor of the same dtype and device.

    Example:
        >>> m = torch.zeros(1, 1, 12, 12); m[0, 0, 1:5, 1:5] = 1; m[0, 0, 7:11, 7:11] = 1
        >>> one = one_component(m, rng=0)
        >>> int(one.sum()), bool((one <= m).all())
        (16, True)
    """
    import cv2

    g = _as_rng(rng)
    out = torch.zeros_like(masks)
    for i in range(masks.shape[0]):
        m = (masks[i, 0] > 0.5).cpu().numpy().astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n <= 1:
            continue
        areas = stats[1:, cv2.CC_STAT_AREA]
        big = np.flatnonzero(areas >= min_pixels)
        k = int(g.choice(big)) if len(big) else int(areas.argmax())
        out[i, 0] = torch.from_numpy(labels == k + 1).to(masks.device, masks.dtype)
    return out


class PromptSampler:
    """Sample a batch of training prompts from ground-truth masks.

    Modes:

    * `"none"` -- no prompt (promptless decoding, as SAM-Adapter trains).
    * `"box"` -- a jittered box per item (`box_from_mask`).
    * `"points"` -- `n_pos` positive and `n_neg` negative points per item (`sample_points`).
    * `"box+points"` -- both.
    * `"mixed"` -- each item gets a box (probability `box_prob`) or points.
      A batch cannot hold "no box" for one item and a box for another in
      `Sam.decode`'s tensors, so per-item mixing (`mixed_per="item"`)
      returns `box_mask` (B,) telling which rows of `boxes` are real; the
      other rows hold the whole-valid-image box and their items carry points.
      `mixed_per="batch"` draws one choice for the whole batch instead,
      which any SAM decoder accepts as is.

    `n_pos`/`n_neg` may be ranges `(lo, hi)` (inclusive) drawn per item;
    counts then differ and the points are padded with label -1.

    Args:
        mode: one of `PROMPT_MODES`.
        n_pos: positive points per item (int or range).
        n_neg: negative points per item (int or range).
        box_jitter: see `box_from_mask` `jitter`.
        max_box_noise: see `box_from_mask` `max_noise`.
        box_prob: probability of a box in `"mixed"` mode.
        mixed_per: `"item"` or `"batch"`.
        seed: seed of the sampler's own generator (used when a call gets no `rng`).

    Returns (of a call): dict with `point_coords` float32 (B, N, 2) or None,
    `point_labels` int64 (B, N) or None (-1 = padding), `boxes` float32
    (B, 4) or None, `box_mask` bool (B,) or None (None unless some items have no box).

    Example:
        >>> import torch
        >>> masks = torch.zeros(2, 1, 16, 16); masks[:, :, 4:9, 5:12] = 1
        >>> out = PromptSampler("box+points", n_pos=2, n_neg=1, seed=0)(masks)
        >>> tuple(out["point_coords"].shape), tuple(out["boxes"].shape), out["point_labels"][0].tolist()
        ((2, 3, 2), (2, 4), [1, 1, 0])
    """

    def __init__(
        self,
        mode: str = "box",
        n_pos: Union[int, Tuple[int, int]] = 1,
        n_neg: Union[int, Tuple[int, int]] = 0,
        box_jitter: float = 0.1,
        max_box_noise: Optional[float] = 20.0,
        box_prob: float = 0.5,
        mixed_per: str = "item",
        seed: Optional[int] = None,
    ) -> None:
        if mode not in PROMPT_MODES:
            raise ValueError(f"mode={mode!r} is unknown; use one of {list(PROMPT_MODES)}")
        _check_count(n_pos, "n_pos")
        _check_count(n_neg, "n_neg")
        if mode in ("points", "box+points", "mixed"):
            hi = (n_pos[1] if isinstance(n_pos, (tuple, list)) else n_pos) + (
                n_neg[1] if isinstance(n_neg, (tuple, list)) else n_neg
            )
            if hi == 0:
                raise ValueError(f"mode {mode!r} needs points but n_pos and n_neg are both 0; set n_pos >= 1")
        if box_jitter < 0:
            raise ValueError(f"box_jitter={box_jitter} must be >= 0 (SAM uses 0.1)")
        if not 0.0 <= box_prob <= 1.0:
            raise ValueError(f"box_prob={box_prob} must be in [0, 1]")
        if mixed_per not in ("item", "batch"):
            raise ValueError(f"mixed_per={mixed_per!r} is not valid; use 'item' or 'batch'")
        self.mode = mode
        self.n_pos = n_pos
        self.n_neg = n_neg
        self.box_jitter = box_jitter
        self.max_box_noise = max_box_noise
        self.box_prob = box_prob
        self.mixed_per = mixed_per
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return (f"PromptSampler(mode={self.mode!r}, n_pos={self.n_pos!r}, n_neg={self.n_neg!r}, "
                f"box_jitter={self.box_jitter}, box_prob={self.box_prob}, mixed_per={self.mixed_per!r})")

    def __call__(
        self, masks: Any, valid_sizes: Any = None, rng: RngLike = None
    ) -> Dict[str, Optional[torch.Tensor]]:
        """Sample prompts for a batch.

        Args:
            masks: (B, 1, H, W) or (B, H, W) tensor/array, or a list of H x W masks.
            valid_sizes: optional (B, 2) unpadded `(h, w)` per item (`"input_size"`
                of a SAM batch): boxes and points stay inside it.
            rng: overrides the sampler's generator for this call.

        Returns:
            see the class docstring.
        """
        ms = _batch_masks(masks)
        g = self.rng if rng is None else _as_rng(rng)
        b = len(ms)
        if valid_sizes is not None:
            if isinstance(valid_sizes, torch.Tensor):
                valid_sizes = valid_sizes.detach().cpu().numpy()
            vs = np.asarray(valid_sizes)
            if vs.size != 2 * b:
                raise ValueError(
                    f"valid_sizes has shape {vs.shape} for a batch of {b}; pass (B, 2) (h, w) rows, "
                    "e.g. batch['input_size']"
                )
            vs = vs.reshape(b, 2).astype(np.int64)
        else:
            vs = None
        device = masks.device if isinstance(masks, torch.Tensor) else torch.device("cpu")
        out: Dict[str, Optional[torch.Tensor]] = {
            "point_coords": None, "point_labels": None, "boxes": None, "box_mask": None
        }
        if self.mode == "none" or b == 0:
            return out
        if self.mode == "mixed":
            if self.mixed_per == "batch":
                use_box = np.full(b, g.random() < self.box_prob)
            else:
                use_box = g.random(b) < self.box_prob
            use_pts = ~use_box
        else:
            use_box = np.full(b, self.mode in ("box", "box+points"))
            use_pts = np.full(b, self.mode in ("points", "box+points"))

        boxes = np.zeros((b, 4), np.float32)
        coords: List[np.ndarray] = []
        labels: List[np.ndarray] = []
        for i, m in enumerate(ms):
            valid = (int(vs[i, 0]), int(vs[i, 1])) if vs is not None else None
            mv = m if valid is None else m[: valid[0], : valid[1]]
            if use_box[i]:
                boxes[i] = box_from_mask(mv, self.box_jitter, g, self.max_box_noise, empty="full")
            else:
                boxes[i] = [0, 0, mv.shape[1] - 1, mv.shape[0] - 1]
            if use_pts[i]:
                c, lab = sample_points(m, _count(self.n_pos, g), _count(self.n_neg, g), g, valid)
            else:
                c, lab = np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
            coords.append(c)
            labels.append(lab)
        if use_pts.any():
            pc, pl = pad_points(coords, labels, min_points=1)
            out["point_coords"], out["point_labels"] = pc.to(device), pl.to(device)
        if use_box.any():
            out["boxes"] = torch.from_numpy(boxes).to(device)
            if not use_box.all():
                out["box_mask"] = torch.from_numpy(use_box.copy()).to(device)
        return out
