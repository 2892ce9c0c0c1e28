# why over 400 lines: every route of the API, the model side they call and the listing, shared by both engines
"""The routes of `samadapt serve`, shared by both engines: one implementation, two places the model runs.

`build_api` makes the FastAPI app -- the page, the offline docs, `/api/health`, `/api/adapters`,
`/api/images`, `/api/segment`, `/api/auto`, the Host and origin guard, the body limits and the
error handlers. Everything a request is checked against (image ids, adapter names, prompts, the
`/api/auto` budget) is checked here, before any model work, so both engines give the same answers
and the same errors. The model work itself goes to a *model side*:

- `LocalModel`: an `AdapterBank` in this process, through a `ModelRunner` (one call at a time, a
  bounded queue, a time limit, cancellation) and, optionally, an `EmbedBatcher`. The single-process
  server (`app.create_app`) uses it, and so does each Ray Serve model replica (`ray_app`).
- `ray_app`'s model side: a Ray Serve handle call to a model replica, routed by adapter name.

A model side has `state()` (the `WorkState` counters), `resident()` (adapters loaded, as of the last
model call) and two coroutines, `segment(item, receive, finish)` and `auto(item, receive, finish)`:
`item` holds the checked request (image, image_id, adapter, and the prompts or generator
settings), `finish(result)` turns the bank's answer into the HTTP response, and the coroutine
returns that response.

Example:
    >>> import tempfile
    >>> from fastapi.testclient import TestClient
    >>> from samadapt.recipes.serve.app import create_app
    >>> from samadapt.sam_core import build_sam
    >>> app = create_app(build_sam("tiny"), tempfile.mkdtemp())
    >>> sorted(p for p in app.openapi()["paths"] if p.startswith("/api/"))
    ['/api/adapters', '/api/auto', '/api/health', '/api/images', '/api/segment']
"""
import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from samadapt.adapters import AdapterError, AdapterFormatError, IncompatibleAdapterError, is_valid_name
from samadapt.adapters import inspect as inspect_adapter
from samadapt.adapters.bank import listed_file, listed_files

from .api import (
    ERRORS,
    READ_ERRORS,
    AdapterList,
    ApiError,
    AutoMask,
    AutoRequest,
    AutoResponse,
    BodyLimit,
    EncoderRoute,
    Health,
    ImageInfo,
    ImageStore,
    Limits,
    SegmentRequest,
    SegmentResponse,
    WorkState,
    adapter_info,
    check_prompts,
    decode_image,
    finite,
    mask_png,
    masks_rle,
)
from .guard import HostGuard
from .offline_docs import add_offline_docs
from .work import Cancelled

STATIC = Path(__file__).with_name("static")
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
AUTO_BUDGET = 2**30  # pixel-points: 1024 x 1024 at 32 points per side, 2048 x 2048 at 16
AUTO_BATCH_BYTES = 256 * 2**20  # memory for one batch of automatic-mask logits (points_per_batch follows)
CATALOGUE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class CoreInfo:
    """What the routes know of the frozen core: its size, its weights' fingerprint and the encoder's route.

    Example:
        >>> CoreInfo("tiny", 256, "abc", {"device": "cpu"}).label
        'tiny@256 abc'
    """

    arch: str
    image_size: int
    fingerprint: str
    encoder: Dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.arch}@{self.image_size} {self.fingerprint}"


def split_adapters_arg(value: Union[str, os.PathLike]) -> Tuple[Optional[Path], Optional[Path]]:
    """`--adapters` as (folder, None) or (None, catalogue file); (None, None) when it is neither.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp(); split_adapters_arg(folder)[0] is not None
        True
        >>> split_adapters_arg(folder + "/absent.yaml")
        (None, None)
    """
    path = Path(value)
    if path.is_file() and path.suffix.lower() in CATALOGUE_SUFFIXES:
        return None, path
    if path.is_dir():
        return path, None
    return None, None


