"""A Label Studio ML backend over `AdapterBank`: one frozen core, the adapters of a folder.

Label Studio talks to an ML backend over four HTTP routes, implemented here in a small FastAPI app:

* `GET /health` -> `{"status": "UP"}`;
* `POST /setup` (when a project connects the backend): the project's labelling config, Label Studio's
  address and an access token (to download the project's uploaded images), and the backend's
  `extra_params` from the connection (`{"adapter": "cod", "output": "polygon", "mode": "auto"}`);
* `POST /predict`: tasks, and for interactive pre-annotation (the "smart" tools) a `context` holding
  the annotator's keypoints (clicks; `is_positive: false` for a background click) and rectangles
  (boxes) in percent of the image. Masks come back as brush RLE (`BrushLabels`, Label Studio's own
  RLE of the RGBA mask) or polygons (`PolygonLabels`). Without a context (pre-annotation of whole
  tasks) the adapter runs promptless (`mode: promptless`, the default: the setting promptless
  adapters are trained in) or generates automatic masks (`mode: auto`);
* `POST /webhook`: acknowledged (this backend does not train from annotations).

Run it next to Label Studio and connect it as the project's model (Settings > Model):

    python -m samadapt.recipes.serve.label_studio --adapters my_adapters/ --port 9090

Images are read from `data:` URIs, `http(s)` URLs, or Label Studio's own `/data/...` paths (fetched
from the address given at setup with its token), with EXIF orientation applied; at most
`MAX_IMAGE_BYTES` bytes and `MAX_PIXELS` pixels each.
"""
from __future__ import annotations

import argparse
import base64
import io
import sys
import threading
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import UserError
from ..limits import MAX_PIXELS

__all__ = ["brush_rle", "mask_polygons", "parse_label_config", "create_label_studio_app", "main"]

MAX_IMAGE_BYTES = 64 * 2**20
FETCH_TIMEOUT_S = 30
RLE_SIZES = (3, 4, 8, 16)  # the run-length field widths of Label Studio's brush RLE


class BackendError(UserError, ValueError):
    """A request the backend cannot serve (no image, unknown adapter, no mask tag in the config)."""


# ----------------------------------------------------------------------------- encodings
def brush_rle(mask: np.ndarray) -> List[int]:
    """A binary H x W mask in Label Studio's brush RLE: the mask's RGBA bytes (255 inside) run-length
    coded in its bit format (32-bit length, 5-bit word size - 1, four 4-bit run-field widths - 1, then
    per run: 1, a 2-bit field index, the run length - 1, the 8-bit value), packed in bytes.

    Example:
        >>> m = np.zeros((2, 3), bool); m[0, 1] = True
        >>> rle = brush_rle(m); len(rle), rle[:4]
        (13, [0, 0, 0, 24])
    """
    flat = np.repeat(np.asarray(mask, bool).reshape(-1), 4)  # R, G, B, A of each pixel
    bits = [f"{flat.size:032b}", f"{8 - 1:05b}", "".join(f"{s - 1:04b}" for s in RLE_SIZES)]
    if flat.size:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [flat.size]]))
        for start, length in zip(starts.tolist(), lengths.tolist()):
            value = f"{255 if flat[start] else 0:08b}"
            while length > 0:
                chunk = min(length, 2 ** RLE_SIZES[-1])
                idx = next(i for i, s in enumerate(RLE_SIZES) if chunk <= 2 ** s)
                bits.append(f"1{idx:02b}{chunk - 1:0{RLE_SIZES[idx]}b}{value}")
                length -= chunk
    s = "".join(bits)
    s += "0" * (8 - len(s) % 8)  # whole bytes (a full zero byte when already whole, as Label Studio does)
    return [int(s[i:i + 8], 2) for i in range(0, len(s), 8)]


def mask_polygons(mask: np.ndarray, min_area_fraction: float = 0.0005, epsilon_px: float = 1.0
                  ) -> List[List[List[float]]]:
    """Outer contours of a binary mask as polygons in percent of the image (Label Studio's units),
    largest first; regions under `min_area_fraction` of the image are dropped.

    Example:
        >>> m = np.zeros((10, 20), bool); m[2:8, 5:15] = True
        >>> [len(p) for p in mask_polygons(m)], mask_polygons(m)[0][0]
        ([4], [25.0, 20.0])
    """
    import cv2

    h, w = mask.shape[:2]
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in sorted(contours, key=cv2.contourArea, reverse=True):
        if cv2.contourArea(c) < min_area_fraction * h * w or len(c) < 3:
            continue
        c = cv2.approxPolyDP(c, epsilon_px, True)
        if len(c) < 3:
            continue
        out.append([[100.0 * float(x) / w, 100.0 * float(y) / h] for x, y in c.reshape(-1, 2)])
    return out


