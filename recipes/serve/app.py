"""The `samadapt serve` app: an HTTP API and an interactive page over one frozen core and adapter files.

One `AdapterBank` over a folder of adapter files serves every request:

    GET  /               the interactive page (recipes/serve/static/index.html)
    GET  /api/health     core, adapters resident, limits
    GET  /api/adapters   adapter files in the folder now, with their metadata
    POST /api/images     upload an image (multipart field `file`) -> {image_id, width, height}
    POST /api/segment    {image_id, adapter, points, box, multimask, format} -> {masks, scores, best}
    POST /api/auto       {image_id, adapter, points_per_side} -> masks for everything (RLE, bbox, area, score)

Errors are JSON `{"detail": "..."}` with a 4xx status; the OpenAPI schema is at /openapi.json and
/docs. Image embeddings are computed once per (image, adapter) and cached by the bank.

The bank is driven only through its public calls (`AdapterBank.predict`, `AdapterBank.generate`,
`AdapterBank.available`, `AdapterBank.resident`).

Example:
    >>> import tempfile
    >>> from fastapi.testclient import TestClient
    >>> from samadapt.sam_core import build_sam
    >>> app = create_app(build_sam("tiny"), tempfile.mkdtemp())
    >>> TestClient(app).get("/api/adapters").json()["adapters"]
    []
"""
import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from torch import nn

from samadapt.adapters import AdapterBank, AdapterError, AdapterFormatError, IncompatibleAdapterError, is_valid_name

from .api import (
    ERRORS,
    AdapterList,
    ApiError,
    AutoMask,
    AutoRequest,
    AutoResponse,
    BodyLimit,
    Health,
    ImageInfo,
    ImageStore,
    SegmentRequest,
    SegmentResponse,
    adapter_info,
    check_prompts,
    decode_image,
    finite,
    mask_png,
    masks_rle,
)