class FileListing:
    """The adapters a server can serve, listed without a model: the catalogue's files, then the folder's.

    The same listing as `AdapterBank.available` / `files` / `path_of` (a catalogue name shadows a folder
    file of the same name; the folder is re-listed on every call), for a process that holds no core
    (the Ray ingress).

    Args:
        directory: folder of `<name>.safetensors` files, or None.
        sources: catalogue name -> local file (`sources.resolve`d), or None.

    Example:
        >>> import tempfile
        >>> FileListing(tempfile.mkdtemp()).available()
        {}
    """

    def __init__(self, directory: Optional[Union[str, os.PathLike]] = None,
                 sources: Optional[Dict[str, Path]] = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.sources = dict(sources or {})

    def files(self) -> Dict[str, Path]:
        return listed_files(self.directory, self.sources)

    def path_of(self, name: str) -> Optional[Path]:
        return listed_file(self.directory, self.sources, name)

    def available(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for name, p in self.files().items():
            try:
                out[name] = inspect_adapter(p)
            except AdapterError as e:
                out[name] = {"error": str(e)}
        return out


def resolve_catalogue(catalogue: Optional[Union[str, os.PathLike, dict]]) -> Dict[str, Tuple[str, Optional[str]]]:
    """A catalogue as name -> (source, sha256 pin), local paths made absolute (another process, with
    another working folder, reads them too); empty for None.

    Raises:
        SourceError: the catalogue cannot be read or an entry is malformed.

    Example:
        >>> resolve_catalogue({"cod": "hf://org/repo/cod.safetensors"})
        {'cod': ('hf://org/repo/cod.safetensors', None)}
    """
    from samadapt.adapters.sources import is_remote, load_catalogue

    if catalogue is None:
        return {}
    return {name: (src if is_remote(src) else str(Path(src).resolve()), pin)
            for name, (src, pin) in load_catalogue(catalogue).items()}


# ----------------------------------------------------------------------------- checks shared by both engines
def check_limits(request_timeout: float, max_queue: int, auto_budget: int, body_timeout: Optional[float]) -> None:
    """Refuse limits out of range (ValueError naming the value), before anything starts.

    Example:
        >>> check_limits(60, 8, AUTO_BUDGET, None)
    """
    if not (isinstance(request_timeout, (int, float)) and math.isfinite(request_timeout) and request_timeout > 0):
        raise ValueError(f"request timeout {request_timeout!r} must be a positive number of seconds, such as 60")
    if int(max_queue) < 0:
        raise ValueError(f"max_queue={max_queue!r} must be 0 (no waiting) or more")
    if int(auto_budget) < 1:
        raise ValueError(f"auto_budget={auto_budget!r} must be a positive number of pixel-points, "
                         f"such as {AUTO_BUDGET}")
    if body_timeout is not None and not body_timeout > 0:
        raise ValueError(f"body_timeout={body_timeout!r} must be a positive number of seconds (or None)")


def package_version() -> str:
    """The installed samadapt's version (the OpenAPI schema's), or `0+unknown` in a bare checkout."""
    try:
        from importlib.metadata import version

        return version("samadapt")
    except Exception:  # noqa: BLE001
        return "0+unknown"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def thin_image(image: np.ndarray, image_size: int) -> Optional[str]:
    """Why the core cannot take `image` (a side that rounds to 0 px at the model size), or None.

    Example:
        >>> thin_image(np.zeros((80, 100, 3), np.uint8), 256) is None
        True
    """
    from samadapt.sam_core.transforms import ResizeLongestSide

    h, w = image.shape[:2]
    rh, rw = ResizeLongestSide.get_preprocess_shape(h, w, int(image_size))
    if min(rh, rw) >= 1:
        return None
    return (f"the image is {w}x{h} px: resized to the model's {int(image_size)} px its short side is "
            f"{min(rh, rw)} px; upload an image whose short side is at least "
            f"{math.ceil(max(h, w) / (2 * int(image_size)))} px")


@contextlib.contextmanager
def model_errors(name: Optional[str], image: np.ndarray, image_size: int,
                 resident: Callable[[], List[str]]) -> Iterator[None]:
    """Around a bank call: its failures become the client's 4xx where they are the request's fault
    (409 adapter cannot be used, 404/400 adapter errors, 422 image too thin); anything else is raised.
    """
    try:
        yield
    except (Cancelled, ApiError):
        raise
    except (IncompatibleAdapterError, AdapterFormatError) as e:
        raise ApiError(409, f"adapter {name!r} cannot be used with this core: {first_line(e)}") from None
    except AdapterError as e:
        raise ApiError(404 if "no adapter named" in str(e) else 400, first_line(e)) from None
    except Exception as e:  # noqa: BLE001 -- sorted here: the request's fault -> 4xx, ours -> 500
        thin = thin_image(image, image_size)
        if thin:
            raise ApiError(422, thin) from None
        if name is not None and name not in resident():  # the file did not load
            raise ApiError(409, f"adapter {name!r} cannot be used with this core: the file did not load "
                                f"({type(e).__name__}: {first_line(e)})") from None
        raise


class LocalModel:
    """The model side in this process: an `AdapterBank` driven through a `ModelRunner` (and an
    `EmbedBatcher` when given), as the single-process server and each Ray model replica run it.

    Args:
        bank: the bank (its `predict`, `predict_batch`, `generate`, `has_embedding`, `resident`).
        runner: the `ModelRunner` over the bank's core.
        batcher: an `EmbedBatcher` over the bank, or None (each request alone).

    Example:
        >>> from samadapt.adapters import AdapterBank
        >>> from samadapt.recipes.serve.work import ModelRunner
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> LocalModel(AdapterBank(sam), ModelRunner(sam)).state()["running"]
        0
    """

    def __init__(self, bank: Any, runner: Any, batcher: Any = None) -> None:
        self.bank, self.runner, self.batcher = bank, runner, batcher
        self.image_size = int(bank.sam.image_size)
        self._resident = bank.resident()  # as of the last model call: health never takes the bank's lock

    def state(self) -> Dict[str, int]:
        return self.runner.state()

    def resident(self) -> List[str]:
        return list(self._resident)

    @contextlib.contextmanager
    def _errors(self, name: Optional[str], image: np.ndarray) -> Iterator[None]:
        try:
            with model_errors(name, image, self.image_size, self.bank.resident):
                yield
        finally:
            self._resident = self.bank.resident()  # the gate is ours: the bank's lock is free

    async def segment(self, item: Dict[str, Any], receive: Optional[Callable],
                      finish: Callable[[Any], Any]) -> Any:
        image, name, image_id, prompts = item["image"], item["adapter"], item["image_id"], item["prompts"]

        def work(model: Optional[Callable[[], Any]] = None) -> Any:
            with self._errors(name, image):
                result = model() if model else self.bank.predict(image, adapter=name, image_id=image_id, **prompts)
            return finish(result)  # in the worker thread: a large answer never stalls the event loop

        if self.batcher is not None and not self.bank.has_embedding(image, name, image_id=image_id):
            batch_item = dict(prompts, image=image, adapter=name, image_id=image_id)
            return await self.runner.run(work, receive, "the segment request", batch=(self.batcher, batch_item))
        return await self.runner.run(work, receive, "the segment request")  # cached: decode at once

    async def auto(self, item: Dict[str, Any], receive: Optional[Callable], finish: Callable[[Any], Any]) -> Any:
        image, name = item["image"], item["adapter"]

        def work() -> Any:
            with self._errors(name, image):
                found = self.bank.generate(image, adapter=name, image_id=item["image_id"], **item["settings"])
            return finish(found)

        return await self.runner.run(work, receive, "the automatic-mask request")


# ----------------------------------------------------------------------------- the app
def build_api(core: CoreInfo, model: Any, listing: Any, images: ImageStore, allowed_hosts: Iterable[str],
              pinned: Iterable[str] = (), max_upload_bytes: int = 25 * 2**20, max_pixels: int = 0,
              max_json_bytes: int = 2**20, request_timeout: float = 60.0, max_queue: int = 8,
              auto_budget: int = AUTO_BUDGET, body_timeout: Optional[float] = 30.0, version: str = "0+unknown",
              ) -> FastAPI:
    """The FastAPI app of `samadapt serve` over a model side (`LocalModel`, or the Ray engine's).

    Args:
        core: the frozen core's `CoreInfo`.
        model: the model side (see the module docstring).
        listing: the adapters served: `available()`, `files()`, `path_of(name)` (an `AdapterBank` or a
            `FileListing`).
        images: the uploaded images.
        allowed_hosts: the `Host` names answered (421 for any other).
        pinned: adapters attached to the core beforehand (served besides the listing's files).
        max_upload_bytes: largest accepted image file (413 above).
        max_pixels: largest accepted width x height (413 above).
        max_json_bytes: largest JSON request body.
        request_timeout: seconds a model request may take (reported in health; the model side enforces it).
        max_queue: model requests that may wait (reported in health; the model side enforces it).
        auto_budget: most pixel-points one /api/auto may ask for (422 above).
        body_timeout: seconds a request body may take to arrive (408 after; None: no limit).
        version: the app's version in the OpenAPI schema.

    Returns:
        the app; `app.state.catalogue()` is its adapter listing.

    Raises:
        ValueError: a limit out of range.

    Example:
        >>> import tempfile
        >>> from fastapi.testclient import TestClient
        >>> from samadapt.recipes.serve.app import create_app
        >>> from samadapt.sam_core import build_sam
        >>> app = create_app(build_sam("tiny"), tempfile.mkdtemp())  # build_api over a LocalModel
        >>> TestClient(app, base_url="http://localhost").get("/api/health").json()["limits"]["max_queue"]
        8
    """
    check_limits(request_timeout, max_queue, auto_budget, body_timeout)
    auto_budget = int(auto_budget)
    pinned = set(pinned)
    image_size = int(core.image_size)
    limits = Limits(max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_json_bytes=max_json_bytes,
                    auto_budget=auto_budget, request_timeout_s=float(request_timeout), max_queue=int(max_queue),
                    body_timeout_s=body_timeout)
    app = FastAPI(title="samadapt serve", version=version, docs_url=None, redoc_url=None,  # offline_docs
                  description="Segment Anything with swappable domain adapters: one frozen core, many small adapter "
                              "files. Upload an image, then ask for masks from points and boxes under any adapter. "
                              f"Model requests run one at a time: at most {int(max_queue)} wait (503 with "
                              f"Retry-After beyond), each within {float(request_timeout):g} s (504 after). /api/auto "
                              f"may ask for at most {auto_budget:,} pixel-points (width x height x "
                              "points_per_side^2); more is refused with 422. Requests must name this server in Host "
                              "(421 otherwise); writes from pages of other origins get 403.")
    add_offline_docs(app)  # /docs and /redoc with local assets: they work offline
    app.add_middleware(
        BodyLimit, limit_for=lambda path: max_upload_bytes + 2**20 if path == "/api/images" else max_json_bytes,
        body_timeout=body_timeout,
    )
    app.add_middleware(HostGuard, allowed_hosts=set(allowed_hosts))  # outermost: a forged Host reaches nothing

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]]
        return JSONResponse(
            status_code=422,
            content=jsonable_encoder({"detail": "invalid request: " + "; ".join(parts), "errors": errors}),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__}: {exc})"})

    def file_entry(path: Path) -> Dict[str, Any]:
        try:
            return inspect_adapter(path)
        except Exception as e:  # noqa: BLE001 -- AdapterFormatError, or whatever else one odd file raises
            return {"error": f"{type(e).__name__}: {first_line(e)}" if not isinstance(e, AdapterError)
                    else first_line(e)}

    def catalogue() -> Dict[str, Dict[str, Any]]:
        """The listing's `available()`, or, when one file breaks it, the same listing made file by file
        with that file's error as its entry.
        """
        try:
            out = {n: {"source": "attached"} for n in sorted(pinned)}
            out.update((n, m) for n, m in listing.available().items() if n not in out)
            return out
        except Exception:  # noqa: BLE001 -- one bad file must not take the listing down for every client
            out = {n: {"source": "attached"} for n in sorted(pinned)}
            for name, path in listing.files().items():
                if name not in out:
                    out[name] = file_entry(path)
            return out

    app.state.catalogue = catalogue

    def check_adapter(name: Optional[str]) -> Optional[str]:
        """400 for a name that could not come from the listing, 404 for one not in it now, 409 for a
        file the listing calls unreadable (before any model work).
        """
        if name is None:
            return None
        if not is_valid_name(name):
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise ApiError(400, f"adapter name {shown!r} is not valid (letters, digits, _ and -, starting with a "
                                f"letter); use a name from GET /api/adapters or null for the plain core")
        if name in pinned:
            return name
        path = listing.path_of(name)
        if path is None or not path.is_file():
            names = sorted(catalogue())
            raise ApiError(
                404, f"no adapter named {name!r}; available: {names[:20]}{' ...' if len(names) > 20 else ''}"
            )
        info = adapter_info(name, file_entry(path), core.fingerprint)
        if info.error:
            raise ApiError(409, f"adapter {name!r} cannot be used with this core: {info.error}")
        return name

    def json_response(body: Any) -> Response:
        return Response(body.model_dump_json().encode(), media_type="application/json")

    # ------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "no-cache"})

    @app.get("/api/health", response_model=Health, responses=READ_ERRORS,
             summary="Server status: core, resident adapters, limits, model work",
             description="Never waits on the model: it answers at once while a heavy request runs.")
    def health() -> Health:
        return Health(arch=core.arch, image_size=image_size, fingerprint=core.fingerprint,
                      adapters=len(catalogue()), resident=list(model.resident()), images=len(images),
                      max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, limits=limits,
                      work=WorkState(**model.state()), encoder=EncoderRoute(**core.encoder))

    @app.get("/api/adapters", response_model=AdapterList, responses=READ_ERRORS,
             summary="Adapters in the folder now, with their metadata",
             description="The folder is re-listed on every call: a file dropped in appears, a removed one disappears. "
                         "A file that cannot be read is listed with compatible false and its error. Never waits on "
                         "the model.")
    def list_adapters() -> AdapterList:
        return AdapterList(core=core.label,
                           adapters=[adapter_info(n, m, core.fingerprint) for n, m in catalogue().items()])

    @app.post("/api/images", response_model=ImageInfo, responses=ERRORS, summary="Upload an image; returns its id",
              description="Any format and mode PIL reads; converted to RGB (EXIF orientation applied). The id is a "
                          "hash of the pixels; the most recent images are kept.")
    def upload_image(file: UploadFile = File(..., description="the image file")) -> ImageInfo:
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"the file is over the upload limit of {max_upload_bytes:,} bytes")
        rgb, mode, fmt = decode_image(data, max_pixels)
        return ImageInfo(image_id=images.add(rgb), width=rgb.shape[1], height=rgb.shape[0], mode=mode, format=fmt)

    @app.post("/api/segment", response_model=SegmentResponse, responses=ERRORS,
              summary="Masks from point and box prompts under an adapter",
              description="points [[x, y, label], ...] and box [x0, y0, x1, y1] are in image pixels; with neither, "
                          "the model's promptless masks. adapter null: the plain frozen core.")
    async def segment(req: SegmentRequest, request: Request) -> SegmentResponse:
        t0 = time.perf_counter()
        image = images.get(req.image_id)
        name = check_adapter(req.adapter)
        h, w = image.shape[:2]
        prompts = check_prompts(req, w, h)

        def finish(result: Any) -> Response:
            masks, scores, _ = result
            encoded = [mask_png(m) for m in masks] if req.format == "png" else masks_rle(masks)
            return json_response(SegmentResponse(
                masks=encoded, scores=[finite(s) for s in scores], best=int(np.argmax(scores)), width=w, height=h,
                adapter=name, elapsed_ms=1000 * (time.perf_counter() - t0)))

        item = {"image": image, "image_id": req.image_id, "adapter": name, "prompts": prompts}
        return await model.segment(item, request.receive, finish)

    @app.post("/api/auto", response_model=AutoResponse, responses=ERRORS,
              summary="Masks for everything in the image (a grid of point prompts)",
              description="Runs the automatic mask generator on the cached embedding; masks as RLE with bbox "
                          "[x, y, w, h], area and predicted IoU, highest score first. The work asked for, width x "
                          f"height x points_per_side^2, may be at most {auto_budget:,} pixel-points (422 "
                          "above, naming the largest points_per_side that fits).")
    async def auto(req: AutoRequest, request: Request) -> AutoResponse:
        t0 = time.perf_counter()
        image = images.get(req.image_id)
        h, w = image.shape[:2]
        cost = h * w * req.points_per_side ** 2
        if cost > auto_budget:
            fits = math.isqrt(auto_budget // (h * w))
            hint = (f"use points_per_side <= {fits} for this image, or a smaller image" if fits >= 1
                    else "this image is too large for automatic masks here; upload a smaller one")
            raise ApiError(422, f"automatic masks for this {w}x{h} image at points_per_side={req.points_per_side} "
                                f"are {cost:,} pixel-points of work, over the server's budget of "
                                f"{auto_budget:,} (--auto-budget); {hint}")
        name = check_adapter(req.adapter)
        # bound the memory of one batch of candidate logits: 3 per point, each upscaled to the image
        per_point = 12 * (h * w + image_size ** 2)
        batch = int(min(64, max(1, AUTO_BATCH_BYTES // per_point)))

        def finish(found: List[Dict[str, Any]]) -> Response:
            found = sorted(found, key=lambda m: -m["predicted_iou"])
            masks = [AutoMask(segmentation=m["segmentation"], bbox=[float(v) for v in m["bbox"]],
                              area=int(m["area"]), predicted_iou=finite(m["predicted_iou"]),
                              stability_score=finite(m["stability_score"]),
                              point_coords=[[float(v) for v in p] for p in m["point_coords"]],
                              crop_box=[int(v) for v in m["crop_box"]]) for m in found[:req.max_masks]]
            return json_response(AutoResponse(masks=masks, width=w, height=h, adapter=name,
                                              elapsed_ms=1000 * (time.perf_counter() - t0)))

        settings = dict(points_per_side=req.points_per_side, points_per_batch=batch,
                        pred_iou_thresh=req.pred_iou_thresh, stability_score_thresh=req.stability_score_thresh,
                        box_nms_thresh=req.box_nms_thresh, output_mode=req.output_mode)
        item = {"image": image, "image_id": req.image_id, "adapter": name, "settings": settings}
        return await model.auto(item, request.receive, finish)

    return app