# ----------------------------------------------------------------------------- labelling config
def parse_label_config(xml: str) -> Dict[str, Any]:
    """The parts of a Label Studio labelling config this backend uses.

    Returns:
        `image` (the Image tag's name), `value` (its task data key), `brush` / `polygon` (the name and
        labels of a BrushLabels / PolygonLabels tag on that image, or None), `prompts` (KeyPointLabels and
        RectangleLabels names).

    Example:
        >>> cfg = parse_label_config('<View><Image name="img" value="$image"/>'
        ...     '<BrushLabels name="tag" toName="img"><Label value="cat"/></BrushLabels>'
        ...     '<KeyPointLabels name="kp" toName="img" smart="true"><Label value="cat"/></KeyPointLabels></View>')
        >>> cfg["image"], cfg["value"], cfg["brush"], cfg["polygon"], cfg["prompts"]
        ('img', 'image', ('tag', ['cat']), None, ['kp'])
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise BackendError(f"the labelling config is not valid XML ({e})") from None
    image = next((el for el in root.iter() if el.tag == "Image"), None)
    if image is None or not image.get("name") or not str(image.get("value", "")).startswith("$"):
        raise BackendError('the labelling config has no <Image name="..." value="$key"/> tag')
    name = image.get("name")
    out: Dict[str, Any] = {"image": name, "value": image.get("value")[1:], "brush": None, "polygon": None,
                           "prompts": []}
    for el in root.iter():
        if el.get("toName") != name:
            continue
        labels = [lab.get("value") for lab in el.iter("Label") if lab.get("value")]
        if el.tag == "BrushLabels" and out["brush"] is None:
            out["brush"] = (el.get("name"), labels)
        elif el.tag == "PolygonLabels" and out["polygon"] is None:
            out["polygon"] = (el.get("name"), labels)
        elif el.tag in ("KeyPointLabels", "RectangleLabels"):
            out["prompts"].append(el.get("name"))
    if out["brush"] is None and out["polygon"] is None:
        raise BackendError("the labelling config has no <BrushLabels> or <PolygonLabels> tag on the image; "
                           "add one for the masks")
    return out


# ----------------------------------------------------------------------------- images
def _read_limited(resp, what: str) -> bytes:
    data = resp.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise BackendError(f"{what}: over {MAX_IMAGE_BYTES:,} bytes")
    return data


def load_task_image(ref: str, hostname: Optional[str] = None, token: Optional[str] = None) -> np.ndarray:
    """The RGB pixels (EXIF orientation applied) of a task's image reference: a `data:` URI, an http(s)
    URL, or a Label Studio path (`/data/upload/...`) fetched from `hostname` with `token`.
    """
    from PIL import Image, ImageOps

    if not isinstance(ref, str) or not ref:
        raise BackendError("the task has no image reference")
    if ref.startswith("data:"):
        try:
            data = base64.b64decode(ref.split(",", 1)[1], validate=False)
        except (IndexError, ValueError):
            raise BackendError("the task's data: URI is not base64 image data") from None
    else:
        url = ref
        headers = {}
        if ref.startswith("/"):
            if not hostname:
                raise BackendError(f"{ref}: a Label Studio path, but no Label Studio address was given at /setup")
            url = hostname.rstrip("/") + ref
        elif not ref.startswith(("http://", "https://")):
            raise BackendError(f"{ref[:80]}: not a data: URI, http(s) URL or Label Studio path")
        if token and hostname and url.startswith(hostname.rstrip("/")):
            headers["Authorization"] = f"Token {token}"  # only Label Studio itself gets its token
        req = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310 (http(s) only)
                data = _read_limited(resp, url)
        except OSError as e:
            raise BackendError(f"{url}: cannot download the image ({e})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise BackendError(f"the image is {im.size[0]}x{im.size[1]}, over {MAX_PIXELS:,} pixels")
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"the task's image cannot be decoded ({type(e).__name__})") from None


# ----------------------------------------------------------------------------- prompts and results
def context_prompts(context: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Keypoints and rectangles of an interactive context -> prompts in pixels (None: no context).

    Example:
        >>> ctx = {"result": [{"type": "keypointlabels", "original_width": 200, "original_height": 100,
        ...                    "value": {"x": 50, "y": 50, "keypointlabels": ["cat"]}}]}
        >>> p = context_prompts(ctx); p["point_coords"].tolist(), p["point_labels"].tolist(), p["label"]
        ([[100.0, 50.0]], [1], 'cat')
    """
    if not context or not context.get("result"):
        return None
    points, labels, box, label = [], [], None, None
    for r in context["result"]:
        v, w, h = r.get("value", {}), r.get("original_width"), r.get("original_height")
        if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
            raise BackendError("a context result lacks original_width/original_height")
        if r.get("type") == "keypointlabels":
            points.append([v["x"] * w / 100.0, v["y"] * h / 100.0])
            labels.append(0 if r.get("is_positive") is False else 1)
            label = label or (v.get("keypointlabels") or [None])[0]
        elif r.get("type") == "rectanglelabels":
            x0, y0 = v["x"] * w / 100.0, v["y"] * h / 100.0
            box = np.array([x0, y0, x0 + v["width"] * w / 100.0, y0 + v["height"] * h / 100.0])
            label = label or (v.get("rectanglelabels") or [None])[0]
    out: Dict[str, Any] = {"label": label}
    if points:
        out["point_coords"], out["point_labels"] = np.asarray(points, float), np.asarray(labels, np.int64)
    if box is not None:
        out["box"] = box
    return out if len(out) > 1 else None


