# why over 500 lines: the routes, their limits (budget, queue, time limit) and the server lifecycle in one place
"""The `samadapt serve` app: an HTTP API and an interactive page over one frozen core and adapter files.

One `AdapterBank` over a folder of adapter files serves every request:

    GET  /               the interactive page (recipes/serve/static/index.html)
    GET  /api/health     core, adapters resident, limits
    GET  /api/adapters   adapter files in the folder now, with their metadata
    POST /api/images     upload an image (multipart field `file`) -> {image_id, width, height}
    POST /api/segment    {image_id, adapter, points, box, multimask, format} -> {masks, scores, best}
    POST /api/auto       {image_id, adapter, points_per_side, thresholds} -> masks for everything (segment_anything's
                         records: segmentation RLE, area, bbox, predicted_iou, point_coords, stability_score, crop_box)

Errors are JSON `{"detail": "..."}` with a 4xx status (503/504 for the work limits); the OpenAPI
schema is at /openapi.json and /docs. Image embeddings are computed once per (image, adapter) and
cached by the bank. Every request passes the Host allowlist and, for writes, the origin check
(`guard`); model requests run through the `ModelRunner` (`work`), so health and the listing
never wait on the model.

The bank is driven only through its public calls (`AdapterBank.predict`, `AdapterBank.generate`,
`AdapterBank.available`, `AdapterBank.resident`).

Example:
    >>> import tempfile
    >>> from fastapi.testclient import TestClient
    >>> from samadapt.sam_core import build_sam
    >>> app = create_app(build_sam("tiny"), tempfile.mkdtemp())
    >>> TestClient(app, base_url="http://localhost").get("/api/adapters").json()["adapters"]
    []
"""
import contextlib
import dataclasses
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Union

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from torch import nn

from samadapt.adapters import (
    AdapterBank,
    AdapterError,
    AdapterFormatError,
    IncompatibleAdapterError,
    attached,
    is_valid_name,
)
from samadapt.adapters import inspect as inspect_adapter

from ..limits import MAX_PIXELS
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
from .batching import EmbedBatcher
from .guard import LOOPBACK_NAMES, HostGuard, allowed_hosts_for, header_timeout_protocol
from .offline_docs import add_offline_docs
from .work import Cancelled, ModelRunner

STATIC = Path(__file__).with_name("static")
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
LOOPBACK = set(LOOPBACK_NAMES)
AUTO_BUDGET = 2**30  # pixel-points: 1024 x 1024 at 32 points per side, 2048 x 2048 at 16
AUTO_BATCH_BYTES = 256 * 2**20  # memory for one batch of automatic-mask logits (points_per_batch follows)
GRACEFUL_SHUTDOWN_S = 5


