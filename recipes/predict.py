# why over 500 lines: the whole `samadapt predict` command (parsing prompts, streaming batches, writing outputs)
"""`samadapt predict`: masks for many images with a frozen core and an optional adapter.

Modes:

* promptless (no `--box`/`--point`/`--prompts`): the decoder runs with no prompt at all,
  the setting promptless adapters (`prompt_mode: none`) are trained in;
* prompted: `--box x0,y0,x1,y1` and/or `--point x,y[,label]` (repeatable, label 1 =
  foreground by default, 0 = background), in original-image pixels, used for every image; or
  `--prompts FILE.json`, per image (see `load_prompts_file`);
* `--auto`: automatic mask generation from a point grid (`--points-per-side`).

Outputs (in `--out`, each written atomically: temporary name, then `os.replace`):

* `<stem>.png`: the binary mask (0/255) at the original image size; when an image gets
  several masks (several prompt sets for it) `<stem>_<k>.png`, k = 0, 1, ... in file order;
* `<stem>_prob.png` (`<stem>_<k>_prob.png`) with `--probs`: sigmoid of the logits, 0..255;
* `<stem>_overlay.png` unless `--no-overlay`: the masks tinted over the image;
* `--multimask`: three candidate masks per prompt set (SAM's ambiguity outputs), named as several masks;
* `masks.json`: one record per mask written, segment_anything's keys (`segmentation` as COCO RLE,
  `area`, `bbox` [x, y, w, h], `predicted_iou`, `point_coords`, `stability_score`, `crop_box`) plus
  `image`, `file` (the PNG, or null with `--format coco`), `prompt` (index of the prompt set) and
  `candidate` (0..2 with `--multimask`);
* `--format coco|both`: `coco.json`, a COCO instance-segmentation file (RLE through pycocotools,
  categories from the adapter's `classes` or its domain, image ids and sizes); `coco` alone writes no
  mask PNGs;
* `--auto`: `<stem>_auto.png` (label map: pixel value i is entry i-1 of the JSON list; 16-bit
  when there are more than 255 masks; smaller masks painted over larger ones) and
  `<stem>_auto.json` (segment_anything's records, largest first, RLE segmentation), plus the overlay;
  segment_anything's thresholds are flags, and an image where no mask passes them gets a warning
  naming the threshold to lower.

Images are streamed: files are read a batch ahead in a background thread, each batch of
`--batch-size` images is encoded in one `sam.encode_image` call, decoded per image on a thread
while the next batch is encoded, and written on writer threads, so memory stays bounded whatever
the number of images. The default batch is 8 images, but 1 on a CPU from 512 px (there vit_b at
1024 px took 1.3-1.5x as long per image in batches of 8 under bf16, 1.1x in batches of 4 under
fp32, so batching only added latency; `sam_core.fast.encoder_batch`).

Errors: a bad base, adapter, output folder, image path or prompt exits 2 before anything is
written. An image that cannot be read (or fails later) is reported as `error: <file>: ...` on
stderr, the others are still written, and the exit code is 1 at the end.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from samadapt.adapters.io import atomic_file

from .data import IMAGE_EXTENSIONS, list_images
from .errors import ImageReadError, PredictError, PromptError
from .limits import MAX_PIXELS, MAX_POINTS, MAX_POINTS_PER_SIDE
from .shard import my_share, process_share

__all__ = [
    "PredictError",
    "PromptError",
    "run_predict",
    "parse_box",
    "parse_point",
    "load_prompts_file",
    "collect_images",
]

RUN_FILES = ("masks.json", "coco.json")  # written once per run; no image's outputs may take these names
# tint colours of the overlays (RGB), one per mask, cycled
PALETTE = np.array([
    (255, 40, 40), (40, 200, 255), (60, 230, 60), (255, 200, 0), (230, 60, 230), (255, 128, 0),
    (0, 128, 255), (160, 255, 60), (255, 80, 160), (0, 220, 180),
], dtype=np.float32)
OVERLAY_ALPHA = 0.5

# A prompt set: {"points": N x 2 float array | None, "labels": N int array | None, "box": 4 floats | None}
PromptSet = Dict[str, Optional[np.ndarray]]




# ----------------------------------------------------------------------------- prompt parsing
def _numbers(text: str, what: str, counts: Sequence[int]) -> List[float]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) not in counts or not all(math.isfinite(v) for v in vals):
        raise PromptError(f"{what} {text!r} is malformed")
    return vals


def _check_box(vals: Sequence[float], where: str) -> np.ndarray:
    try:
        box = np.asarray(vals, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise PromptError(f"{where}: box {vals!r} is not 4 numbers x0, y0, x1, y1") from None
    if box.size != 4 or not np.isfinite(box).all():
        raise PromptError(f"{where}: box {vals!r} is not 4 finite numbers x0, y0, x1, y1")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise PromptError(
            f"{where}: box {list(vals)} has x1 <= x0 or y1 <= y0; give x0,y0,x1,y1 (top-left, bottom-right)"
        )
    return box


def parse_box(text: str) -> np.ndarray:
    """`"x0,y0,x1,y1"` -> float array of 4 (original-image pixels).

    Example:
        >>> parse_box("10, 20, 110, 80").tolist()
        [10.0, 20.0, 110.0, 80.0]
    """
    vals = _numbers(text, "--box", (4,))
    return _check_box(vals, f"--box {text!r}")


def _check_label(label: float, where: str) -> int:
    if label not in (0.0, 1.0):
        raise PromptError(f"{where}: point label {label:g} is not 1 (foreground) or 0 (background)")
    return int(label)


def parse_point(text: str) -> Tuple[float, float, int]:
    """`"x,y[,label]"` -> (x, y, label); label 1 (foreground, the default) or 0 (background).

    Example:
        >>> parse_point("30,40"), parse_point("5,6,0")
        ((30.0, 40.0, 1), (5.0, 6.0, 0))
    """
    vals = _numbers(text, "--point", (2, 3))
    label = _check_label(vals[2], f"--point {text!r}") if len(vals) == 3 else 1
    return vals[0], vals[1], label


def _prompt_set(box: Optional[np.ndarray], points: Sequence[Sequence[float]]) -> PromptSet:
    if len(points) > MAX_POINTS:
        raise PromptError(f"{len(points)} points in one prompt set; the limit is {MAX_POINTS} (a few clicks and a "
                          "box are what SAM was trained with)")
    pts = np.asarray([p[:2] for p in points], dtype=float).reshape(-1, 2) if points else None
    lbl = np.asarray([int(p[2]) for p in points], dtype=np.int64) if points else None
    return {"points": pts, "labels": lbl, "box": box}


def _entry_sets(value: Any, where: str) -> List[PromptSet]:
    """One entry of a prompts mapping -> prompt sets (one mask each)."""
    if isinstance(value, list):
        out: List[PromptSet] = []
        for i, v in enumerate(value):
            if not isinstance(v, dict):
                raise PromptError(f"{where}[{i}]: expected an object with 'box' and/or 'points'")
            out += _entry_sets(v, f"{where}[{i}]")
        return out
    if not isinstance(value, dict):
        raise PromptError(f"{where}: expected an object with 'box' and/or 'points' (or a list of them)")
    unknown = set(value) - {"box", "boxes", "points"}
    if unknown:
        raise PromptError(f"{where}: unknown key(s) {sorted(unknown)}; use 'box', 'boxes' or 'points'")
    points = []
    raw_points = value.get("points") or []
    if not isinstance(raw_points, list):
        raise PromptError(f"{where}: 'points' must be a list of [x, y] or [x, y, label]")
    for j, p in enumerate(raw_points):
        ok = isinstance(p, (list, tuple)) and len(p) in (2, 3) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
        if not ok:
            raise PromptError(f"{where}: points[{j}] = {p!r} is not [x, y] or [x, y, label]")
        label = _check_label(float(p[2]), f"{where}: points[{j}]") if len(p) == 3 else 1
        points.append((float(p[0]), float(p[1]), label))
    if "boxes" in value:
        if "box" in value or points:
            raise PromptError(f"{where}: 'boxes' (one mask per box) cannot be combined with 'box' or 'points'")
        if not isinstance(value["boxes"], list) or not value["boxes"]:
            raise PromptError(f"{where}: 'boxes' must be a non-empty list of [x0, y0, x1, y1]")
        return [_prompt_set(_check_box(b, f"{where}: boxes[{k}]"), []) for k, b in enumerate(value["boxes"])]
    box = _check_box(value["box"], where) if value.get("box") is not None else None
    if box is None and not points:
        raise PromptError(f"{where}: neither 'box' nor 'points' given")
    return [_prompt_set(box, points)]


def load_prompts_file(path: str) -> Dict[str, List[PromptSet]]:
    """Read a prompts JSON file -> {image file name or stem: [prompt set, ...]} (one mask per set).

    Two layouts are accepted:

    * a mapping `{"a.png": {"box": [x0, y0, x1, y1], "points": [[x, y, label], ...]}, ...}`
      keyed by file name or stem; `label` is optional (1); a value may also be a list of such
      objects, or `{"boxes": [[...], ...]}`, for several masks of one image;
    * COCO: `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "bbox": [x, y, w, h]}]}`,
      one mask per annotation, in file order (an image without annotations gets no mask).

    Example:
        >>> import json, os, tempfile
        >>> f = os.path.join(tempfile.mkdtemp(), "p.json")
        >>> _ = open(f, "w").write(json.dumps({"a.png": {"box": [1, 2, 30, 40], "points": [[5, 6]]}}))
        >>> s = load_prompts_file(f)["a.png"][0]; s["box"].tolist(), s["points"].tolist(), s["labels"].tolist()
        ([1.0, 2.0, 30.0, 40.0], [[5.0, 6.0]], [1])
    """
    p = Path(path)
    if not p.is_file():
        raise PromptError(f"--prompts {path}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptError(f"--prompts {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise PromptError(f"--prompts {path}: expected a JSON object (image name -> prompts, or COCO)")
    if "images" in data and "annotations" in data:
        return _load_coco(data, path)
    return {str(k): _entry_sets(v, f"--prompts {path}: {k!r}") for k, v in data.items()}


def _load_coco(data: Dict[str, Any], path: str) -> Dict[str, List[PromptSet]]:
    images, anns = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(anns, list):
        raise PromptError(f"--prompts {path}: COCO 'images' and 'annotations' must be lists")
    names: Dict[Any, str] = {}
    out: Dict[str, List[PromptSet]] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise PromptError(f"--prompts {path}: images[{i}] lacks 'id' or 'file_name'")
        names[im["id"]] = im["file_name"]
        out.setdefault(im["file_name"], [])
    for i, a in enumerate(anns):
        where = f"--prompts {path}: annotations[{i}]"
        if not isinstance(a, dict) or "image_id" not in a or "bbox" not in a:
            raise PromptError(f"{where} lacks 'image_id' or 'bbox'")
        if a["image_id"] not in names:
            raise PromptError(f"{where}: image_id {a['image_id']!r} is not in 'images'")
        b = a["bbox"]
        if not (
            isinstance(b, list)
            and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)
        ):
            raise PromptError(f"{where}: bbox {b!r} is not [x, y, w, h]")
        x, y, w, h = (float(v) for v in b)
        out[names[a["image_id"]]].append(_prompt_set(_check_box([x, y, x + w, y + h], where), []))
    return out


def _match_prompts(paths: Sequence[Path], table: Dict[str, List[PromptSet]]) -> Dict[Path, List[PromptSet]]:
    """Prompt sets per image: the entry keyed by the path as given, its file name or its stem."""
    by_key: Dict[str, List[PromptSet]] = {}
    for k, v in table.items():
        for key in (k, Path(k).name, Path(k).stem):
            by_key.setdefault(key, v)
    out = {}
    for p in paths:
        for key in (str(p), p.name, p.stem):
            if key in by_key:
                out[p] = by_key[key]
                break
    return out


# ----------------------------------------------------------------------------- images and names
def collect_images(items: Sequence[str]) -> List[Path]:
    """Files as given, folders expanded to their images (sorted, image extensions only).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "b.png").write_bytes(b""); _ = (d / "a.txt").write_bytes(b"")
        >>> [p.name for p in collect_images([str(d)])]
        ['b.png']
    """
    out: List[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = list_images(p, IMAGE_EXTENSIONS)
            if not found:
                raise PredictError(f"{p}: folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise PredictError(f"{p}: no such image file or folder")
    return out


def mask_names(stem: str, n_masks: int) -> List[str]:
    """The mask file stems of one image: `<stem>` for one mask, `<stem>_<k>` for several."""
    return [stem] if n_masks == 1 else [f"{stem}_{k}" for k in range(n_masks)]


def output_files(stem: str, n_masks: int, probs: bool, overlay: bool, auto: bool) -> List[str]:
    """Every file one image writes (the writers below take their names from here).

    Example:
        >>> output_files("a", 2, probs=True, overlay=True, auto=False)
        ['a_0.png', 'a_0_prob.png', 'a_1.png', 'a_1_prob.png', 'a_overlay.png']
    """
    if auto:
        files = [f"{stem}_auto.png", f"{stem}_auto.json"]
    else:
        files = [f"{m}{suffix}" for m in mask_names(stem, n_masks) for suffix in (".png", "_prob.png")[:1 + probs]]
    return files + ([f"{stem}_overlay.png"] if overlay else [])


def _output_stems(paths: Sequence[Path], n_masks: Sequence[int] = (), probs: bool = False, overlay: bool = True,
                  auto: bool = False, reserved: Sequence[str] = RUN_FILES) -> List[str]:
    """Output stems whose files never collide, whatever the input names: the file stem, qualified by the
    extension when two inputs share a stem, then a counter until none of the image's files (masks, k-th
    masks, probabilities, overlay; compared case-insensitively) is already another image's.

    Example:
        >>> _output_stems([Path("a.png"), Path("a_overlay.png"), Path("a.jpg")])
        ['a_png', 'a_overlay', 'a_jpg']
        >>> _output_stems([Path("a.png"), Path("a_overlay.png")])
        ['a', 'a_overlay_2']
    """
    counts: Dict[str, int] = {}
    for p in paths:
        counts[p.stem.lower()] = counts.get(p.stem.lower(), 0) + 1
    used: set = {f.lower() for f in reserved}
    out = []
    for i, p in enumerate(paths):
        stem = p.stem if counts[p.stem.lower()] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower() or 'img'}"
        n = n_masks[i] if i < len(n_masks) else 1
        cand, k = stem, 1
        while True:
            files = {f.lower() for f in output_files(cand, max(n, 1), probs, overlay, auto)}
            if not files & used:
                break
            k += 1
            cand = f"{stem}_{k}"
        used |= files
        out.append(cand)
    return out


# ----------------------------------------------------------------------------- writing
def _atomic_save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_file(path, fsync=False) as tmp:  # thousands of files: no fsync per mask
        Image.fromarray(arr).save(tmp, format="PNG")


def _atomic_write_text(text: str, path: Path) -> None:
    with atomic_file(path, fsync=False) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


def _overlay(
    image: np.ndarray, masks: Sequence[np.ndarray], prompts: Sequence[Optional[PromptSet]] = ()
) -> np.ndarray:
    """Masks over the image, one palette colour each: a translucent fill and an opaque outline (seen on
    objects of the mask's own colour too); boxes and points drawn on top.
    """
    import cv2
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    for k, m in enumerate(masks):
        c = PALETTE[k % len(PALETTE)]
        out[m] = out[m] * (1 - OVERLAY_ALPHA) + c * OVERLAY_ALPHA
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    width = max(1, round(max(image.shape[:2]) / 300))
    for k, m in enumerate(masks):
        contours, _ = cv2.findContours(np.asarray(m, np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        c = tuple(int(v) for v in PALETTE[k % len(PALETTE)])
        out = np.ascontiguousarray(out)
        cv2.drawContours(out, contours, -1, c, width)
    if not any(prompts):
        return out
    im = Image.fromarray(out)
    draw = ImageDraw.Draw(im)
    r = max(2, round(max(image.shape[:2]) / 150))
    for k, ps in enumerate(prompts):
        if not ps:
            continue
        c = tuple(int(v) for v in PALETTE[k % len(PALETTE)])
        if ps["box"] is not None:
            draw.rectangle([float(v) for v in ps["box"]], outline=c, width=max(1, r // 2))
        if ps["points"] is not None:
            for (x, y), lab in zip(ps["points"], ps["labels"]):
                draw.ellipse(
                    [x - r, y - r, x + r, y + r],
                    fill=(0, 255, 0) if lab == 1 else (255, 0, 0),
                    outline=(255, 255, 255),
                )
    return np.asarray(im)


# ----------------------------------------------------------------------------- streaming
def check_pixels(path: Path, max_pixels: int) -> None:
    """Refuse an image over `max_pixels` from its header, before decoding it (when Pillow can read it).

    Raises:
        ImageReadError: naming the image's size, the limit and the fix.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
    except Exception:  # not Pillow's format (or corrupt): read_image decides and says why
        return
    if w * h > max_pixels:
        raise ImageReadError(f"image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} "
                             "(raise --max-pixels or downscale it)")


def _read_ahead(paths: Sequence[Path], window: int, max_pixels: int = MAX_PIXELS) -> Iterator[Tuple[int, Any]]:
    """(index, image or the exception reading it), in order, reading up to `window` files ahead."""
    from .data import read_image

    def read(p: Path):
        try:
            check_pixels(p, max_pixels)
            return read_image(p)
        except Exception as e:  # reported per image by the caller
            return e

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="samadapt-read") as pool:
        pending: deque = deque()
        it = iter(range(len(paths)))
        for i in it:
            pending.append((i, pool.submit(read, paths[i])))
            if len(pending) >= window:
                break
        while pending:
            i, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, paths[nxt])))
            yield i, fut.result()