def mask_results(mask: np.ndarray, score: float, cfg: Dict[str, Any], output: str,
                 label: Optional[str]) -> List[Dict[str, Any]]:
    """Label Studio result entries for one mask: one brush RLE, or one polygon per region."""
    h, w = mask.shape[:2]
    tag = cfg["brush"] if output == "brush" else cfg["polygon"]
    name, labels = tag
    lab = label if label in labels else (labels[0] if labels else "object")
    common = {"from_name": name, "to_name": cfg["image"], "original_width": int(w), "original_height": int(h),
              "image_rotation": 0, "score": float(score), "readonly": False}
    if output == "brush":
        return [dict(common, id=uuid.uuid4().hex[:10], type="brushlabels",
                     value={"format": "rle", "rle": brush_rle(mask), "brushlabels": [lab]})]
    return [dict(common, id=uuid.uuid4().hex[:10], type="polygonlabels",
                 value={"points": pts, "polygonlabels": [lab], "closed": True}) for pts in mask_polygons(mask)]


# ----------------------------------------------------------------------------- the app
def create_label_studio_app(sam, adapters_dir, default_adapter: Optional[str] = None, capacity: int = 8,
                            label_studio_url: Optional[str] = None, label_studio_token: Optional[str] = None):
    """The ML backend app (FastAPI) over an `AdapterBank` of `adapters_dir` on `sam`.

    Args:
        sam: the frozen core.
        adapters_dir: folder of adapter `.safetensors` files (their stems are the adapter names).
        default_adapter: adapter used when a project's `extra_params` names none (None: the plain core).
        capacity: adapters kept resident.
        label_studio_url: Label Studio's address, for tasks whose images are Label Studio paths (also
            given by Label Studio at /setup).
        label_studio_token: an API token for those downloads (also given at /setup).

    Returns:
        The FastAPI app.

    Example:
        >>> import tempfile
        >>> from fastapi.testclient import TestClient
        >>> from samadapt.recipes.model import load_base
        >>> c = TestClient(create_label_studio_app(load_base(), tempfile.mkdtemp()))
        >>> c.get("/health").json()["status"]
        'UP'
    """
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse

    from samadapt.adapters import AdapterBank

    folder = Path(adapters_dir)
    if not folder.is_dir():
        raise BackendError(f"--adapters {folder}: not a folder")
    bank = AdapterBank(sam, directory=folder, capacity=capacity)
    projects: Dict[str, Dict[str, Any]] = {}
    lock = threading.Lock()
    app = FastAPI(title="samadapt Label Studio ML backend", docs_url=None, redoc_url=None)

    def names() -> List[str]:
        return sorted(p.stem for p in folder.glob("*.safetensors"))

    def settings(project: Any) -> Dict[str, Any]:
        key = str(project or "").split(".")[0]
        with lock:
            return dict(projects.get(key, {}))

    def pick_adapter(extra: Dict[str, Any]) -> Optional[str]:
        name = extra.get("adapter", default_adapter)
        if name in (None, "", "none", "core"):
            return None
        if name not in names():
            raise BackendError(f"adapter {name!r} is not in {folder} (there: {', '.join(names()) or 'none'})")
        return name

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": msg, "detail": msg})

    @app.get("/health")
    @app.get("/")
    def health() -> Dict[str, Any]:
        return {"status": "UP", "model_class": "samadapt", "adapters": names()}

    @app.post("/setup")
    def setup(body: Dict[str, Any] = Body(...)) -> Any:
        extra = body.get("extra_params") or {}
        if isinstance(extra, str):
            import json

            try:
                extra = json.loads(extra) if extra.strip() else {}
            except ValueError:
                return error(400, "extra_params is not JSON")
        if not isinstance(extra, dict):
            return error(400, "extra_params must be a JSON object")
        try:
            adapter = pick_adapter(extra)
            if body.get("schema"):
                parse_label_config(body["schema"])
        except BackendError as e:
            return error(400, str(e))
        key = str(body.get("project") or "").split(".")[0]
        with lock:
            projects[key] = {"extra": extra, "hostname": body.get("hostname") or label_studio_url,
                             "token": body.get("access_token") or label_studio_token}
        return {"model_version": f"samadapt-{adapter or 'core'}"}

    @app.post("/webhook")
    def webhook(body: Dict[str, Any] = Body(...)) -> Dict[str, str]:
        return {"status": "ok", "action": str(body.get("action", ""))}

    @app.post("/predict")
    def predict(body: Dict[str, Any] = Body(...)) -> Any:
        try:
            return {"results": _predict(body)}
        except BackendError as e:
            return error(400, str(e))

    def _predict(body: Dict[str, Any]) -> List[Dict[str, Any]]:
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BackendError("no tasks in the request")
        cfg = parse_label_config(body.get("label_config") or "")
        st = settings(body.get("project"))
        extra = st.get("extra", {})
        adapter = pick_adapter(extra)
        output = extra.get("output") or ("brush" if cfg["brush"] else "polygon")
        if output not in ("brush", "polygon") or cfg[output] is None:
            raise BackendError(f"output {output!r}: the labelling config has no "
                               f"{'BrushLabels' if output == 'brush' else 'PolygonLabels'} tag (or use brush/polygon)")
        mode = extra.get("mode", "promptless")
        if mode not in ("promptless", "auto"):
            raise BackendError(f"mode {mode!r}: use 'promptless' or 'auto'")
        prompts = context_prompts((body.get("params") or {}).get("context"))
        version = f"samadapt-{adapter or 'core'}"
        results = []
        for task in tasks:
            ref = (task.get("data") or {}).get(cfg["value"])
            rgb = load_task_image(ref, st.get("hostname") or label_studio_url, st.get("token") or label_studio_token)
            entries, scores = [], []
            if prompts is None and mode == "auto":
                found = bank.generate(rgb, adapter=adapter, points_per_side=int(extra.get("points_per_side", 16)),
                                      pred_iou_thresh=float(extra.get("pred_iou_thresh", 0.88)),
                                      stability_score_thresh=float(extra.get("stability_score_thresh", 0.95)))
                for m in sorted(found, key=lambda m: -m["predicted_iou"]):
                    entries += mask_results(m["segmentation"], m["predicted_iou"], cfg, output, None)
                    scores.append(float(m["predicted_iou"]))
            else:
                kw = {k: v for k, v in (prompts or {}).items() if k != "label"}
                masks, sc, _ = bank.predict(rgb, adapter=adapter, multimask_output=False, **kw)
                entries = mask_results(masks[0], float(sc[0]), cfg, output, (prompts or {}).get("label"))
                scores = [float(sc[0])]
            results.append({"result": entries, "score": float(np.mean(scores)) if scores else 0.0,
                            "model_version": version})
        return results

    return app


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m samadapt.recipes.serve.label_studio --adapters DIR [--base CKPT] [--adapter NAME] [--port N]`."""
    p = argparse.ArgumentParser(prog="python -m samadapt.recipes.serve.label_studio",
                                description="Label Studio ML backend: one frozen core, the adapters of a folder")
    p.add_argument("--adapters", required=True, metavar="DIR", help="folder of adapter .safetensors files")
    p.add_argument("--base", metavar="CKPT", help="SAM checkpoint (default: the pretrained tiny core)")
    p.add_argument("--adapter", metavar="NAME", help="adapter for projects whose extra_params name none")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--label-studio-url", metavar="URL", help="Label Studio's address (default: given at /setup)")
    p.add_argument("--label-studio-token", metavar="TOKEN", help="API token for Label Studio's image paths")
    args = p.parse_args(argv)
    import uvicorn

    from ..model import load_base

    try:
        app = create_label_studio_app(load_base(args.base), args.adapters, args.adapter,
                                      label_studio_url=args.label_studio_url,
                                      label_studio_token=args.label_studio_token)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    print(f"samadapt Label Studio backend: http://{args.host}:{args.port}/  (adapters in {args.adapters})",
          file=sys.stderr, flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