def create_app(sam: nn.Module, adapters_dir: Optional[Union[str, os.PathLike]], capacity: int = 8,
               max_upload_bytes: int = 25 * 2**20, max_pixels: int = MAX_PIXELS, image_cache: int = 16,
               max_json_bytes: int = 2**20, allowed_hosts: Optional[Iterable[str]] = None,
               request_timeout: float = 60.0, max_queue: int = 8, auto_budget: int = AUTO_BUDGET,
               body_timeout: Optional[float] = 30.0, catalogue: Optional[Union[str, os.PathLike, dict]] = None,
               allow_base_mismatch: bool = False, max_batch: int = 8, max_wait_ms: float = 5.0,
               precision: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving `sam` with the adapters in `adapters_dir`.

    Args:
        sam: the frozen core (nothing else should drive it while the app runs).
        adapters_dir: folder of `<name>.safetensors` adapter files; re-listed on every request.
        capacity: adapters kept loaded at once (least recently used evicted).
        max_upload_bytes: largest accepted image file (413 above).
        max_pixels: largest accepted width x height (413 above).
        image_cache: uploaded images kept (least recently used forgotten; then 404 until re-uploaded).
        max_json_bytes: largest JSON request body.
        allowed_hosts: the `Host` names answered (421 for any other); default the loopback names
            (`allowed_hosts_for` adds the bound host and `--allowed-host` names).
        request_timeout: seconds a model request may take, waiting for its turn included (504/503 after).
        max_queue: model requests that may wait while one runs (503 with Retry-After beyond).
        auto_budget: most pixel-points (width x height x points_per_side^2) one /api/auto may ask for (422 above).
        body_timeout: seconds a request body may take to arrive (408 after; None: no limit).
        catalogue: a catalogue file or mapping (adapter name -> path, URL or hf:// source [+ sha256]),
            served besides (or, with `adapters_dir` None, instead of) the folder.
        allow_base_mismatch: serve adapters made for other base weights too.
        max_batch: most concurrent requests embedded together in one mixed-adapter encoder pass
            (1: each request alone); requests on a cached embedding are never held back.
        max_wait_ms: longest a request needing an embedding waits for others to batch with.
        precision: the image encoder's precision on a CPU: `auto`, `bf16` or `fp32` (None:
            `$SAMADAPT_PRECISION`, else `auto`); `/api/health` shows the route under `encoder`.

    Returns:
        the app; `app.state.bank` is its `AdapterBank`, `app.state.images` its `ImageStore`,
        `app.state.runner` its `ModelRunner`, `app.state.catalogue()` its adapter listing.

    Raises:
        ValueError: `image_cache` below 1, a limit out of range (and the bank's own checks of
            `capacity` and the folder).

    Example:
        >>> import tempfile
        >>> from fastapi.testclient import TestClient
        >>> from samadapt.sam_core import build_sam
        >>> app = create_app(build_sam("tiny"), tempfile.mkdtemp())
        >>> health = TestClient(app, base_url="http://localhost").get("/api/health").json()
        >>> health["status"], health["arch"], health["adapters"]
        ('ok', 'tiny', 0)
    """
    if int(auto_budget) < 1:
        raise ValueError(f"auto_budget={auto_budget!r} must be a positive number of pixel-points, "
                         f"such as {AUTO_BUDGET}")
    if body_timeout is not None and not body_timeout > 0:
        raise ValueError(f"body_timeout={body_timeout!r} must be a positive number of seconds (or None)")
    bank = AdapterBank(sam, adapters_dir, capacity=capacity, cache_size=max(32, 4 * image_cache),
                       catalogue=catalogue, allow_base_mismatch=allow_base_mismatch, precision=precision)
    images = ImageStore(image_cache)
    runner = ModelRunner(sam, timeout=request_timeout, max_queue=max_queue)
    # dynamic batching: concurrent embedding requests share one mixed-adapter encoder pass
    batcher = EmbedBatcher(bank.predict_batch, lambda item: bank.predict(**item), max_batch=max_batch,
                           max_wait_s=max_wait_ms / 1000.0, max_adapters=capacity) if int(max_batch) > 1 else None
    hosts = set(allowed_hosts) if allowed_hosts is not None else allowed_hosts_for(None)
    fingerprint = str(sam.fingerprint)  # the core is frozen: hash its weights once, not per request
    pinned = set(attached(sam))  # the bank serves these besides the folder's files
    resident = {"names": bank.resident()}  # as of the last model call: health never takes the model's lock
    limits = Limits(max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_json_bytes=max_json_bytes,
                    auto_budget=int(auto_budget), request_timeout_s=runner.timeout, max_queue=runner.max_queue,
                    body_timeout_s=body_timeout)
    app = FastAPI(title="samadapt serve", version=_version(), docs_url=None, redoc_url=None,  # offline_docs
                  description="Segment Anything with swappable domain adapters: one frozen core, many small adapter "
                              "files. Upload an image, then ask for masks from points and boxes under any adapter. "
                              f"Model requests run one at a time: at most {runner.max_queue} wait (503 with "
                              f"Retry-After beyond), each within {runner.timeout:g} s (504 after). /api/auto may ask "
                              f"for at most {int(auto_budget):,} pixel-points (width x height x points_per_side^2); "
                              "more is refused with 422. Requests must name this server in Host (421 otherwise); "
                              "writes from pages of other origins get 403.")
    app.state.bank, app.state.images, app.state.runner = bank, images, runner
    app.state.batcher = batcher
    add_offline_docs(app)  # /docs and /redoc with local assets: they work offline
    app.add_middleware(
        BodyLimit, limit_for=lambda path: max_upload_bytes + 2**20 if path == "/api/images" else max_json_bytes,
        body_timeout=body_timeout,
    )
    app.add_middleware(HostGuard, allowed_hosts=hosts)  # outermost: a forged Host reaches nothing

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
            return {"error": f"{type(e).__name__}: {_first_line(e)}" if not isinstance(e, AdapterError)
                    else _first_line(e)}

    def catalogue() -> Dict[str, Dict[str, Any]]:
        """`bank.available()`, or, when one file breaks the library's listing, the same listing made
        file by file with that file's error as its entry.
        """
        try:
            return bank.available()
        except Exception:  # noqa: BLE001 -- one bad file must not take the listing down for every client
            out: Dict[str, Dict[str, Any]] = {n: {"source": "attached"} for n in sorted(pinned)}
            for name, path in bank.files().items():
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
        path = bank.path_of(name)
        if name in pinned:
            return name
        if path is None or not path.is_file():
            names = sorted(catalogue())
            raise ApiError(
                404, f"no adapter named {name!r}; available: {names[:20]}{' ...' if len(names) > 20 else ''}"
            )
        info = adapter_info(name, file_entry(path), fingerprint)
        if info.error:
            raise ApiError(409, f"adapter {name!r} cannot be used with this core: {info.error}")
        return name

    def thin_image(image: np.ndarray) -> Optional[str]:
        """Why the core cannot take `image` (a side that rounds to 0 px at the model size), or None."""
        from samadapt.sam_core.transforms import ResizeLongestSide

        h, w = image.shape[:2]
        rh, rw = ResizeLongestSide.get_preprocess_shape(h, w, int(sam.image_size))
        if min(rh, rw) >= 1:
            return None
        return (f"the image is {w}x{h} px: resized to the model's {int(sam.image_size)} px its short side is "
                f"{min(rh, rw)} px; upload an image whose short side is at least "
                f"{math.ceil(max(h, w) / (2 * int(sam.image_size)))} px")

    def model_call(name: Optional[str], image: np.ndarray, fn: Callable[[], Any]) -> Any:
        """Run `fn` (a bank call) in the runner's worker; its failures become the client's 4xx where
        they are the request's fault.
        """
        try:
            return fn()
        except (Cancelled, ApiError):
            raise
        except (IncompatibleAdapterError, AdapterFormatError) as e:
            raise ApiError(409, f"adapter {name!r} cannot be used with this core: {_first_line(e)}") from None
        except AdapterError as e:
            raise ApiError(404 if "no adapter named" in str(e) else 400, _first_line(e)) from None
        except Exception as e:  # noqa: BLE001 -- sorted below: the request's fault -> 4xx, ours -> 500
            thin = thin_image(image)
            if thin:
                raise ApiError(422, thin) from None
            if name is not None and name not in bank.resident():  # the file did not load
                raise ApiError(409, f"adapter {name!r} cannot be used with this core: the file did not load "
                                    f"({type(e).__name__}: {_first_line(e)})") from None
            raise
        finally:
            resident["names"] = bank.resident()  # the gate is ours: the bank's lock is free

    def json_response(model: Any) -> Response:
        # serialised in the worker thread: a large answer never stalls the event loop (health stays instant)
        return Response(model.model_dump_json().encode(), media_type="application/json")

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
        return Health(arch=str(sam.arch), image_size=int(sam.image_size), fingerprint=fingerprint,
                      adapters=len(catalogue()), resident=list(resident["names"]), images=len(images),
                      max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, limits=limits,
                      work=WorkState(**runner.state()), encoder=EncoderRoute(**dataclasses.asdict(bank.route)))

    @app.get("/api/adapters", response_model=AdapterList, responses=READ_ERRORS,
             summary="Adapters in the folder now, with their metadata",
             description="The folder is re-listed on every call: a file dropped in appears, a removed one disappears. "
                         "A file that cannot be read is listed with compatible false and its error. Never waits on "
                         "the model.")
    def list_adapters() -> AdapterList:
        return AdapterList(core=f"{sam.arch}@{sam.image_size} {fingerprint}",
                           adapters=[adapter_info(n, m, fingerprint) for n, m in catalogue().items()])

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

        def work(model: Optional[Callable[[], Any]] = None) -> Response:
            masks, scores, _ = model_call(
                name, image, model or (lambda: bank.predict(image, adapter=name, image_id=req.image_id, **prompts)))
            encoded = [mask_png(m) for m in masks] if req.format == "png" else masks_rle(masks)
            return json_response(SegmentResponse(
                masks=encoded, scores=[finite(s) for s in scores], best=int(np.argmax(scores)), width=w, height=h,
                adapter=name, elapsed_ms=1000 * (time.perf_counter() - t0)))

        if batcher is not None and not bank.has_embedding(image, name, image_id=req.image_id):
            item = dict(prompts, image=image, adapter=name, image_id=req.image_id)
            return await runner.run(work, request.receive, "the segment request", batch=(batcher, item))
        return await runner.run(work, request.receive, "the segment request")  # cached: decode at once

    @app.post("/api/auto", response_model=AutoResponse, responses=ERRORS,
              summary="Masks for everything in the image (a grid of point prompts)",
              description="Runs the automatic mask generator on the cached embedding; masks as RLE with bbox "
                          "[x, y, w, h], area and predicted IoU, highest score first. The work asked for, width x "
                          f"height x points_per_side^2, may be at most {int(auto_budget):,} pixel-points (422 "
                          "above, naming the largest points_per_side that fits).")
    async def auto(req: AutoRequest, request: Request) -> AutoResponse:
        t0 = time.perf_counter()
        image = images.get(req.image_id)
        h, w = image.shape[:2]
        cost = h * w * req.points_per_side ** 2
        if cost > auto_budget:
            fits = math.isqrt(int(auto_budget) // (h * w))
            hint = (f"use points_per_side <= {fits} for this image, or a smaller image" if fits >= 1
                    else "this image is too large for automatic masks here; upload a smaller one")
            raise ApiError(422, f"automatic masks for this {w}x{h} image at points_per_side={req.points_per_side} "
                                f"are {cost:,} pixel-points of work, over the server's budget of "
                                f"{int(auto_budget):,} (--auto-budget); {hint}")
        name = check_adapter(req.adapter)
        # bound the memory of one batch of candidate logits: 3 per point, each upscaled to the image
        per_point = 12 * (h * w + int(sam.image_size) ** 2)
        batch = int(min(64, max(1, AUTO_BATCH_BYTES // per_point)))

        def work() -> Response:
            found = model_call(name, image, lambda: bank.generate(
                image, adapter=name, image_id=req.image_id, points_per_side=req.points_per_side,
                points_per_batch=batch, pred_iou_thresh=req.pred_iou_thresh,
                stability_score_thresh=req.stability_score_thresh, box_nms_thresh=req.box_nms_thresh,
                output_mode=req.output_mode))
            found.sort(key=lambda m: -m["predicted_iou"])
            masks = [AutoMask(segmentation=m["segmentation"], bbox=[float(v) for v in m["bbox"]],
                              area=int(m["area"]), predicted_iou=finite(m["predicted_iou"]),
                              stability_score=finite(m["stability_score"]),
                              point_coords=[[float(v) for v in p] for p in m["point_coords"]],
                              crop_box=[int(v) for v in m["crop_box"]]) for m in found[:req.max_masks]]
            return json_response(AutoResponse(masks=masks, width=w, height=h, adapter=name,
                                              elapsed_ms=1000 * (time.perf_counter() - t0)))

        return await runner.run(work, request.receive, "the automatic-mask request")

    return app


# ----------------------------------------------------------------------------- running it
def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("samadapt")
    except Exception:  # noqa: BLE001
        return "0+unknown"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `(host, port)`; port 0 picks a free one.

    Args:
        host: address to bind (`127.0.0.1` keeps the server to this machine).
        port: TCP port, 0 for any free one.

    Returns:
        the bound, listening, inheritable socket.

    Raises:
        OSError: the address cannot be bound (in use, or not this machine's).

    Example:
        >>> sock = bind_socket("127.0.0.1", 0); url_of(sock).startswith("http://127.0.0.1:"); sock.close()
        True
    """
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """The base URL `http://host:port/` of a bound socket (IPv6 hosts in brackets).

    Example:
        >>> sock = bind_socket("127.0.0.1", 0); url_of(sock).endswith("/"); sock.close()
        True
    """
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def uvicorn_server(app: FastAPI, log_level: str = "warning", header_timeout: float = 10.0,
                   graceful: float = GRACEFUL_SHUTDOWN_S):
    """A `uvicorn.Server` for `app` with the head timeout, and shutdown that stops the model work.

    On SIGTERM/SIGINT the running and waiting model requests are cancelled at once (they stop at
    their next model step and answer 503), new ones are refused, and uvicorn waits at most
    `graceful` seconds for the connections before closing them.

    Args:
        app: the app (from `create_app`).
        log_level: uvicorn's log level.
        header_timeout: seconds a client has to send a request head (408 and closed after).
        graceful: seconds uvicorn waits for open requests at shutdown.

    Returns:
        the server; `server.run(sockets=[sock])` serves until stopped.

    Example:
        >>> import tempfile
        >>> from samadapt.sam_core import build_sam
        >>> uvicorn_server(create_app(build_sam("tiny"), tempfile.mkdtemp())).config.timeout_graceful_shutdown
        5
    """
    import uvicorn

    runner = app.state.runner

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            runner.cancel_all("shutdown", close=True)  # the model work stops now, not after the grace period
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, lifespan="off", http=header_timeout_protocol(header_timeout),
                            timeout_graceful_shutdown=graceful, timeout_keep_alive=5)
    return Server(config)


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                      header_timeout: float = 10.0) -> Iterator[str]:
    """Run `app` under uvicorn in a daemon thread; yields its base URL and stops it on exit.

    Args:
        app: the app (from `create_app`).
        host: address to bind.
        port: TCP port, 0 for any free one.
        timeout: seconds to wait for the server to start, and for it to stop.
        header_timeout: seconds a client has to send a request head.

    Yields:
        the base URL, e.g. `http://127.0.0.1:54321/`.

    Raises:
        RuntimeError: the server did not start within `timeout`.

    Example:
        >>> import tempfile, httpx
        >>> from samadapt.sam_core import build_sam
        >>> with background_server(create_app(build_sam("tiny"), tempfile.mkdtemp())) as url:
        ...     httpx.get(url + "api/health").json()["status"]
        'ok'
    """
    sock = bind_socket(host, port)
    server = uvicorn_server(app, header_timeout=header_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="samadapt-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        yield url_of(sock)
    finally:
        app.state.runner.cancel_all("shutdown")
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def port_number(value: Any) -> int:
    """`--port` as a TCP port number, 0..65535 (0 picks a free one).

    Raises:
        UserError: not a whole number in that range.

    Example:
        >>> port_number("8000")
        8000
    """
    from ..errors import UserError

    text = str(value).strip()
    if not (text.isdigit() and 0 <= int(text) <= 65535):
        raise UserError(f"--port {value} is not a TCP port; use a number from 0 to 65535 (0 picks a free one)")
    return int(text)


def _positive(flag: str, value: Any, example: str, allow_zero: bool = False) -> float:
    from ..errors import UserError

    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (math.isfinite(number) and (number >= 0 if allow_zero else number > 0)):
        what = "0 or more" if allow_zero else "a positive number"
        raise UserError(f"{flag} {value} must be {what}, such as {example}")
    return number


def run_server(args) -> int:
    """The `samadapt serve` command: load the core, bind (127.0.0.1 unless `--host`), print the URL, serve.

    Args:
        args: the parsed CLI arguments (`adapters`, `base`, `capacity`, `host`, `port`, `allowed_host`,
            `request_timeout`, `max_queue`, `auto_budget`, `header_timeout`, `body_timeout`, `log_level`).

    Returns:
        0 when the server stops.

    Raises:
        UserError: a flag out of range, the adapter folder is missing, or the address cannot be bound.

    Example:
        >>> # samadapt serve --adapters my_adapters/ --port 8000
    """
    from ..errors import UserError
    from ..model import load_base

    host = getattr(args, "host", None) or "127.0.0.1"
    port = port_number(getattr(args, "port", 8000))
    if getattr(args, "engine", "single") == "ray":  # the same API on Ray Serve, N model replicas
        from .ray_app import run_ray_server

        return run_ray_server(args, host, port)
    request_timeout = _positive("--request-timeout", getattr(args, "request_timeout", 60.0), "60")
    header_timeout = _positive("--header-timeout", getattr(args, "header_timeout", 10.0), "10")
    body_timeout = _positive("--body-timeout", getattr(args, "body_timeout", 30.0), "30")
    max_queue = _positive("--max-queue", getattr(args, "max_queue", 8), "8", allow_zero=True)
    auto_budget = _positive("--auto-budget", getattr(args, "auto_budget", AUTO_BUDGET), str(AUTO_BUDGET))
    if max_queue != int(max_queue) or auto_budget != int(auto_budget):
        raise UserError("--max-queue and --auto-budget take whole numbers")
    max_batch = _positive("--max-batch", getattr(args, "max_batch", 8), "8")
    max_wait_ms = _positive("--max-wait-ms", getattr(args, "max_wait_ms", 5.0), "5", allow_zero=True)
    if max_batch != int(max_batch):
        raise UserError(f"--max-batch {getattr(args, 'max_batch', 8)} must be a whole number, such as 8 "
                        f"(1: no batching)")
    max_batch = int(max_batch)
    try:
        hosts = allowed_hosts_for(host, getattr(args, "allowed_host", None) or ())
    except ValueError as e:
        raise UserError(str(e)) from None
    directory: Optional[Path] = Path(args.adapters)
    catalogue = None
    if directory.is_file() and directory.suffix.lower() in (".yaml", ".yml", ".json"):
        directory, catalogue = None, Path(args.adapters)  # a catalogue: name -> path, URL or hf:// source
    elif not directory.is_dir():
        raise UserError(f"adapter folder {directory} does not exist; create it or pass another --adapters "
                        f"(a folder, or a .yaml/.json catalogue)")
    from samadapt.sam_core.fast import resolve_precision

    try:
        precision = resolve_precision(getattr(args, "precision", None))
    except ValueError as e:
        raise UserError(str(e)) from None
    sam = load_base(getattr(args, "base", None))
    app = create_app(sam, directory, capacity=getattr(args, "capacity", 8) or 8, allowed_hosts=hosts,
                     request_timeout=request_timeout, max_queue=int(max_queue), auto_budget=int(auto_budget),
                     body_timeout=body_timeout, catalogue=catalogue,
                     allow_base_mismatch=bool(getattr(args, "allow_base_mismatch", False)),
                     max_batch=max_batch, max_wait_ms=max_wait_ms, precision=precision)
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server running there? "
                        f"pass another --port") from None
    url = url_of(sock)
    n = len(app.state.catalogue())
    print(f"samadapt serve: {url}  (core {sam.arch}@{sam.image_size}, {n} adapter(s) in {directory or catalogue}; "
          f"API docs at {url}docs; Ctrl+C stops)", flush=True)
    print(f"samadapt serve: encoder {app.state.bank.route.describe()}", flush=True)
    if host not in LOOPBACK:
        print(f"warning: listening on {host}, not only this machine: anyone who can reach it can use the server; "
              f"it answers to Host {', '.join(sorted(hosts))} (add names with --allowed-host)", flush=True)
    server = uvicorn_server(app, log_level=getattr(args, "log_level", "info"), header_timeout=header_timeout)
    server.run(sockets=[sock])
    app.state.runner.cancel_all("shutdown", close=True)
    return 0