def _error_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, OSError) and getattr(e, "strerror", None):
        msg = e.strerror + (f": {e.filename}" if getattr(e, "filename", None) else "")
    name = type(e).__name__
    if not msg:
        return name
    return msg if isinstance(e, (ValueError, OSError)) else f"{name}: {msg}"


class _Runner:
    """Shared state of one predict run: model, output folder, error reporting, write queue."""

    def __init__(self, sam, out: Path, args, paths: Sequence[Path], n_masks: Sequence[int] = ()) -> None:
        from tqdm import tqdm

        self.sam, self.out, self.args, self.paths = sam, out, args, paths
        self.stems = _output_stems(paths, n_masks, probs=bool(getattr(args, "probs", False)),
                                   overlay=not args.no_overlay, auto=bool(args.auto))
        self.failed: set = set()
        self.records: Dict[int, List[Dict[str, Any]]] = {}  # image index -> its masks.json records
        self.sizes: Dict[int, Tuple[int, int]] = {}  # image index -> (width, height)
        # disable=None: a bar when stderr is a terminal; none in logs/pipes, where its carriage
        # returns would glue themselves to the `error:` lines
        self.bar = tqdm(
            total=len(paths), desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True, disable=None
        )
        self.writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="samadapt-write")
        self.writes: deque = deque()  # (image index, future)
        self.max_pending = max(4, 2 * encoder_batch_size(args, sam))

    def error(self, i: int, e: BaseException) -> None:
        if i in self.failed:
            return
        self.failed.add(i)
        self.bar.write(f"error: {self.paths[i]}: {_error_text(e)}", file=sys.stderr)

    def warn(self, text: str) -> None:
        self.bar.write(f"warning: {text}", file=sys.stderr)

    def _reap(self, block_until: int) -> None:
        while self.writes and (len(self.writes) > block_until or self.writes[0][1].done()):
            i, fut = self.writes.popleft()
            try:
                fut.result()
            except Exception as e:
                self.error(i, e)

    def submit_write(self, i: int, fn, *fn_args) -> None:
        """Write on the writer threads; at most `max_pending` images wait (bounded memory)."""
        self.writes.append((i, self.writer.submit(fn, *fn_args)))
        self._reap(self.max_pending)

    def close(self) -> int:
        try:
            self._reap(0)
        finally:
            self.writer.shutdown(wait=True)
            self.bar.close()
        return 1 if self.failed else 0


