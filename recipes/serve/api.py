# why over 500 lines: every request and response model of the API (they are its OpenAPI schema) and their checks
"""The API of `samadapt serve` apart from its routes: request/response models and their validation.

Holds the pydantic schemas (they are the OpenAPI schema at `/openapi.json`), the image store,
image decoding with limits, prompt checks, mask encodings (PNG, RLE) and the request-body limit.
Every check raises `ApiError` with a 4xx status and a one-line message naming the bad value.
"""
import base64
import io
import math
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
import torch
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from samadapt.adapters.io import metadata_problem

from ..limits import MAX_POINTS, MAX_POINTS_PER_SIDE


# ----------------------------------------------------------------------------- schemas
class Limits(BaseModel):
    """The limits every request is held to (the `samadapt serve` flags that set them in brackets)."""

    max_upload_bytes: int = Field(description="largest image file accepted by POST /api/images (413 above)")
    max_pixels: int = Field(description="largest width x height accepted (413 above)")
    max_json_bytes: int = Field(description="largest JSON request body (413 above)")
    auto_budget: int = Field(description="POST /api/auto work limit in pixel-points: width x height x "
                                         "points_per_side^2 x crops (1 crop: the whole image); 422 above "
                                         "(--auto-budget)")
    request_timeout_s: float = Field(description="seconds a model request may take, waiting included: 504 when "
                                                 "its work runs past it, 503 when it never got its turn "
                                                 "(--request-timeout)")
    max_queue: int = Field(description="model requests that may wait while one runs; one more gets 503 with "
                                       "Retry-After (--max-queue)")
    body_timeout_s: Optional[float] = Field(None, description="seconds allowed for a request body to arrive (408 "
                                                              "after; --body-timeout)")


class WorkState(BaseModel):
    """What the model is doing now; read without waiting on it."""

    running: int = Field(description="model requests running (0 or 1)")
    queued: int = Field(description="model requests waiting for their turn")
    decoder_batches: int = Field(description="decoder calls made so far (one per batch of automatic-mask points)")
    encoder_blocks: int = Field(description="image-encoder blocks run so far")
    completed: int = Field(description="model requests answered")
    cancelled: int = Field(description="model requests stopped (time limit, client gone, shutdown)")
    refused: int = Field(description="model requests refused because the queue was full")


class EncoderRoute(BaseModel):
    """How the image encoder runs (`SamPredictor.route`; `samadapt serve --precision` chooses)."""

    device: str = Field(description="cpu, cuda, ...")
    precision: Literal["bf16", "fp32", "as built"] = Field(
        description="bf16: CPU bf16 autocast (the CPU has native bf16 matrix units); fp32; as built: the model's "
                    "own dtype")
    attention: Literal["factorised", "as built"] = Field(description="the encoder's attention path")
    reason: str = Field(description="why this route was taken")


class Health(BaseModel):
    """`GET /api/health`: the core, the adapters resident and the limits (answers at once, even while
    the model is busy).
    """

    status: Literal["ok"] = "ok"
    arch: str = Field(description="the frozen core's size (tiny, vit_b, ...)")
    image_size: int = Field(description="encoder input side in pixels")
    fingerprint: str = Field(description="the core weights' fingerprint; adapters record the one they were trained on")
    adapters: int = Field(description="adapter files in the directory now")
    resident: List[str] = Field(description="adapters loaded in memory (least recently used first), as of the last "
                                            "model request")
    images: int = Field(description="uploaded images held now")
    max_upload_bytes: int
    max_pixels: int
    limits: Limits
    work: WorkState
    encoder: EncoderRoute


class AdapterInfo(BaseModel):
    """One adapter file (or attached adapter) of the listing."""

    name: str = Field(description="use this as `adapter` in requests")
    source: Literal["file", "attached"]
    domain: str = ""
    prompt_mode: str = ""
    kinds: List[str] = Field(default_factory=list, description="adapter kinds inside (lora, sam_adapter, bottleneck)")
    decoder: Optional[str] = Field(None, description="mask decoder policy: frozen, lora or full")
    parameters: Optional[int] = None
    file_bytes: Optional[int] = None
    base_arch: Optional[str] = None
    compatible: bool = Field(True, description="trained on this core (same fingerprint); false: requests get 409")
    metrics: Optional[Dict[str, Any]] = None
    error: Optional[str] = Field(None, description="why the file cannot be read, if it cannot")


