"""`samadapt serve --engine ray`: the same HTTP API on Ray Serve, for a service that outgrows one process.

Two deployments (`build_app`):

- `SamadaptIngress` (one replica): the single-process server's app itself -- `routes.build_api`,
  the same routes, checks, limits, guard, page and docs -- over a model side that sends the model
  work to the model replicas instead of running it in-process. It keeps the uploaded images (so
  an image id works whichever model replica answers) and lists the adapters (folder and/or
  catalogue) without a model.
- `SamadaptModel` (`--replicas N`): the frozen core and an `AdapterBank` per replica, run through
  the single-process server's `routes.LocalModel` (a `ModelRunner`: one model call at a time per
  replica, `--max-queue` waiting, `--request-timeout`, cancellation; and the `--max-batch` batcher).
  Adapters are Ray Serve multiplexed models (`@serve.multiplexed(max_num_models_per_replica=capacity)`):
  each request carries its adapter name as the multiplexed model id, so Ray routes it to a replica
  that already holds that adapter, each replica keeps its hot adapters, and image embeddings are
  cached per replica (the bank's per-(image, adapter) cache). A replica holds at most `capacity`
  adapters: Ray's LRU and the bank's both stop there.

Answers and errors are the single-process server's (the same code makes them); segment and auto
answers add `X-Samadapt-Replica`, `X-Samadapt-Pid`, `X-Samadapt-Warm` (the replica already held the
adapter) and `X-Samadapt-Resident`. A model replica that dies mid-request gives that request 503
with `Retry-After: 1`; Ray Serve starts a replacement, and the client's retry is answered by a live
replica. The request-head timeout (`--header-timeout`) is the single-process server's only: here
Ray's HTTP proxy owns the socket. Ray is an optional extra: `pip install "samadapt[serve-ray]"`.

Also an importable application for Ray's own CLI:

    serve run samadapt.recipes.serve.ray_app:app_builder adapters=my_adapters/ replicas=2

Example:
    >>> from samadapt.recipes.serve.ray_app import ray_available
    >>> isinstance(ray_available(), bool)
    True
"""
import asyncio
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from .api import ApiError, ImageStore
from .routes import (
    AUTO_BUDGET,
    CoreInfo,
    FileListing,
    build_api,
    check_limits,
    package_version,
    resolve_catalogue,
    split_adapters_arg,
)

WHAT = {"segment": "the segment request", "auto": "the automatic-mask request"}