def _write_masks(r: "_Runner", i: int, image: np.ndarray, logits: List[np.ndarray], scores: List[float],
                 which: List[Tuple[int, int]], prompts: List[Optional[PromptSet]], threshold: float) -> None:
    """One image's mask PNGs (unless --format coco), probabilities, overlay and masks.json records.

    `which[j]` is (prompt set index, candidate index) of mask j (candidates 0..2 with --multimask).
    """
    from .coco import json_record, json_rle_mode, mask_record

    out, stem, args = r.out, r.stems[i], r.args
    pngs = getattr(args, "format", "png") in ("png", "both")
    masks = [lg > threshold for lg in logits]
    records = []
    for name, m, lg, sc, (k, c) in zip(mask_names(stem, len(masks)), masks, logits, scores, which):
        if pngs:
            _atomic_save_png(m.astype(np.uint8) * 255, out / f"{name}.png")
        if args.probs:
            p = 1.0 / (1.0 + np.exp(-np.clip(lg.astype(np.float64), -60, 60)))
            _atomic_save_png(np.round(p * 255).astype(np.uint8), out / f"{name}_prob.png")
        ps = prompts[k]
        pts = ps["points"].tolist() if ps is not None and ps["points"] is not None else []
        rec = json_record(mask_record(m, sc, pts), json_rle_mode(), image=r.paths[i].name,
                          file=f"{name}.png" if pngs else None, prompt=k, candidate=c)
        if ps is not None and ps["box"] is not None:
            rec["box"] = [float(v) for v in ps["box"]]
        records.append(rec)
    if not args.no_overlay:
        shown = [prompts[k] for k, _ in which]
        _atomic_save_png(_overlay(image, masks, shown), out / f"{stem}_overlay.png")
    r.records[i] = records  # one key per image: no two writer threads touch the same entry


