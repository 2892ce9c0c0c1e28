"""`samadapt serve --engine ray`: the same HTTP API on Ray Serve, for a service that outgrows one process.

Two deployments (`build_app`):

- `SamadaptIngress` (one replica): the HTTP API -- `GET /api/health`, `GET /api/adapters`,
  `POST /api/images`, `POST /api/segment` -- with the single-process server's request models,
  checks and answers (`api`). It keeps the uploaded images, so an image id works whichever model
  replica answers.
- `SamadaptModel` (`--replicas N`): the frozen core and an `AdapterBank` per replica. Adapters are
  Ray Serve multiplexed models (`@serve.multiplexed(max_num_models_per_replica=capacity)`): each
  request carries its adapter name as the multiplexed model id (the id Ray's HTTP proxy reads from
  the `serve_multiplexed_model_id` header), so Ray routes it to a replica that already holds that
  adapter, each replica keeps its hot adapters, and image embeddings are cached per replica (the
  bank's per-(image, adapter) cache). A replica holds at most `capacity` adapters: Ray's LRU and
  the bank's both stop there.

A model replica that dies mid-request gives that request 503 with `Retry-After: 1`; Ray Serve starts
a replacement, and the client's retry is answered by a live replica. Ray is an optional extra:
`pip install "samadapt[serve-ray]"`.

Also an importable application for Ray's own CLI:

    serve run samadapt.recipes.serve.ray_app:app_builder adapters=my_adapters/ replicas=2

Example:
    >>> from samadapt.recipes.serve.ray_app import ray_available
    >>> isinstance(ray_available(), bool)
    True
"""
import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .api import (
    AdapterList,
    ApiError,
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


def ray_available() -> bool:
    """Whether Ray Serve is installed (`pip install "samadapt[serve-ray]"`)."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return False
    return True


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _entry(path: Path, fingerprint: str) -> Any:
    """One adapter file's `AdapterInfo` (its error in it when it cannot be read or used)."""
    from samadapt.adapters import AdapterError
    from samadapt.adapters import inspect as inspect_adapter

    try:
        meta = inspect_adapter(path)
    except AdapterError as e:
        meta = {"error": _first_line(e)}
    except Exception as e:  # noqa: BLE001 -- one odd file is listed with its error
        meta = {"error": f"{type(e).__name__}: {_first_line(e)}"}
    return adapter_info(path.stem, meta, fingerprint)


def _listing(folder: Path, fingerprint: str) -> Dict[str, Any]:
    """The adapter files in the folder now, as name -> `AdapterInfo` (read without a model)."""
    from samadapt.adapters import is_valid_name

    return {p.stem: _entry(p, fingerprint) for p in sorted(folder.glob("*.safetensors")) if is_valid_name(p.stem)}


def build_app(adapters_dir: Union[str, os.PathLike], base: Optional[str] = None, replicas: int = 2,
              capacity: int = 8, threads: int = 1, request_timeout: float = 60.0, image_cache: int = 16,
              max_upload_bytes: int = 25 * 2**20, max_pixels: Optional[int] = None,
              replica_cpus: float = 1.0):
    """The Ray Serve application: the HTTP ingress bound to `replicas` model replicas.

    Args:
        adapters_dir: folder of `<name>.safetensors` files, readable by every replica.
        base: SAM checkpoint (None: the pretrained tiny core).
        replicas: model replicas.
        capacity: adapters each replica keeps resident (Ray's `max_num_models_per_replica`).
        threads: torch threads per replica.
        request_timeout: seconds a segment request may take (504 after).
        image_cache: uploaded images the ingress keeps.
        max_upload_bytes: largest accepted image file.
        max_pixels: largest accepted width x height (default: the single-process server's).
        replica_cpus: CPUs Ray reserves per model replica.

    Returns:
        a `ray.serve.Application` for `serve.run`.

    Raises:
        ValueError: `replicas` or `capacity` below 1, or the folder is missing.

    Example:
        >>> # serve.run(build_app("my_adapters/", replicas=2), route_prefix="/")
    """
    from fastapi import FastAPI, File, UploadFile
    from fastapi.responses import Response
    from ray import serve

    from samadapt.recipes.limits import MAX_PIXELS

    if int(replicas) < 1 or int(capacity) < 1:
        raise ValueError(f"replicas={replicas!r} and capacity={capacity!r} must be at least 1")
    folder = Path(adapters_dir).resolve()
    if not folder.is_dir():
        raise ValueError(f"adapter folder {folder} does not exist; create it or pass another")
    max_pixels = int(max_pixels or MAX_PIXELS)

    @serve.deployment(ray_actor_options={"num_cpus": replica_cpus}, max_ongoing_requests=16)
    class SamadaptModel:
        """One model replica: the frozen core, an `AdapterBank`, and its counters."""

        def __init__(self) -> None:
            import torch

            from samadapt.adapters import AdapterBank
            from samadapt.recipes.model import load_base

            torch.set_num_threads(int(threads))
            self.sam = load_base(base)
            self.bank = AdapterBank(self.sam, folder, capacity=int(capacity), cache_size=max(32, 4 * image_cache))
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.pid = os.getpid()
            self.counts = {"encoder_blocks": 0, "decoder_batches": 0, "completed": 0}
            for block in self.sam.image_encoder.blocks:
                block.register_forward_pre_hook(lambda m, a: self._count("encoder_blocks"))
            self.sam.prompt_encoder.register_forward_pre_hook(lambda m, a: self._count("decoder_batches"))

        def _count(self, what: str) -> None:
            self.counts[what] += 1

        def info(self) -> Dict[str, Any]:
            return {"arch": str(self.sam.arch), "image_size": int(self.sam.image_size),
                    "fingerprint": str(self.sam.fingerprint), "replica": self.replica, "pid": self.pid,
                    "resident": self.bank.resident(), "capacity": int(capacity),
                    "encoder": dataclasses.asdict(self.bank.route)}  # the replica's encoder route

        @serve.multiplexed(max_num_models_per_replica=int(capacity))
        async def adapter(self, name: str) -> "_Resident":
            await asyncio.to_thread(self.bank.preload, name)
            return _Resident(self.bank, name)

        async def segment(self, image: np.ndarray, image_id: str, name: Optional[str],
                          prompts: Dict[str, Any]) -> Dict[str, Any]:
            from samadapt.adapters import AdapterError, AdapterFormatError, IncompatibleAdapterError

            # the bank's calls wait on its lock while another request's model work runs: in threads, so
            # the replica's event loop keeps taking requests
            warm = name is None or await asyncio.to_thread(lambda: name in self.bank.resident())
            try:
                if name is not None:
                    await self.adapter(serve.get_multiplexed_model_id())

                def work():
                    return self.bank.predict(image, adapter=name, image_id=image_id, **prompts), self.bank.resident()

                (masks, scores, _), resident = await asyncio.to_thread(work)
            except (IncompatibleAdapterError, AdapterFormatError) as e:
                return {"error": (409, f"adapter {name!r} cannot be used with this core: {_first_line(e)}")}
            except AdapterError as e:
                return {"error": (404 if "no adapter named" in str(e) else 400, _first_line(e))}
            self.counts["completed"] += 1
            return {"masks": masks, "scores": scores, "replica": self.replica, "pid": self.pid, "warm": warm,
                    "resident": resident, "counts": dict(self.counts)}

    api = FastAPI(title="samadapt serve (Ray Serve)",
                  description="The samadapt serve API on Ray Serve: adapters routed to the model replicas that "
                              "hold them (multiplexed by adapter name).")

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class SamadaptIngress:
        """The HTTP API in front of the model replicas."""

        def __init__(self, model) -> None:
            self.model = model
            self.images = ImageStore(image_cache)
            self.core: Optional[Dict[str, Any]] = None
            self.replicas: Dict[str, Dict[str, Any]] = {}  # replica -> its counters as of its last answer
            self.work = {"running": 0, "completed": 0, "cancelled": 0, "refused": 0}
            self.limits = Limits(max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_json_bytes=2**20,
                                 auto_budget=0, request_timeout_s=float(request_timeout), max_queue=0,
                                 body_timeout_s=None)

        async def _core(self) -> Dict[str, Any]:
            if self.core is None:
                self.core = await self._call(self.model.info.remote())
            return self.core

        async def _call(self, response) -> Any:
            from ray import exceptions as rex

            try:
                return await asyncio.wait_for(response, timeout=float(request_timeout))
            except asyncio.TimeoutError:
                self.work["cancelled"] += 1
                raise ApiError(504, f"the request took longer than the {request_timeout:g} s limit") from None
            except (rex.RayActorError, rex.ActorUnavailableError, rex.RaySystemError) as e:
                # the replica died (or is restarting): nothing was answered, a retry goes to a live one
                self.work["refused"] += 1
                raise ApiError(503, f"a model replica was lost ({type(e).__name__}); retry",
                               headers={"Retry-After": "1"}) from None
            except Exception as e:  # noqa: BLE001 -- Serve's back-pressure and unavailable errors
                if type(e).__module__.startswith("ray."):
                    self.work["refused"] += 1
                    raise ApiError(503, f"no model replica could take the request ({type(e).__name__}); retry",
                                   headers={"Retry-After": "1"}) from None
                raise

        def _check_adapter(self, name: Optional[str], fingerprint: str) -> Optional[str]:
            from samadapt.adapters import is_valid_name

            if name is None:
                return None
            if not is_valid_name(name):
                shown = name if len(name) <= 80 else name[:80] + "..."
                raise ApiError(400, f"adapter name {shown!r} is not valid (letters, digits, _ and -, starting with "
                                    f"a letter); use a name from GET /api/adapters or null for the plain core")
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                names = sorted(_listing(folder, fingerprint))
                raise ApiError(404, f"no adapter named {name!r}; available: {names[:20]}"
                                    f"{' ...' if len(names) > 20 else ''}")
            info = _entry(path, fingerprint)
            if info.error:
                raise ApiError(409, f"adapter {name!r} cannot be used with this core: {info.error}")
            return name

        @api.get("/api/health", response_model=Health)
        async def health(self) -> Health:
            core = await self._core()
            counts = {k: sum(r.get(k, 0) for r in self.replicas.values()) for k in ("encoder_blocks",
                                                                                   "decoder_batches")}
            resident = sorted({n for r in self.replicas.values() for n in r.get("resident", ())})
            return Health(arch=core["arch"], image_size=core["image_size"], fingerprint=core["fingerprint"],
                          adapters=len(_listing(folder, core["fingerprint"])), resident=resident,
                          images=len(self.images), max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                          limits=self.limits, work=WorkState(queued=0, **counts, **self.work),
                          encoder=EncoderRoute(**core["encoder"]))

        @api.get("/api/adapters", response_model=AdapterList)
        async def list_adapters(self) -> AdapterList:
            core = await self._core()
            return AdapterList(core=f"{core['arch']}@{core['image_size']} {core['fingerprint']}",
                               adapters=list(_listing(folder, core["fingerprint"]).values()))

        @api.post("/api/images", response_model=ImageInfo)
        async def upload_image(self, file: UploadFile = File(..., description="the image file")) -> ImageInfo:
            data = await file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise ApiError(413, f"the file is over the upload limit of {max_upload_bytes:,} bytes")
            rgb, mode, fmt = decode_image(data, max_pixels)
            return ImageInfo(image_id=self.images.add(rgb), width=rgb.shape[1], height=rgb.shape[0], mode=mode,
                             format=fmt)

        @api.post("/api/segment", response_model=SegmentResponse)
        async def segment(self, req: SegmentRequest) -> Response:
            t0 = time.perf_counter()
            core = await self._core()
            image = self.images.get(req.image_id)
            name = self._check_adapter(req.adapter, core["fingerprint"])
            h, w = image.shape[:2]
            prompts = check_prompts(req, w, h)
            handle = self.model.options(multiplexed_model_id=name) if name is not None else self.model
            self.work["running"] += 1
            try:
                out = await self._call(handle.segment.remote(image, req.image_id, name, prompts))
            finally:
                self.work["running"] -= 1
            if "error" in out:
                raise ApiError(*out["error"])
            self.replicas[out["replica"]] = dict(out["counts"], resident=out["resident"])
            self.work["completed"] += 1
            masks, scores = out["masks"], out["scores"]
            encoded = [mask_png(m) for m in masks] if req.format == "png" else masks_rle(masks)
            body = SegmentResponse(masks=encoded, scores=[finite(s) for s in scores], best=int(np.argmax(scores)),
                                   width=w, height=h, adapter=name, elapsed_ms=1000 * (time.perf_counter() - t0))
            # which replica answered, whether it already held the adapter, what it holds now
            headers = {"X-Samadapt-Replica": out["replica"], "X-Samadapt-Pid": str(out["pid"]),
                       "X-Samadapt-Warm": "1" if out["warm"] else "0",
                       "X-Samadapt-Resident": ",".join(out["resident"])}
            return Response(body.model_dump_json().encode(), media_type="application/json", headers=headers)

    model = SamadaptModel.options(num_replicas=int(replicas)).bind()
    return SamadaptIngress.bind(model)


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
        args: Ray's `key=value` arguments: `adapters` (required), `base`, `replicas`, `capacity`, `threads`,
            `request_timeout`.

    Returns:
        the application (`build_app`).

    Example:
        >>> app_builder({})
        Traceback (most recent call last):
        ...
        ValueError: app_builder needs adapters=DIR (the folder of adapter files)
    """
    if "adapters" not in args:
        raise ValueError("app_builder needs adapters=DIR (the folder of adapter files)")
    return build_app(args["adapters"], base=args.get("base"), replicas=int(args.get("replicas", 2)),
                     capacity=int(args.get("capacity", 8)), threads=int(args.get("threads", 1)),
                     request_timeout=float(args.get("request_timeout", 60.0)))


def run_ray_server(args: Any, host: str, port: int) -> int:
    """`samadapt serve --engine ray`: start (or join, `--address`) Ray, run the app, serve until Ctrl+C.

    Args:
        args: the parsed CLI arguments (`adapters`, `base`, `replicas`, `address`, `capacity`, `request_timeout`).
        host: address the HTTP proxy binds.
        port: its port.

    Returns:
        0 when stopped.

    Raises:
        UserError: Ray is not installed, or the flags do not fit the Ray engine.
    """
    from ..errors import UserError

    if not ray_available():
        raise UserError('--engine ray needs Ray Serve: pip install "samadapt[serve-ray]"')
    folder = Path(args.adapters)
    if not folder.is_dir():
        raise UserError(f"--engine ray serves a folder of adapter files; {folder} is not one (a catalogue is "
                        f"served by the single-process engine)")
    replicas = getattr(args, "replicas", 2)
    if isinstance(replicas, bool) or not str(replicas).isdigit() or int(replicas) < 1:
        raise UserError(f"--replicas {replicas} must be a whole number of at least 1, such as 2")
    import ray
    from ray import serve

    ray.init(address=getattr(args, "address", None) or None, include_dashboard=False,
             ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build_app(folder, base=getattr(args, "base", None), replicas=int(replicas),
                        capacity=getattr(args, "capacity", 8) or 8,
                        request_timeout=float(getattr(args, "request_timeout", 60.0))),
              name="samadapt", route_prefix="/")
    print(f"samadapt serve (Ray Serve, {int(replicas)} model replica(s)): http://{host}:{port}/  "
          f"(adapters in {folder}; Ctrl+C stops)", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


__all__: List[str] = ["build_app", "app_builder", "run_ray_server", "ray_available"]