class AdapterList(BaseModel):
    """`GET /api/adapters`: the adapters in the folder now."""

    core: str = Field(description="the core's arch and fingerprint")
    adapters: List[AdapterInfo]


class ImageInfo(BaseModel):
    """`POST /api/images`: the id of the uploaded image and its size."""

    image_id: str = Field(description="pass this to /api/segment and /api/auto")
    width: int
    height: int
    mode: str = Field(description="the uploaded image's PIL mode (converted to RGB)")
    format: Optional[str] = Field(None, description="the uploaded file's format (PNG, JPEG, ...)")


class SegmentRequest(BaseModel):
    """`POST /api/segment`: point and box prompts on an uploaded image under an adapter."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [
        {"image_id": "3f1c...", "adapter": None, "points": [[120, 80, 1], [40, 30, 0]], "box": None,
         "multimask": True, "format": "png"}]})

    image_id: str = Field(max_length=128, description="from POST /api/images")
    adapter: Optional[str] = Field(None, description="adapter name from GET /api/adapters; null: the plain core")
    points: List[Tuple[float, float, Literal[0, 1]]] = Field(
        default_factory=list, max_length=MAX_POINTS,
        description="[x, y, label] in image pixels; label 1 foreground, 0 background")
    box: Optional[Tuple[float, float, float, float]] = Field(None, description="[x0, y0, x1, y1] in image pixels")
    multimask: bool = Field(True, description="three candidate masks (best for one ambiguous click) or one")
    format: Literal["png", "rle"] = Field(
        "png", description="png: base64 1-bit PNG per mask; rle: uncompressed COCO RLE"
    )


class Rle(BaseModel):
    """A COCO run-length encoding: uncompressed (a list of counts) or compressed (pycocotools' string)."""

    size: Tuple[int, int] = Field(description="[height, width]")
    counts: Union[List[int], str] = Field(description="column-major run lengths starting with a run of zeros "
                                                      "(uncompressed_rle), or the COCO compressed string (coco_rle)")


class SegmentResponse(BaseModel):
    """The masks of `POST /api/segment` with their predicted IoU."""

    masks: List[Any] = Field(description="base64 PNG strings (format png) or RLE objects {size, counts} (format rle)")
    scores: List[float] = Field(description="predicted IoU per mask")
    best: int = Field(description="index of the highest-scoring mask")
    width: int
    height: int
    adapter: Optional[str]
    elapsed_ms: float = Field(description="server time for this request")


class AutoRequest(BaseModel):
    """`POST /api/auto`: automatic masks for everything in an uploaded image."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image_id: str = Field(max_length=128)
    adapter: Optional[str] = None
    points_per_side: int = Field(16, ge=1, le=MAX_POINTS_PER_SIDE,
                                 description="grid of points_per_side^2 single-point prompts")
    pred_iou_thresh: float = Field(0.88, ge=0.0, le=1.0, description="keep masks whose predicted IoU is above this")
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0, description="keep masks at least this stable")
    max_masks: int = Field(200, ge=1, le=1000, description="return at most this many masks (highest score first)")
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0, description="box IoU above which duplicates are dropped")
    output_mode: Literal["uncompressed_rle", "coco_rle"] = Field(
        "uncompressed_rle", description="segment_anything's output_mode for `segmentation`")


class AutoMask(BaseModel):
    """One automatic mask: segment_anything's record (the same keys as `SamAutomaticMaskGenerator.generate`,
    `samadapt predict --auto`'s JSON and the Python API).
    """

    segmentation: Rle
    area: int
    bbox: List[float] = Field(description="[x, y, w, h]")
    predicted_iou: float
    point_coords: List[List[float]] = Field(description="[[x, y]]: the grid point that produced it")
    stability_score: float
    crop_box: List[int] = Field(description="[x, y, w, h] of the crop it came from")


class AutoResponse(BaseModel):
    """The masks of `POST /api/auto`, highest score first."""

    masks: List[AutoMask]
    width: int
    height: int
    adapter: Optional[str]
    elapsed_ms: float


class ErrorBody(BaseModel):
    """Every error answer: `{"detail": "..."}` (422 adds the validation `errors`)."""

    detail: str
    errors: Optional[List[Dict[str, Any]]] = Field(None, description="422 only: each invalid field")


_RETRY = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}
_ERROR_TEXT = {
    400: "bad request (invalid adapter name, undecodable image, unparsable body)",
    403: "cross-origin write refused (Origin / Sec-Fetch-Site of another site)",
    404: "unknown image id or adapter",
    408: "the request body did not arrive in time",
    409: "adapter cannot be used with this core (or its file cannot be read)",
    413: "upload, image or body too large",
    415: "not an image",
    421: "the Host header names a host this server does not serve",
    422: "malformed or out-of-range request (including /api/auto work over the budget, images too thin for the "
         "model)",
    503: "busy (queue full, or no turn within the time limit), or shutting down; see Retry-After",
    504: "the model work ran past the request time limit and was stopped",
}


def error_responses(*codes: int) -> Dict[int, Dict[str, Any]]:
    """The OpenAPI `responses` entries for these error statuses (all with the `ErrorBody` model).

    Example:
        >>> sorted(error_responses(421, 503))
        [421, 503]
    """
    out: Dict[int, Dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": _ERROR_TEXT[code]}
        if code == 503:
            out[code]["headers"] = _RETRY
    return out


# every route: Host and body guards; writes: the origin check; model routes: the work limits
READ_ERRORS = error_responses(400, 408, 421)
ERRORS = error_responses(400, 403, 404, 408, 409, 413, 415, 421, 422, 503, 504)


# ----------------------------------------------------------------------------- errors and limits
class ApiError(HTTPException):
    """An HTTP error with a one-line message; rendered as `{"detail": "..."}`.

    Args:
        status: the HTTP status (4xx for anything the request got wrong, 503/504 for limits).
        detail: what was received, what is allowed and how to fix it.
        headers: extra response headers (`Retry-After`, `Connection: close`).

    Example:
        >>> ApiError(404, "unknown image id 'x'").status_code
        404
    """

    def __init__(self, status: int, detail: str, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit_for(path)` bytes with 413, and bodies that
    take longer than `body_timeout` seconds to arrive with 408 (a slow-body client holds no worker).

    The size limit is checked from the `Content-Length` header before anything is read, or while
    streaming a body sent without one. The time limit counts from the request head to the body's
    last byte; once the body is complete, `receive` passes through untouched (the routes wait on
    it for the client's disconnect).

    Args:
        app: the ASGI app to wrap.
        limit_for: request path -> the largest body accepted on it, in bytes.
        body_timeout: seconds allowed for the whole body to arrive (None: no limit).

    Example:
        >>> from fastapi import FastAPI
        >>> app = FastAPI(); app.add_middleware(BodyLimit, limit_for=lambda path: 2**20, body_timeout=30)
    """

    def __init__(self, app, limit_for: Callable[[str], int], body_timeout: Optional[float] = None) -> None:
        self.app = app
        self.limit_for = limit_for
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import asyncio
        import time

        limit = self.limit_for(scope["path"])
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            code, msg = (
                (413, f"request body of {int(length):,} bytes is over the limit of {limit:,}")
                if length.isdigit()
                else (400, "Content-Length is not a number")
            )
            return await _send_json(send, code, msg)
        seen = 0
        started = False
        body_done = False
        deadline = None if self.body_timeout is None else time.monotonic() + self.body_timeout

        async def counting_receive():
            nonlocal seen, body_done
            if body_done or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s "
                                        f"(--body-timeout); send it faster or in one piece",
                                   headers={"Connection": "close"}) from None
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > limit:
                    raise ApiError(413, f"request body is over the limit of {limit:,} bytes")
            else:
                body_done = True
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except ApiError as e:  # raised outside a route (rare): answer here if nothing was sent yet
            if started:
                raise
            await _send_json(send, e.status_code, e.detail)