def _prompt_arrays(ps: Optional[PromptSet]) -> Dict[str, Any]:
    """`SamPredictor.predict` keyword arguments for one prompt set (None: promptless)."""
    if ps is None:
        return {}
    out: Dict[str, Any] = {}
    if ps["points"] is not None:
        out["point_coords"], out["point_labels"] = ps["points"], ps["labels"]
    if ps["box"] is not None:
        out["box"] = ps["box"]
    return out


def encoder_batch_size(args: Any, sam: Any) -> int:
    """Images per encoder call: `--batch-size` if given, else `sam_core.fast.encoder_batch` (8; 1 on a
    CPU from 512 px, where a batch took longer per image than one image at a time).

    Example:
        >>> import argparse
        >>> from samadapt.sam_core import build_sam
        >>> encoder_batch_size(argparse.Namespace(batch_size=None), build_sam("tiny", image_size=1024))
        1
        >>> encoder_batch_size(argparse.Namespace(batch_size=4), build_sam("tiny"))
        4
    """
    from samadapt.sam_core.fast import encoder_batch

    given = getattr(args, "batch_size", None)
    return int(given) if given is not None else encoder_batch(sam)


def _run_masks(r: _Runner, jobs: Dict[int, List[Optional[PromptSet]]]) -> None:
    """Encode the images in batches of `--batch-size`; each batch's prompts are decoded (and its files
    written, on the writer threads) on a decode thread while the next batch is read and encoded.
    """
    import torch

    from samadapt.sam_core import SamPredictor

    sam, args = r.sam, r.args
    precision = getattr(args, "precision", None)
    encoder = SamPredictor(sam, precision=precision)
    decoder = SamPredictor(sam, precision=precision)  # its own current image: used by the decode thread only
    todo = sorted(jobs)
    bs = encoder_batch_size(args, sam)
    decoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samadapt-decode")
    pending: List[Any] = []  # the previous batch's decode: at most one waits, so memory stays bounded

    multi = bool(getattr(args, "multimask", False))

    def decode(batch: List[Tuple[int, np.ndarray]], embeddings: List[Any]) -> None:
        for (i, img), emb in zip(batch, embeddings):
            try:
                decoder.set_embedding(emb)
                logits, scores, which = [], [], []
                for k, ps in enumerate(jobs[i]):
                    with torch.no_grad():
                        lg, sc, _ = decoder.predict(**_prompt_arrays(ps), multimask_output=multi, return_logits=True)
                    for c in range(len(lg)):
                        logits.append(lg[c])
                        scores.append(float(sc[c]))
                        which.append((k, c))
                r.sizes[i] = (int(img.shape[1]), int(img.shape[0]))
                r.submit_write(i, _write_masks, r, i, img, logits, scores, which, jobs[i], float(sam.mask_threshold))
            except Exception as e:
                r.error(i, e)
            r.bar.update(1)

    def wait_decode() -> None:
        while pending:
            pending.pop().result()  # decode() reports per image; nothing of it raises

    def flush(batch: List[Tuple[int, np.ndarray]]) -> None:
        if not batch:
            return
        try:
            with torch.no_grad():
                embeddings = encoder.encode([img for _, img in batch])
        except Exception as e:
            if len(batch) > 1:  # one bad image never fails its neighbours: encode them one by one
                for item in batch:
                    flush([item])
                return
            r.error(batch[0][0], e)
            r.bar.update(1)
            return
        wait_decode()
        pending.append(decoding.submit(decode, batch, embeddings))

    try:
        batch: List[Tuple[int, np.ndarray]] = []
        for k, got in _read_ahead([r.paths[i] for i in todo], window=max(2, bs), max_pixels=_max_pixels(args)):
            i = todo[k]
            if isinstance(got, BaseException):
                r.error(i, got)
                r.bar.update(1)
                continue
            batch.append((i, got))
            if len(batch) >= bs:
                flush(batch)
                batch = []
        flush(batch)
        wait_decode()
    finally:
        decoding.shutdown(wait=True)