def ray_available() -> bool:
    """Whether Ray Serve is installed (`pip install "samadapt[serve-ray]"`)."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return False
    return True


def build_app(adapters_dir: Optional[Union[str, os.PathLike]] = None, base: Optional[str] = None, replicas: int = 2,
              capacity: int = 8, threads: int = 1, request_timeout: float = 60.0, image_cache: int = 16,
              max_upload_bytes: int = 25 * 2**20, max_pixels: Optional[int] = None, replica_cpus: float = 1.0,
              catalogue: Optional[Union[str, os.PathLike, dict]] = None, max_json_bytes: int = 2**20,
              allowed_hosts: Optional[Iterable[str]] = None, max_queue: int = 8, auto_budget: int = AUTO_BUDGET,
              body_timeout: Optional[float] = 30.0, allow_base_mismatch: bool = False, max_batch: Optional[int] = None,
              max_wait_ms: float = 5.0, precision: Optional[str] = None):
    """The Ray Serve application: the HTTP ingress bound to `replicas` model replicas.

    Takes `create_app`'s settings (same names, same defaults) besides the Ray ones.

    Args:
        adapters_dir: folder of `<name>.safetensors` files readable by every replica, or a .yaml/.json
            catalogue (as `--adapters` takes), or None with `catalogue`.
        base: SAM checkpoint (None: the pretrained tiny core).
        replicas: model replicas.
        capacity: adapters each replica keeps resident (Ray's `max_num_models_per_replica`).
        threads: torch threads per replica.
        request_timeout: seconds a model request may take, waiting for its turn included (504/503 after).
        image_cache: uploaded images the ingress keeps.
        max_upload_bytes: largest accepted image file (413 above).
        max_pixels: largest accepted width x height (default: the single-process server's).
        replica_cpus: CPUs Ray reserves per model replica.
        catalogue: a catalogue file or mapping (adapter name -> path, URL or hf:// source [+ sha256]),
            served besides (or instead of) the folder; resolved here, so a bad entry fails at start.
        max_json_bytes: largest JSON request body.
        allowed_hosts: the `Host` names answered (421 for any other); default the loopback names.
        max_queue: model requests that may wait on each replica while one runs there (503 beyond).
        auto_budget: most pixel-points one /api/auto may ask for (422 above).
        body_timeout: seconds a request body may take to arrive (408 after; None: no limit).
        allow_base_mismatch: serve adapters made for other base weights too.
        max_batch: requests embedded together in one encoder pass on a replica (1: each alone; None:
            the replica's core decides, `sam_core.fast.encoder_batch`).
        max_wait_ms: longest a request needing an embedding waits there for others.
        precision: the replicas' image-encoder precision on a CPU: `auto`, `bf16` or `fp32` (None:
            `$SAMADAPT_PRECISION` as read here, else `auto`); `/api/health` shows their route.

    Returns:
        a `ray.serve.Application` for `serve.run`.

    Raises:
        ValueError: `replicas` or `capacity` below 1, a limit out of range, a bad precision, or no
            folder or catalogue.
        SourceError: a catalogue entry cannot be read or fetched (HashMismatchError: a pin differs).

    Example:
        >>> # serve.run(build_app("my_adapters/", replicas=2), route_prefix="/")
    """
    from ray import serve

    from samadapt.adapters.sources import resolve
    from samadapt.recipes.limits import MAX_PIXELS
    from samadapt.sam_core.fast import resolve_precision

    from .guard import allowed_hosts_for

    if int(replicas) < 1 or int(capacity) < 1:
        raise ValueError(f"replicas={replicas!r} and capacity={capacity!r} must be at least 1")
    check_limits(request_timeout, max_queue, auto_budget, body_timeout)
    folder: Optional[Path] = None
    if adapters_dir is not None:
        folder, listed = split_adapters_arg(adapters_dir)
        if folder is None and listed is None:
            raise ValueError(f"adapter folder {adapters_dir} does not exist; create it or pass another")
        if listed is not None:
            if catalogue is not None:
                raise ValueError(f"{adapters_dir} is a catalogue, and catalogue= names another; pass one")
            catalogue = listed
        folder = folder.resolve() if folder is not None else None
    if folder is None and catalogue is None:
        raise ValueError("build_app needs a folder of adapter files or a catalogue")
    entries = resolve_catalogue(catalogue)  # local paths made absolute: the replicas' working folder is not ours
    sources = {name: resolve(src, sha256=pin) for name, (src, pin) in entries.items()}  # fetched, pins checked
    bank_catalogue = {name: ({"source": src, "sha256": pin} if pin else src)
                      for name, (src, pin) in entries.items()} or None
    precision = resolve_precision(precision)  # one choice for every replica, wherever it runs
    if base is not None and Path(base).exists():
        base = str(Path(base).resolve())
    max_pixels = int(max_pixels or MAX_PIXELS)
    hosts = set(allowed_hosts) if allowed_hosts is not None else allowed_hosts_for(None)
    settings = dict(max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_json_bytes=max_json_bytes,
                    request_timeout=float(request_timeout), max_queue=int(max_queue), auto_budget=int(auto_budget),
                    body_timeout=body_timeout)

    # requests beyond the replica's own queue reach its ModelRunner, which answers 503 as one process does
    @serve.deployment(ray_actor_options={"num_cpus": replica_cpus}, max_ongoing_requests=int(max_queue) + 8)
    class SamadaptModel:
        """One model replica: the frozen core and an `AdapterBank`, run as the single-process server runs them."""

        def __init__(self) -> None:
            import torch

            from samadapt.adapters import AdapterBank
            from samadapt.recipes.model import load_base
            from samadapt.sam_core.fast import encoder_batch

            from .batching import EmbedBatcher
            from .routes import LocalModel
            from .work import ModelRunner

            torch.set_num_threads(int(threads))
            self.sam = load_base(base)
            self.bank = AdapterBank(self.sam, folder, capacity=int(capacity), cache_size=max(32, 4 * image_cache),
                                    catalogue=bank_catalogue, allow_base_mismatch=allow_base_mismatch,
                                    precision=precision)
            runner = ModelRunner(self.sam, timeout=float(request_timeout), max_queue=int(max_queue))
            batch = encoder_batch(self.sam) if max_batch is None else int(max_batch)
            batcher = (EmbedBatcher(self.bank.predict_batch, lambda item: self.bank.predict(**item),
                                    max_batch=batch, max_wait_s=max_wait_ms / 1000.0,
                                    max_adapters=int(capacity)) if batch > 1 else None)
            self.local = LocalModel(self.bank, runner, batcher)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.pid = os.getpid()

        def info(self) -> Dict[str, Any]:
            import dataclasses

            return {"arch": str(self.sam.arch), "image_size": int(self.sam.image_size),
                    "fingerprint": str(self.sam.fingerprint), "replica": self.replica, "pid": self.pid,
                    "encoder": dataclasses.asdict(self.bank.route)}  # the route this replica took

        @serve.multiplexed(max_num_models_per_replica=int(capacity))
        async def adapter(self, name: str) -> "_Resident":
            await asyncio.to_thread(self.bank.preload, name)
            return _Resident(self.bank, name)

        async def run(self, kind: str, item: Dict[str, Any]) -> Dict[str, Any]:
            """`LocalModel.segment` / `.auto` for one checked request; an `ApiError` comes back as data."""
            from .routes import model_errors

            name = item["adapter"]
            # the bank's calls wait on its lock while another request's model work runs: in threads, so
            # the replica's event loop keeps taking requests
            warm = name is None or await asyncio.to_thread(lambda: name in self.bank.resident())
            try:
                if name is not None:
                    with model_errors(name, item["image"], int(self.sam.image_size), self.bank.resident):
                        await self.adapter(serve.get_multiplexed_model_id())
                result = await getattr(self.local, kind)(item, None, lambda answer: answer)
            except ApiError as e:
                return {"error": (e.status_code, e.detail, dict(e.headers or {}))}
            except Exception as e:  # noqa: BLE001 -- ours, not the request's: the ingress answers 500 as one process does
                return {"error": (500, f"internal error ({type(e).__name__}: {e})", {})}
            return {"result": result, "replica": self.replica, "pid": self.pid, "warm": warm,
                    "resident": self.local.resident(), "state": self.local.state()}

    # the ingress only waits on the replicas: many requests at once, so health never queues behind model work
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress()
    class SamadaptIngress:
        """The single-process server's app in front of the model replicas."""

        def __init__(self, model) -> None:
            self.model = model

        async def __serve_build_asgi_app__(self):
            info = await self.model.info.remote()  # the core the replicas serve (waits for the first one up)
            core = CoreInfo(arch=info["arch"], image_size=info["image_size"], fingerprint=info["fingerprint"],
                            encoder=info["encoder"])
            side = _ReplicaModel(self.model, float(request_timeout), int(replicas))
            return build_api(core, side, FileListing(folder, sources), ImageStore(image_cache), hosts,
                             version=package_version(), **settings)

    model = SamadaptModel.options(num_replicas=int(replicas)).bind()
    return SamadaptIngress.bind(model)


class _ReplicaModel:
    """The ingress's model side (`routes`): each request goes to a model replica through the Ray handle,
    with its adapter name as the multiplexed model id; the replica answers with the bank's result (or
    the request's `ApiError`), and the response is made here.

    `state()` counts as of each replica's last answer, plus the requests lost here; `running` and
    `queued` are the requests in flight now (at most one runs per replica).
    """

    def __init__(self, handle: Any, timeout: float, replicas: int) -> None:
        self.handle, self.timeout, self.replicas = handle, timeout, replicas
        self.seen: Dict[str, Dict[str, Any]] = {}  # replica -> its state and resident adapters, last answer
        self.in_flight = 0
        self.lost = {"cancelled": 0, "refused": 0}

    def state(self) -> Dict[str, int]:
        keys = ("decoder_batches", "encoder_blocks", "completed", "cancelled", "refused")
        out = {k: sum(int(r["state"].get(k, 0)) for r in self.seen.values()) + self.lost.get(k, 0) for k in keys}
        running = min(self.in_flight, self.replicas)
        return dict(out, running=running, queued=self.in_flight - running)

    def resident(self) -> List[str]:
        return sorted({n for r in self.seen.values() for n in r["resident"]})

    async def segment(self, item: Dict[str, Any], receive: Optional[Callable], finish: Callable[[Any], Any]) -> Any:
        return await self._run("segment", item, finish)

    async def auto(self, item: Dict[str, Any], receive: Optional[Callable], finish: Callable[[Any], Any]) -> Any:
        return await self._run("auto", item, finish)

    async def _run(self, kind: str, item: Dict[str, Any], finish: Callable[[Any], Any]) -> Any:
        name = item["adapter"]
        handle = self.handle.options(multiplexed_model_id=name) if name is not None else self.handle
        self.in_flight += 1
        try:
            out = await self._call(handle.run.remote(kind, item), WHAT[kind])
        finally:
            self.in_flight -= 1
        if "error" in out:
            raise ApiError(*out["error"])
        self.seen[out["replica"]] = {"state": out["state"], "resident": out["resident"]}
        response = await asyncio.to_thread(finish, out["result"])  # a large answer never stalls the event loop
        # which replica answered, whether it already held the adapter, what it holds now
        response.headers.update({"X-Samadapt-Replica": out["replica"], "X-Samadapt-Pid": str(out["pid"]),
                                 "X-Samadapt-Warm": "1" if out["warm"] else "0",
                                 "X-Samadapt-Resident": ",".join(out["resident"])})
        return response

    async def _call(self, response: Any, what: str) -> Any:
        from ray import exceptions as rex

        try:
            # the replica's ModelRunner keeps the time limit; this is the backstop for a replica that never answers
            return await asyncio.wait_for(response, timeout=self.timeout + 10.0)
        except asyncio.TimeoutError:
            response.cancel()
            self.lost["cancelled"] += 1
            raise ApiError(504, f"{what} took longer than the {self.timeout:g} s limit (--request-timeout) and was "
                                f"stopped; ask for less work (a smaller image, fewer points_per_side) or raise the "
                                f"limit") from None
        except (rex.RayActorError, rex.ActorUnavailableError, rex.RaySystemError) as e:
            # the replica died (or is restarting): nothing was answered, a retry goes to a live one
            self.lost["refused"] += 1
            raise ApiError(503, f"a model replica was lost ({type(e).__name__}); retry",
                           headers={"Retry-After": "1"}) from None
        except Exception as e:  # noqa: BLE001 -- Serve's back-pressure and unavailable errors
            if type(e).__module__.startswith("ray."):
                self.lost["refused"] += 1
                raise ApiError(503, f"no model replica could take the request ({type(e).__name__}); retry",
                               headers={"Retry-After": "1"}) from None
            raise


class _Resident:
    """An adapter held by a replica for Ray's multiplexing; when Ray evicts it (its LRU is over
    `max_num_models_per_replica`) the bank unloads it too.
    """

    def __init__(self, bank: Any, name: str) -> None:
        self.bank, self.name, self.gone = bank, name, False

    def __del__(self) -> None:
        if not self.gone:
            self.gone = True
            try:
                self.bank.evict(self.name)
            except Exception:  # noqa: BLE001 -- at interpreter exit the bank may be half torn down
                pass


def app_builder(args: Dict[str, str]):
    """`serve run samadapt.recipes.serve.ray_app:app_builder adapters=DIR [base=CKPT] [replicas=2] [capacity=8]`.

    Args:
        args: Ray's `key=value` arguments: `adapters` (required: a folder or a .yaml/.json catalogue),
            `base`, `replicas`, `capacity`, `threads`, `request_timeout`, `max_queue`, `auto_budget`,
            `precision`.

    Returns:
        the application (`build_app`).

    Example:
        >>> app_builder({})
        Traceback (most recent call last):
        ...
        ValueError: app_builder needs adapters=DIR (the folder of adapter files, or a catalogue)
    """
    if "adapters" not in args:
        raise ValueError("app_builder needs adapters=DIR (the folder of adapter files, or a catalogue)")
    return build_app(args["adapters"], base=args.get("base"), replicas=int(args.get("replicas", 2)),
                     capacity=int(args.get("capacity", 8)), threads=int(args.get("threads", 1)),
                     request_timeout=float(args.get("request_timeout", 60.0)),
                     max_queue=int(args.get("max_queue", 8)), auto_budget=int(args.get("auto_budget", AUTO_BUDGET)),
                     precision=args.get("precision"))


def run_ray_server(args: Any, host: str, port: int, directory: Optional[Path], catalogue: Optional[Path],
                   settings: Dict[str, Any]) -> int:
    """`samadapt serve --engine ray`: start (or join, `--address`) Ray, run the app, serve until Ctrl+C.

    Args:
        args: the parsed CLI arguments (`base`, `replicas`, `address`).
        host: address the HTTP proxy binds.
        port: its port.
        directory: the adapter folder (or None).
        catalogue: the adapter catalogue file (or None).
        settings: the checked flags both engines take (`app.serve_settings`).

    Returns:
        0 when stopped.

    Raises:
        UserError: Ray is not installed, or the flags do not fit the Ray engine.
    """
    from ..errors import UserError

    if not ray_available():
        raise UserError('--engine ray needs Ray Serve: pip install "samadapt[serve-ray]"')
    replicas = getattr(args, "replicas", 2)
    if isinstance(replicas, bool) or not str(replicas).isdigit() or int(replicas) < 1:
        raise UserError(f"--replicas {replicas} must be a whole number of at least 1, such as 2")
    try:
        application = build_app(directory, catalogue=catalogue, base=getattr(args, "base", None),
                                replicas=int(replicas), **settings)
    except ValueError as e:
        raise UserError(str(e)) from None
    import ray
    from ray import serve

    ray.init(address=getattr(args, "address", None) or None, include_dashboard=False,
             ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(application, name="samadapt", route_prefix="/")
    print(f"samadapt serve (Ray Serve, {int(replicas)} model replica(s)): http://{host}:{port}/  "
          f"(adapters in {directory or catalogue}; API docs at http://{host}:{port}/docs; Ctrl+C stops)", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


__all__: List[str] = ["build_app", "app_builder", "run_ray_server", "ray_available"]