async def _send_json(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- images
def decode_image(data: bytes, max_pixels: int) -> Tuple[np.ndarray, str, Optional[str]]:
    """Decode uploaded bytes to RGB, EXIF orientation applied, within a pixel limit.

    Args:
        data: the uploaded file's bytes.
        max_pixels: largest accepted width x height (checked from the header, before decoding).

    Returns:
        `(rgb, mode, format)`: H x W x 3 uint8 RGB (read-only), the file's PIL mode and format.

    Raises:
        ApiError: 400 empty or corrupt, 413 over `max_pixels`, 415 not an image.

    Example:
        >>> import io; from PIL import Image
        >>> buf = io.BytesIO(); Image.new("L", (5, 3), 9).save(buf, "PNG")
        >>> rgb, mode, fmt = decode_image(buf.getvalue(), max_pixels=100); rgb.shape, mode, fmt
        ((3, 5, 3), 'L', 'PNG')
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ApiError(400, "the uploaded file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning, palette-transparency notes
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ApiError(413, f"image is too large to decode ({e})") from None
        except UnidentifiedImageError:
            raise ApiError(
                415, "the file is not an image this server can read (PNG, JPEG, WebP, BMP, TIFF, GIF ...)"
            ) from None
        except Exception as e:  # noqa: BLE001 -- any reader failure is the file's fault
            raise ApiError(400, f"could not read the image header ({type(e).__name__}: {e})") from None
        w, h = im.size
        if w < 1 or h < 1:
            raise ApiError(400, f"image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise ApiError(413, f"image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}")
        mode, fmt = im.mode, im.format
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
        except Exception as e:  # noqa: BLE001 -- truncated or corrupt data
            raise ApiError(400, f"could not decode the {fmt or 'image'} file ({type(e).__name__}: {e})") from None
    rgb.setflags(write=False)
    return rgb, mode, fmt


def _to_rgb(im) -> np.ndarray:
    """Any PIL mode -> RGB uint8; 16-bit and float images are stretched to 0..255."""
    from PIL import Image

    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        a = np.asarray(im, dtype=np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        a = np.nan_to_num((a - lo) / max(hi - lo, 1e-12) * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


class ImageStore:
    """The most recent `capacity` uploaded images by id, thread-safe.

    The id is a content hash: the same pixels get the same id, so re-uploading is free and the
    adapter bank's embedding cache keeps working.

    Args:
        capacity: images kept; the least recently used is forgotten first.

    Example:
        >>> import numpy as np
        >>> store = ImageStore(2); key = store.add(np.zeros((2, 2, 3), np.uint8))
        >>> store.get(key).shape, len(store)
        ((2, 2, 3), 1)
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"image_cache={capacity} must be at least 1")
        self.capacity = capacity
        self._images: "OrderedDict[str, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, image: np.ndarray) -> str:
        from samadapt.adapters.bank import image_key

        key = image_key(image)
        with self._lock:
            self._images[key] = image
            self._images.move_to_end(key)
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)
        return key

    def get(self, image_id: str) -> np.ndarray:
        with self._lock:
            image = self._images.get(image_id)
            if image is None:
                shown = image_id if len(image_id) <= 40 else image_id[:40] + "..."
                raise ApiError(404, f"unknown image id {shown!r}; upload the image with POST /api/images "
                                    f"(the server keeps the {self.capacity} most recent)")
            self._images.move_to_end(image_id)
            return image

    def __len__(self) -> int:
        return len(self._images)