def _auto_outputs(r: "_Runner", i: int, image: np.ndarray, masks: List[Dict[str, Any]]) -> None:
    from .coco import json_record, json_rle_mode

    out, stem = r.out, r.stems[i]
    masks = sorted(masks, key=lambda m: -int(m["area"]))
    dtype = np.uint8 if len(masks) <= 255 else np.uint16
    labels = np.zeros(image.shape[:2], dtype)
    records = []
    for k, m in enumerate(masks):
        labels[np.asarray(m["segmentation"], bool)] = k + 1  # smaller masks (later) paint over larger ones
        records.append(json_record(m, json_rle_mode()))
    _atomic_save_png(labels, out / f"{stem}_auto.png")
    _atomic_write_text(json.dumps(records, indent=1), out / f"{stem}_auto.json")
    if not r.args.no_overlay:
        _atomic_save_png(_overlay(image, [labels == k + 1 for k in range(len(masks))]), out / f"{stem}_overlay.png")
    r.records[i] = [dict(rec, image=r.paths[i].name, file=f"{stem}_auto.png", label=k + 1)
                    for k, rec in enumerate(records)]


AUTO_FLAGS = {  # segment_anything's SamAutomaticMaskGenerator argument -> (flag, default)
    "pred_iou_thresh": ("--pred-iou-thresh", 0.88), "stability_score_thresh": ("--stability-score-thresh", 0.95),
    "box_nms_thresh": ("--box-nms-thresh", 0.7), "min_mask_region_area": ("--min-mask-region-area", 0),
    "crop_n_layers": ("--crop-n-layers", 0),
}


