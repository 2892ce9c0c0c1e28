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
never wait on the model. The routes themselves are `routes.build_api` over a `routes.LocalModel`:
the Ray engine (`ray_app`) serves the same routes, with the model work on its replicas.

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
from typing import Any, Dict, Iterable, Iterator, Optional, Union

from fastapi import FastAPI
from torch import nn

from samadapt.adapters import AdapterBank, attached
from samadapt.sam_core.fast import encoder_batch

from ..limits import MAX_PIXELS
from .api import ImageStore
from .batching import EmbedBatcher
from .guard import LOOPBACK_NAMES, allowed_hosts_for, header_timeout_protocol
from .routes import AUTO_BUDGET, CoreInfo, LocalModel, build_api, check_limits, package_version, split_adapters_arg
from .work import ModelRunner

LOOPBACK = set(LOOPBACK_NAMES)
GRACEFUL_SHUTDOWN_S = 5


def create_app(sam: nn.Module, adapters_dir: Optional[Union[str, os.PathLike]], capacity: int = 8,
               max_upload_bytes: int = 25 * 2**20, max_pixels: int = MAX_PIXELS, image_cache: int = 16,
               max_json_bytes: int = 2**20, allowed_hosts: Optional[Iterable[str]] = None,
               request_timeout: float = 60.0, max_queue: int = 8, auto_budget: int = AUTO_BUDGET,
               body_timeout: Optional[float] = 30.0, catalogue: Optional[Union[str, os.PathLike, dict]] = None,
               allow_base_mismatch: bool = False, max_batch: Optional[int] = None, max_wait_ms: float = 5.0,
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
            (1: each request alone; None: `sam_core.fast.encoder_batch`, 8 but 1 on a CPU from
            512 px, where a batch costs more per image); requests on a cached embedding are never
            held back.
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
    check_limits(request_timeout, max_queue, auto_budget, body_timeout)
    bank = AdapterBank(sam, adapters_dir, capacity=capacity, cache_size=max(32, 4 * image_cache),
                       catalogue=catalogue, allow_base_mismatch=allow_base_mismatch, precision=precision)
    images = ImageStore(image_cache)
    runner = ModelRunner(sam, timeout=request_timeout, max_queue=max_queue)
    # dynamic batching: concurrent embedding requests share one mixed-adapter encoder pass
    max_batch = encoder_batch(sam) if max_batch is None else int(max_batch)
    batcher = EmbedBatcher(bank.predict_batch, lambda item: bank.predict(**item), max_batch=max_batch,
                           max_wait_s=max_wait_ms / 1000.0, max_adapters=capacity) if int(max_batch) > 1 else None
    hosts = set(allowed_hosts) if allowed_hosts is not None else allowed_hosts_for(None)
    # the core is frozen: hash its weights once, not per request
    core = CoreInfo(arch=str(sam.arch), image_size=int(sam.image_size), fingerprint=str(sam.fingerprint),
                    encoder=dataclasses.asdict(bank.route))
    app = build_api(core, LocalModel(bank, runner, batcher), bank, images, hosts,
                    pinned=attached(sam),  # the bank serves these besides the folder's files
                    max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_json_bytes=max_json_bytes,
                    request_timeout=runner.timeout, max_queue=runner.max_queue, auto_budget=auto_budget,
                    body_timeout=body_timeout, version=package_version())
    app.state.bank, app.state.images, app.state.runner = bank, images, runner
    app.state.batcher = batcher
    return app


# ----------------------------------------------------------------------------- running it
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


def serve_settings(args, host: str) -> Dict[str, Any]:
    """The `samadapt serve` flags both engines take, checked: the keyword arguments of `create_app`
    (and `ray_app.build_app`) apart from the core and the adapters.

    Args:
        args: the parsed CLI arguments.
        host: the address the server binds (its names are always allowed in Host).

    Returns:
        `capacity`, `allowed_hosts`, `request_timeout`, `max_queue`, `auto_budget`, `body_timeout`,
        `allow_base_mismatch`, `max_batch`, `max_wait_ms`, `precision` (resolved: `$SAMADAPT_PRECISION`
        read here, so every model replica gets the same choice).

    Raises:
        UserError: a flag out of range.

    Example:
        >>> import argparse
        >>> serve_settings(argparse.Namespace(max_queue=3), "127.0.0.1")["max_queue"]
        3
    """
    from samadapt.sam_core.fast import resolve_precision

    from ..errors import UserError

    request_timeout = _positive("--request-timeout", getattr(args, "request_timeout", 60.0), "60")
    body_timeout = _positive("--body-timeout", getattr(args, "body_timeout", 30.0), "30")
    max_queue = _positive("--max-queue", getattr(args, "max_queue", 8), "8", allow_zero=True)
    auto_budget = _positive("--auto-budget", getattr(args, "auto_budget", AUTO_BUDGET), str(AUTO_BUDGET))
    if max_queue != int(max_queue) or auto_budget != int(auto_budget):
        raise UserError("--max-queue and --auto-budget take whole numbers")
    max_batch = getattr(args, "max_batch", None)
    if max_batch is not None:  # None: the core's own (sam_core.fast.encoder_batch)
        max_batch = _positive("--max-batch", max_batch, "8")
        if max_batch != int(max_batch):
            raise UserError(f"--max-batch {args.max_batch} must be a whole number, such as 8 "
                            f"(1: no batching)")
        max_batch = int(max_batch)
    max_wait_ms = _positive("--max-wait-ms", getattr(args, "max_wait_ms", 5.0), "5", allow_zero=True)
    try:
        hosts = allowed_hosts_for(host, getattr(args, "allowed_host", None) or ())
        precision = resolve_precision(getattr(args, "precision", None))
    except ValueError as e:
        raise UserError(str(e)) from None
    return dict(capacity=getattr(args, "capacity", 8) or 8, allowed_hosts=hosts, request_timeout=request_timeout,
                max_queue=int(max_queue), auto_budget=int(auto_budget), body_timeout=body_timeout,
                allow_base_mismatch=bool(getattr(args, "allow_base_mismatch", False)), max_batch=max_batch,
                max_wait_ms=max_wait_ms, precision=precision)


def adapters_arg(value: Any):
    """`--adapters` as (folder, None) or (None, catalogue file).

    Raises:
        UserError: it is neither a folder nor a .yaml/.json catalogue.

    Example:
        >>> import tempfile
        >>> adapters_arg(tempfile.mkdtemp())[1] is None
        True
    """
    from ..errors import UserError

    directory, catalogue = split_adapters_arg(value)
    if directory is None and catalogue is None:
        raise UserError(f"adapter folder {value} does not exist; create it or pass another --adapters "
                        f"(a folder, or a .yaml/.json catalogue)")
    return directory, catalogue


def run_server(args) -> int:
    """The `samadapt serve` command: load the core, bind (127.0.0.1 unless `--host`), print the URL, serve.

    Args:
        args: the parsed CLI arguments (`adapters`, `base`, `capacity`, `host`, `port`, `allowed_host`,
            `request_timeout`, `max_queue`, `auto_budget`, `header_timeout`, `body_timeout`, `log_level`,
            `engine`, `replicas`, `address`, `max_batch`, `max_wait_ms`, `precision`, `allow_base_mismatch`).

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
    header_timeout = _positive("--header-timeout", getattr(args, "header_timeout", 10.0), "10")
    settings = serve_settings(args, host)
    directory, catalogue = adapters_arg(args.adapters)
    if getattr(args, "engine", "single") == "ray":  # the same API on Ray Serve, N model replicas
        from .ray_app import run_ray_server

        return run_ray_server(args, host, port, directory, catalogue, settings)
    sam = load_base(getattr(args, "base", None))
    app = create_app(sam, directory, catalogue=catalogue, **settings)
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server running there? "
                        f"pass another --port") from None
    url = url_of(sock)
    n = len(app.state.catalogue())
    print(f"samadapt serve: {url}  (core {sam.arch}@{sam.image_size}, {n} adapter(s) in {directory or catalogue}; "
          f"API docs at {url}docs; Ctrl+C stops)", flush=True)
    batcher = app.state.batcher
    if batcher is not None:
        batching = f"requests needing an embedding batched up to {batcher.max_batch}"
    elif settings.get("max_batch"):
        batching = "each request encoded alone (--max-batch 1)"
    else:
        batching = ("each request encoded alone (on a CPU from 512 px a batch costs more per image; "
                    "--max-batch N batches)")
    print(f"samadapt serve: encoder {app.state.bank.route.describe()}; {batching}", flush=True)
    if host not in LOOPBACK:
        print(f"warning: listening on {host}, not only this machine: anyone who can reach it can use the server; "
              f"it answers to Host {', '.join(sorted(settings['allowed_hosts']))} (add names with --allowed-host)",
              flush=True)
    server = uvicorn_server(app, log_level=getattr(args, "log_level", "info"), header_timeout=header_timeout)
    server.run(sockets=[sock])
    app.state.runner.cancel_all("shutdown", close=True)
    return 0