# ----------------------------------------------------------------------------- prompts and masks
def check_prompts(req: SegmentRequest, width: int, height: int) -> Dict[str, Any]:
    """Check a request's prompts against the image frame and turn them into `AdapterBank.predict` kwargs.

    Args:
        req: the segment request.
        width: image width in pixels.
        height: image height in pixels.

    Returns:
        kwargs `multimask_output` and, when given, `point_coords`, `point_labels`, `box`.

    Raises:
        ApiError: 422 for a point or box corner outside the image, or an empty box.

    Example:
        >>> req = SegmentRequest(image_id="x", points=[[3, 4, 1]])
        >>> sorted(check_prompts(req, 10, 10))
        ['multimask_output', 'point_coords', 'point_labels']
    """
    def inside(x: float, y: float) -> bool:
        return 0.0 <= x <= width and 0.0 <= y <= height  # False for NaN and infinities

    frame = f"the {width}x{height} image (x in [0, {width}], y in [0, {height}])"
    prompts: Dict[str, Any] = {"multimask_output": req.multimask}
    if req.points:
        for i, (x, y, _) in enumerate(req.points):
            if not inside(x, y):
                raise ApiError(422, f"points[{i}] = [{x:g}, {y:g}] is outside {frame}")
        prompts["point_coords"] = np.array([[x, y] for x, y, _ in req.points], dtype=float)
        prompts["point_labels"] = np.array([lab for _, _, lab in req.points], dtype=int)
    if req.box is not None:
        x0, y0, x1, y1 = req.box
        for name, (x, y) in (("top-left", (x0, y0)), ("bottom-right", (x1, y1))):
            if not inside(x, y):
                raise ApiError(422, f"box {name} corner [{x:g}, {y:g}] is outside {frame}")
        if not (x0 < x1 and y0 < y1):
            raise ApiError(422, f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is empty; give x0 < x1 and y0 < y1")
        prompts["box"] = np.array(req.box, dtype=float)
    return prompts


def mask_png(mask: np.ndarray) -> str:
    """Encode an H x W bool mask as a base64 1-bit PNG.

    Example:
        >>> import numpy as np
        >>> mask_png(np.ones((2, 2), bool))[:8]
        'iVBORw0K'
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def masks_rle(masks: np.ndarray) -> List[Dict[str, Any]]:
    """Encode C x H x W bool masks as uncompressed COCO RLEs `{size: [h, w], counts: [...]}`.

    Example:
        >>> import numpy as np
        >>> masks_rle(np.array([[[False, True], [False, True]]]))
        [{'size': [2, 2], 'counts': [2, 2]}]
    """
    from samadapt.sam_core.amg_utils import mask_to_rle

    return mask_to_rle(torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)))


def finite(x: float) -> float:
    """`x` as a float, 0.0 for NaN and infinities (JSON has neither).

    Example:
        >>> finite(float("nan")), finite(0.5)
        (0.0, 0.5)
    """
    x = float(x)
    return x if math.isfinite(x) else 0.0


def adapter_info(name: str, meta: Dict[str, Any], fingerprint: str) -> AdapterInfo:
    """The listing entry for one `AdapterBank.available()` item; a file whose metadata has the wrong
    types is listed as not loadable, with the reason, never an error for the whole listing.

    Args:
        name: the adapter's name.
        meta: its `AdapterBank.available()` metadata.
        fingerprint: the serving core's fingerprint (a different one makes it incompatible).

    Example:
        >>> adapter_info("cod", {"source": "attached"}, "abc").source
        'attached'
        >>> adapter_info("bad", {"config": [], "decoder": {}, "base": ["tiny"]}, "abc").error
        "metadata 'base' should be a JSON object, got list"
    """
    if meta.get("source") == "attached":
        return AdapterInfo(name=name, source="attached")
    if "error" in meta:
        return AdapterInfo(name=name, source="file", compatible=False, error=_one_line(meta["error"]))
    problem = metadata_problem(meta)  # inspect already refuses these; a listing made otherwise is checked too
    if problem:
        return AdapterInfo(name=name, source="file", compatible=False, error=f"metadata {problem}")
    if meta.get("non_finite"):
        return AdapterInfo(name=name, source="file", compatible=False,
                           error=f"{len(meta['non_finite'])} tensors hold NaN or infinity (e.g. "
                                 f"{meta['non_finite'][0]}); the file was saved from a diverged run")
    base = meta.get("base") or {}
    metrics = meta.get("metrics")
    try:
        return AdapterInfo(
            name=name, source="file", domain=meta.get("domain") or "", prompt_mode=meta.get("prompt_mode") or "",
            kinds=[str(c.get("kind")) for c in meta.get("config") or []],
            decoder=(meta.get("decoder") or {}).get("policy"), parameters=meta.get("parameters"),
            file_bytes=meta.get("file_bytes"), base_arch=base.get("arch"),
            compatible=base.get("fingerprint") == fingerprint,
            metrics=jsonable(metrics) if isinstance(metrics, dict) else None)
    except Exception as e:  # noqa: BLE001 -- any other oddity of one file must not break the listing
        return AdapterInfo(name=name, source="file", compatible=False,
                           error=f"metadata cannot be listed ({type(e).__name__}: {_one_line(e)})")


def jsonable(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN), nested dicts and lists kept.

    Example:
        >>> jsonable({"a": float("nan"), "b": [1.0, float("inf")]})
        {'a': None, 'b': [1.0, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _one_line(e: Any) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