def auto_settings(args) -> Dict[str, Any]:
    """segment_anything's generator arguments from the `--auto` flags (their defaults when absent)."""
    return {k: getattr(args, k, None) if getattr(args, k, None) is not None else d for k, (_, d) in AUTO_FLAGS.items()}


def _suggest(values: np.ndarray) -> float:
    """A threshold the best candidate passes (its value rounded down to 0.01, less 0.01 for a strict '>')."""
    return max(0.0, float(np.floor(values.max() * 100) / 100) - 0.01) if values.size else 0.0


def why_no_masks(gen_open, image: np.ndarray, embedding, settings: Dict[str, Any]) -> str:
    """Why no mask passed: the candidates of a generator without thresholds, against each threshold.

    Returns:
        A sentence naming the threshold that removed them and a value to try.
    """
    cands = gen_open.generate(image, embedding=embedding)
    if not cands:
        return "the model proposed no mask at all (even with every threshold at 0); try another adapter or core"
    iou = np.array([m["predicted_iou"] for m in cands], dtype=float)
    stab = np.array([m["stability_score"] for m in cands], dtype=float)
    # an empty candidate's stability is 0/0: such candidates never pass, and say nothing of what would
    stab = np.where(np.isfinite(stab), stab, 0.0)
    iou = np.where(np.isfinite(iou), iou, 0.0)
    pi, ss = settings["pred_iou_thresh"], settings["stability_score_thresh"]
    n_iou, n_stab = int((iou > pi).sum()), int((stab >= ss).sum())
    if n_iou <= n_stab:
        suggest = _suggest(iou)
        return (f"{len(cands)} candidates, {n_iou} with predicted IoU above --pred-iou-thresh {pi:g} "
                f"(best {iou.max():.2f}); lower it, e.g. --pred-iou-thresh {suggest:g}")
    suggest = _suggest(stab)
    return (f"{len(cands)} candidates, {n_stab} with stability at least --stability-score-thresh {ss:g} "
            f"(best {stab.max():.2f}); lower it, e.g. --stability-score-thresh {suggest:g}")


def _run_auto(r: _Runner) -> None:
    import torch

    from samadapt.sam_core import SamAutomaticMaskGenerator, SamPredictor

    settings = auto_settings(r.args)
    gen = SamAutomaticMaskGenerator(r.sam, points_per_side=int(r.args.points_per_side),
                                    precision=getattr(r.args, "precision", None), **settings)
    gen_open = None
    predictor = SamPredictor(r.sam, precision=getattr(r.args, "precision", None))
    for i, got in _read_ahead(r.paths, window=2, max_pixels=_max_pixels(r.args)):
        if isinstance(got, BaseException):
            r.error(i, got)
            r.bar.update(1)
            continue
        try:
            with torch.no_grad():
                emb = predictor.encode([got])[0]
                masks = gen.generate(got, embedding=emb)
                if not masks:
                    if gen_open is None:  # built on first need: the diagnosis runs only where nothing passed
                        gen_open = SamAutomaticMaskGenerator(
                            r.sam, points_per_side=int(r.args.points_per_side),
                            **dict(settings, pred_iou_thresh=0.0, stability_score_thresh=0.0))
                    r.warn(f"{r.paths[i]}: 0 masks passed the thresholds: "
                           + why_no_masks(gen_open, got, emb, settings))
            r.sizes[i] = (int(got.shape[1]), int(got.shape[0]))
            r.submit_write(i, _auto_outputs, r, i, got, masks)
        except Exception as e:
            r.error(i, e)
        r.bar.update(1)