STATIC = Path(__file__).with_name("static")
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def create_app(sam: nn.Module, adapters_dir: Union[str, os.PathLike], capacity: int = 8,
               max_upload_bytes: int = 25 * 2**20, max_pixels: int = 4096 * 4096, image_cache: int = 16,
               max_json_bytes: int = 2**20) -> FastAPI:
    """The FastAPI app serving `sam` with the adapters in `adapters_dir`.

    Args:
        sam: the frozen core (nothing else should drive it while the app runs).
        adapters_dir: folder of `<name>.safetensors` adapter files; re-listed on every request.
        capacity: adapters kept loaded at once (least recently used evicted).
        max_upload_bytes: largest accepted image file (413 above).
        max_pixels: largest accepted width x height (413 above).
        image_cache: uploaded images kept (least recently used forgotten; then 404 until re-uploaded).
        max_json_bytes: largest JSON request body.

    Returns:
        the app; `app.state.bank` is its `AdapterBank`, `app.state.images` its `ImageStore`.

    Raises:
        ValueError: `image_cache` below 1 (and the bank's own checks of `capacity` and the folder).

    Example:
        >>> import tempfile
        >>> from fastapi.testclient import TestClient
        >>> from samadapt.sam_core import build_sam
        >>> health = TestClient(create_app(build_sam("tiny"), tempfile.mkdtemp())).get("/api/health").json()
        >>> health["status"], health["arch"], health["adapters"]
        ('ok', 'tiny', 0)
    """
    bank = AdapterBank(sam, adapters_dir, capacity=capacity, cache_size=max(32, 4 * image_cache))
    images = ImageStore(image_cache)
    app = FastAPI(title="samadapt serve", version=_version(),
                  description="Segment Anything with swappable domain adapters: one frozen core, many small adapter "
                              "files. Upload an image, then ask for masks from points and boxes under any adapter.")
    app.state.bank, app.state.images = bank, images
    app.add_middleware(
        BodyLimit, limit_for=lambda path: max_upload_bytes + 2**20 if path == "/api/images" else max_json_bytes
    )

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

    def check_adapter(name: Optional[str]) -> Optional[str]:
        """400 for a name that could not come from the listing, 404 for one not in it now."""
        if name is None:
            return None
        if not is_valid_name(name):
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise ApiError(400, f"adapter name {shown!r} is not valid (letters, digits, _ and -, starting with a "
                                f"letter); use a name from GET /api/adapters or null for the plain core")
        if not (bank.directory / f"{name}.safetensors").is_file() and name not in bank.available():
            names = sorted(bank.available())
            raise ApiError(
                404, f"no adapter named {name!r}; available: {names[:20]}{' ...' if len(names) > 20 else ''}"
            )
        return name

    def run_bank(name: Optional[str], fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (IncompatibleAdapterError, AdapterFormatError) as e:
            raise ApiError(409, f"adapter {name!r} cannot be used with this core: {_first_line(e)}") from None
        except AdapterError as e:
            raise ApiError(404 if "no adapter named" in str(e) else 400, _first_line(e)) from None

    # ------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "no-cache"})

    @app.get("/api/health", response_model=Health, summary="Server status: core, resident adapters, limits")
    def health() -> Health:
        return Health(arch=str(sam.arch), image_size=int(sam.image_size), fingerprint=str(sam.fingerprint),
                      adapters=len(bank.available()), resident=bank.resident(), images=len(images),
                      max_upload_bytes=max_upload_bytes, max_pixels=max_pixels)

    @app.get("/api/adapters", response_model=AdapterList, summary="Adapters in the folder now, with their metadata",
             description="The folder is re-listed on every call: a file dropped in appears, a removed one disappears.")
    def list_adapters() -> AdapterList:
        fp = str(sam.fingerprint)
        return AdapterList(core=f"{sam.arch}@{sam.image_size} {fp}",
                           adapters=[adapter_info(n, m, fp) for n, m in bank.available().items()])

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
    def segment(req: SegmentRequest) -> SegmentResponse:
        t0 = time.perf_counter()
        image = images.get(req.image_id)
        name = check_adapter(req.adapter)
        h, w = image.shape[:2]
        prompts = check_prompts(req, w, h)
        masks, scores, _ = run_bank(name, lambda: bank.predict(image, adapter=name, image_id=req.image_id, **prompts))
        encoded = [mask_png(m) for m in masks] if req.format == "png" else masks_rle(masks)
        return SegmentResponse(masks=encoded, scores=[finite(s) for s in scores], best=int(np.argmax(scores)),
                               width=w, height=h, adapter=name, elapsed_ms=1000 * (time.perf_counter() - t0))

    @app.post("/api/auto", response_model=AutoResponse, responses=ERRORS,
              summary="Masks for everything in the image (a grid of point prompts)",
              description="Runs the automatic mask generator on the cached embedding; masks as RLE with bbox "
                          "[x, y, w, h], area and predicted IoU, highest score first.")
    def auto(req: AutoRequest) -> AutoResponse:
        t0 = time.perf_counter()
        image = images.get(req.image_id)
        name = check_adapter(req.adapter)
        found = run_bank(name, lambda: bank.generate(
            image, adapter=name, image_id=req.image_id, points_per_side=req.points_per_side,
            pred_iou_thresh=req.pred_iou_thresh, stability_score_thresh=req.stability_score_thresh,
            output_mode="uncompressed_rle"))
        found.sort(key=lambda m: -m["predicted_iou"])
        masks = [AutoMask(rle=m["segmentation"], bbox=[float(v) for v in m["bbox"]], area=int(m["area"]),
                          score=finite(m["predicted_iou"]), stability_score=finite(m["stability_score"]),
                          point=[float(v) for v in m["point_coords"][0]]) for m in found[:req.max_masks]]
        return AutoResponse(masks=masks, width=image.shape[1], height=image.shape[0], adapter=name,
                            elapsed_ms=1000 * (time.perf_counter() - t0))

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


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn in a daemon thread; yields its base URL and stops it on exit.

    Args:
        app: the app (from `create_app`).
        host: address to bind.
        port: TCP port, 0 for any free one.
        timeout: seconds to wait for the server to start, and for it to stop.

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
    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
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
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def run_server(args) -> int:
    """The `samadapt serve` command: load the core, bind (127.0.0.1 unless `--host`), print the URL, serve.

    Args:
        args: the parsed CLI arguments (`adapters`, `base`, `capacity`, `host`, `port`, `log_level`).

    Returns:
        0 when the server stops.

    Raises:
        UserError: the adapter folder is missing or the address cannot be bound.

    Example:
        >>> # samadapt serve --adapters my_adapters/ --port 8000
    """
    import uvicorn

    from ..errors import UserError
    from ..model import load_base

    directory = Path(args.adapters)
    if not directory.is_dir():
        raise UserError(f"adapter folder {directory} does not exist; create it or pass another --adapters")
    sam = load_base(getattr(args, "base", None))
    app = create_app(sam, directory, capacity=getattr(args, "capacity", 8) or 8)
    host, port = getattr(args, "host", None) or "127.0.0.1", int(getattr(args, "port", 8000))
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server running there? "
                        f"pass another --port") from None
    url = url_of(sock)
    n = len(app.state.bank.available())
    print(f"samadapt serve: {url}  (core {sam.arch}@{sam.image_size}, {n} adapter(s) in {directory}; "
          f"API docs at {url}docs; Ctrl+C stops)", flush=True)
    if host not in LOOPBACK:
        print(f"warning: listening on {host}, not only this machine: anyone who can reach it can use the server",
              flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=getattr(args, "log_level", "info"), lifespan="off"))
    server.run(sockets=[sock])
    return 0