def _write_run_files(r: _Runner, fmt: str, info: Dict[str, Any], suffix: str = "") -> None:
    """masks.json (every record, image order) and, with --format coco/both, coco.json (`suffix` before the
    extension: one file per process of a sharded run).
    """
    from .coco import coco_file

    done = [i for i in range(len(r.paths)) if i in r.records and i not in r.failed]
    records = [rec for i in done for rec in r.records[i]]
    _atomic_write_text(json.dumps(records, indent=1), r.out / f"masks{suffix}.json")
    if fmt == "png":
        return
    names = [p.name for p in r.paths]
    unique = len({n.lower() for n in names}) == len(names)
    images = [{"id": i + 1, "file_name": names[i] if unique else str(r.paths[i]),
               "width": r.sizes[i][0], "height": r.sizes[i][1]} for i in done]
    anns = [{"image_id": i + 1, "segmentation": rec["segmentation"], "score": rec["predicted_iou"]}
            for i in done for rec in r.records[i]]
    classes = info.get("classes")
    if isinstance(classes, str):  # stored as JSON text in the file's metadata
        try:
            classes = json.loads(classes)
        except json.JSONDecodeError:
            classes = None
    classes = [str(c) for c in classes] if isinstance(classes, list) and classes else None
    coco = coco_file(images, anns, classes=classes, default_class=str(info.get("domain") or "object"))
    _atomic_write_text(json.dumps(coco), r.out / f"coco{suffix}.json")


# ----------------------------------------------------------------------------- entry point
def _max_pixels(args) -> int:
    v = getattr(args, "max_pixels", None)
    return MAX_PIXELS if v is None else int(v)


def _check_out(out: Path, inputs: Sequence[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {out}: exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PredictError(f"--out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise PredictError(f"--out {out}: {probe} is not writable")
    if out.exists():
        o = out.resolve()
        if any(p.resolve().parent == o for p in inputs):
            raise PredictError(
                f"--out {out} holds input images; masks would mix with (or replace) them - choose another folder"
            )


def run_line(sam, precision: Optional[str] = None) -> str:
    """The log line `samadapt predict` starts with: the core, the encoder route taken, the threads.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> run_line(build_sam("tiny"), "fp32").split(" (")[0]
        'predict: core tiny@256, encoder cpu fp32, factorised attention'
    """
    from samadapt.sam_core.fast import choose_route

    from .threads import openmp_summary

    return (f"predict: core {sam.arch}@{sam.image_size}, encoder {choose_route(sam, precision).describe()}, "
            f"{openmp_summary()}")


def run_predict(args) -> int:
    """Run `samadapt predict` on parsed arguments; 0 all written, 1 some image failed.

    User errors (bad base/adapter/out path, malformed prompts, no images) raise `PredictError`
    (or the adapter/checkpoint error) before anything is written; the CLI prints them and exits 2.

    Example:
        >>> import os, tempfile, numpy as np, torch
        >>> from PIL import Image
        >>> from samadapt.sam_core import build_sam
        >>> from samadapt.recipes.cli import main
        >>> d = tempfile.mkdtemp(); core = os.path.join(d, "core.pth"); out = os.path.join(d, "out")
        >>> torch.save(build_sam("tiny").state_dict(), core)
        >>> Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(os.path.join(d, "a.png"))
        >>> main(["predict", os.path.join(d, "a.png"), "--base", core, "--out", out, "--box", "10,10,50,40"])
        0
        >>> sorted(os.listdir(out))
        ['a.png', 'a_overlay.png', 'masks.json']
    """
    from .data.volumes import is_volume_input

    if any(is_volume_input(p) for p in args.images):  # NIfTI files, DICOM folders: K-class labels (predict_volume)
        from .predict_volume import run_volume_predict

        return run_volume_predict(args)
    # 1. everything that can be checked cheaply: prompts, sizes, images
    if getattr(args, "batch_size", None) is not None and int(args.batch_size) < 1:
        raise PredictError(f"--batch-size {args.batch_size}: use 1 or more")
    if args.auto and not 1 <= int(args.points_per_side) <= MAX_POINTS_PER_SIDE:
        raise PredictError(f"--points-per-side {args.points_per_side}: use 1 to {MAX_POINTS_PER_SIDE} (e.g. 32; "
                           f"the grid is its square of prompts)")
    if _max_pixels(args) < 1:
        raise PredictError(f"--max-pixels {args.max_pixels}: use 1 or more (default {MAX_PIXELS:,})")
    fmt = getattr(args, "format", "png") or "png"
    if fmt not in ("png", "coco", "both"):
        raise PredictError(f"--format {fmt}: use png, coco or both")
    if fmt != "png":
        from .coco import _mask_api

        _mask_api()  # pycocotools missing: one line naming the extra, before any work
    if args.auto:
        s = auto_settings(args)
        for k in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if not (isinstance(s[k], (int, float)) and 0.0 <= float(s[k]) <= 1.0):
                raise PredictError(f"{AUTO_FLAGS[k][0]} {s[k]}: use a number from 0 to 1 (default {AUTO_FLAGS[k][1]})")
        if int(s["min_mask_region_area"]) < 0:
            raise PredictError(f"--min-mask-region-area {s['min_mask_region_area']}: use 0 (off) or more pixels")
        if not 0 <= int(s["crop_n_layers"]) <= 3:
            raise PredictError(f"--crop-n-layers {s['crop_n_layers']}: use 0 (no crops) to 3")
    elif any(getattr(args, k, None) is not None for k in AUTO_FLAGS):
        raise PredictError("--pred-iou-thresh/--stability-score-thresh/--box-nms-thresh/--min-mask-region-area/"
                           "--crop-n-layers are --auto settings; add --auto or drop them")
    if args.auto and getattr(args, "multimask", False):
        raise PredictError("--multimask is for prompts (three candidates each); --auto already keeps every mask")
    cli_prompt = args.box is not None or bool(args.point)
    if args.auto and (cli_prompt or args.prompts):
        raise PredictError("--auto generates its own point grid; drop --box/--point/--prompts")
    if cli_prompt and args.prompts:
        raise PredictError("give either --box/--point (same prompt for every image) or --prompts FILE, not both")
    box = parse_box(args.box) if args.box is not None else None
    points = [parse_point(p) for p in args.point]
    table = load_prompts_file(args.prompts) if args.prompts else None
    paths = collect_images(args.images)
    if not paths:
        raise PredictError("no image given")
    jobs: Dict[int, List[Optional[PromptSet]]] = {}
    notes: List[str] = []
    if table is not None:
        matched = _match_prompts(paths, table)
        if not matched:
            raise PromptError(f"--prompts {args.prompts}: no entry matches any of the {len(paths)} image(s) "
                              f"(keys are file names or stems, e.g. {paths[0].name!r})")
        missing = [p.name for p in paths if p not in matched]
        if missing:
            notes.append(f"{len(missing)} image(s) have no entry in {args.prompts} and are skipped: "
                         + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
        empty = [p.name for p, v in matched.items() if not v]
        if empty:
            notes.append(f"{len(empty)} image(s) have no annotation in {args.prompts} and get no mask: "
                         + ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""))
        jobs = {i: list(matched[p]) for i, p in enumerate(paths) if matched.get(p)}
    elif not args.auto:
        ps = _prompt_set(box, points) if cli_prompt else None
        jobs = {i: [ps] for i in range(len(paths))}
    out = Path(args.out)
    _check_out(out, paths)
    from samadapt.sam_core.fast import resolve_precision

    try:
        resolve_precision(getattr(args, "precision", None))
    except ValueError as e:
        raise PredictError(str(e)) from None

    # 2. the model (bad base / adapter -> exit 2, nothing written yet)
    import torch

    from samadapt import adapters

    from .model import load_base

    sam = load_base(args.base)
    info: Dict[str, Any] = {}
    if args.adapter:
        adapters.load(sam, args.adapter, allow_base_mismatch=getattr(args, "allow_base_mismatch", False))
        info = adapters.inspect(args.adapter)
        mode = info.get("prompt_mode") or "none"
        prompted = bool(jobs) and any(ps is not None for v in jobs.values() for ps in v)
        if mode == "none" and prompted:
            notes.append(f"{args.adapter} was trained promptless (prompt_mode none); using the given prompts anyway")
        elif mode != "none" and not prompted and not args.auto:
            notes.append(
                f"{args.adapter} was trained with prompt_mode {mode!r}; running promptless as no prompt was given"
            )
    sam.eval()
    rank, size = process_share()  # under `accelerate launch --num_processes N`: this process's share only
    if torch.cuda.is_available():
        sam.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}" if size > 1 else "cuda")

    # 3. predict
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PredictError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    per_set = 3 if getattr(args, "multimask", False) else 1
    r = _Runner(sam, out, args, paths, [per_set * len(jobs.get(i, ())) for i in range(len(paths))])
    if size > 1:  # names were made over every input (no two shares collide); now keep this process's share
        mine = my_share(paths, rank, size)
        r.paths, r.stems = [paths[i] for i in mine], [r.stems[i] for i in mine]
        jobs = {k: jobs[i] for k, i in enumerate(mine) if i in jobs}
        r.bar.total = len(mine)
    if rank == 0:
        r.bar.write(run_line(sam, getattr(args, "precision", None)), file=sys.stderr)
    for n in notes if rank == 0 else ():
        r.warn(n)
    try:
        if args.auto:
            _run_auto(r)
        else:
            skipped = len(r.paths) - len(jobs)
            if skipped:
                r.bar.update(skipped)
            _run_masks(r, jobs)
    finally:
        code = r.close()
    # one run file per process when sharded (masks-1of2.json, ...): each process knows only its share
    _write_run_files(r, fmt, info, suffix=f"-{rank + 1}of{size}" if size > 1 else "")
    n_ok = len(jobs if not args.auto else r.paths) - len(r.failed)
    who = f"process {rank + 1}/{size}: " if size > 1 else ""
    print(f"{who}{n_ok} image(s) written to {out}" + (f", {len(r.failed)} failed" if r.failed else ""),
          file=sys.stderr)
    return code
