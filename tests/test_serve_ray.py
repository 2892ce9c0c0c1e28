"""`samadapt serve --engine ray` (`recipes/serve/ray_app.py`) on a local Ray instance started here,
on 127.0.0.1, with 2 CPU model replicas of the tiny core holding at most 2 adapters each.

Shown: the Ray engine serves the single-process server's API with its answers and its errors --
segment and `/api/auto` answers (and the `--auto-budget` 422), a catalogue adapter (listing and
answers), the page and the offline docs, the Host allowlist (421), the cross-origin write refusal
(403, nothing stored), the upload limits (413), the limits health reports, and the same OpenAPI
operations; `precision` reaches the replicas (health's `encoder` is their route). No replica ever
holds more adapters than its capacity; repeated requests for one adapter land on a replica that
already holds it (once Ray's router has heard that it loaded it, within a second or so); killing
one replica mid-run (SIGKILL to its process) loses no request that the client retries.
Run with `python -m pytest -m ray tests/test_serve_ray.py` (its own CI line).
"""
import dataclasses
import os
import signal
import socket
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from test_serve import make_core_and_adapters, png_bytes, scene  # noqa: E402

from samadapt import adapters  # noqa: E402
from samadapt.adapters.sources import file_sha256  # noqa: E402
from samadapt.recipes.model import load_base  # noqa: E402
from samadapt.recipes.serve import background_server, create_app  # noqa: E402
from samadapt.recipes.serve.ray_app import build_app  # noqa: E402
from samadapt.sam_core import SamPredictor  # noqa: E402

NAMES = ("ra_a", "ra_b", "ra_c", "ra_d")
CATALOGUED = "cat_x"  # served from a catalogue entry (a file outside the folder, sha256-pinned)
CAPACITY = 2
IMAGES = [scene(80, 100, seed=40 + i) for i in range(3)]
PROMPTS = [{"points": [[40, 35, 1]]}, {"box": [10, 10, 70, 60], "multimask": False}]
# the same non-default flags for both engines; 80 x 100 px x 4^2 points is exactly the auto budget
FLAGS = dict(capacity=CAPACITY, max_upload_bytes=200_000, auto_budget=80 * 100 * 4**2, max_queue=5,
             request_timeout=90.0, body_timeout=20.0, max_batch=1)
AUTO = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stable(resp: dict) -> dict:
    return {k: v for k, v in resp.items() if k != "elapsed_ms"}


def catalogue_for(root, ckpt):
    """A .yaml catalogue naming one adapter file outside the adapter folder, by relative path, pinned."""
    sam = load_base(str(ckpt))
    adapters.attach(sam, adapters.config("lora", r=4), name=CATALOGUED)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in adapters.adapter_parameters(sam, CATALOGUED):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    (root / "elsewhere").mkdir()
    path = root / "elsewhere" / f"{CATALOGUED}.safetensors"
    adapters.save(sam, path, name=CATALOGUED, domain="catalogued")
    cat = root / "catalogue.yaml"
    cat.write_text(f"{CATALOGUED}:\n  source: elsewhere/{CATALOGUED}.safetensors\n  sha256: \"{file_sha256(path)}\"\n")
    return cat


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    ckpt, folder = make_core_and_adapters(root, names=NAMES)
    cat = catalogue_for(root, ckpt)
    port = free_port()
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(folder, catalogue=cat, base=str(ckpt), replicas=2, threads=1, replica_cpus=1, **FLAGS),
                  name="samadapt", route_prefix="/")
        url = f"http://127.0.0.1:{port}/"
        with httpx.Client(base_url=url, timeout=120) as http:
            ids = [upload(http, img) for img in IMAGES]
        yield ckpt, folder, cat, url, ids
    finally:
        serve.shutdown()
        ray.shutdown()


def upload(http, img) -> str:
    r = http.post("api/images", files={"file": ("x.png", png_bytes(img), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()["image_id"]


def bodies(ids):
    return [dict(PROMPTS[p], image_id=ids[i], adapter=a)
            for a in (None, *NAMES, CATALOGUED) for i in range(len(ids)) for p in range(len(PROMPTS))]


def auto_bodies(ids):
    return [dict(AUTO, image_id=ids[0], adapter=a) for a in (None, NAMES[0], CATALOGUED)]


def answer(r) -> tuple:
    """What the engines must agree on: status, body (timing left out; the server's own host:port, which
    differs, as <server>) and Retry-After.
    """
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        body["detail"] = body["detail"].replace(r.request.url.netloc.decode(), "<server>")
    return r.status_code, stable(body) if isinstance(body, dict) else body, r.headers.get("retry-after")


def probes(http, ids) -> dict:
    """The requests both engines are asked, by name, with their answers (`answer`)."""
    big = png_bytes(scene(80, 100)) + b"\0" * FLAGS["max_upload_bytes"]  # over the file limit, under the body's
    huge = b"\0" * (FLAGS["max_upload_bytes"] + 2**20 + 10)  # over the body limit: refused from Content-Length
    health0 = http.get("api/health").json()["images"]
    out = {
        "adapters": answer(http.get("api/adapters")),
        "page": answer(http.get("")),
        "docs": (http.get("docs").status_code, "swagger-ui" in http.get("docs").text),
        "redoc": http.get("redoc").status_code,
        "auto_over_budget": answer(http.post("api/auto", json=dict(AUTO, image_id=ids[0], points_per_side=5))),
        "auto_bad_adapter": answer(http.post("api/auto", json=dict(AUTO, image_id=ids[0], adapter="missing"))),
        "segment_missing_adapter": answer(http.post("api/segment", json={"image_id": ids[0], "adapter": "missing",
                                                                        "points": [[5, 5, 1]]})),
        "segment_bad_name": answer(http.post("api/segment", json={"image_id": ids[0], "adapter": "../x"})),
        "segment_unknown_image": answer(http.post("api/segment", json={"image_id": "nope", "points": [[5, 5, 1]]})),
        "segment_outside": answer(http.post("api/segment", json={"image_id": ids[0], "points": [[500, 5, 1]]})),
        "segment_invalid": answer(http.post("api/segment", json={"image_id": ids[0], "points": "x"})),
        "forged_host": answer(http.get("api/health", headers={"Host": "evil.example"})),
        "cross_origin_upload": answer(http.post("api/images", headers={"Origin": "http://evil.example"},
                                                files={"file": ("x.png", png_bytes(scene(60, 60, seed=7)))})),
        "oversized_file": answer(http.post("api/images", files={"file": ("x.png", big, "image/png")})),
        "oversized_body": answer(http.post("api/images", files={"file": ("x.png", huge, "image/png")})),
        "oversized_json": answer(http.post("api/segment", content=b"{" + b" " * 2**20 + b"}",
                                           headers={"Content-Type": "application/json"})),
    }
    health = http.get("api/health").json()
    out["stored_after_refusals"] = health["images"] - health0  # the refused uploads stored nothing
    upload(http, scene(60, 60, seed=7))  # the cross-origin one, sent same-origin: stored
    out["stored_when_allowed"] = http.get("api/health").json()["images"] - health["images"]
    out["limits"] = {k: health[k] for k in ("limits", "max_upload_bytes", "max_pixels", "arch", "image_size",
                                            "fingerprint", "adapters", "encoder")}
    out["auto"] = [answer(http.post("api/auto", json=b)) for b in auto_bodies(ids)]
    out["openapi"] = http.get("openapi.json").json()
    return out


@pytest.fixture(scope="module")
def single_process(env):
    """The same requests answered by the single-process server, one at a time."""
    ckpt, folder, cat, _, _ = env
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replicas run one torch thread each
    try:
        app = create_app(load_base(str(ckpt)), folder, catalogue=cat, **FLAGS)
        with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            ids = [upload(http, img) for img in IMAGES]
            out = []
            for b in bodies(ids):
                r = http.post("api/segment", json=b)
                assert r.status_code == 200, r.text
                out.append(stable(r.json()))
            seen = probes(http, ids)
    finally:
        torch.set_num_threads(threads)
    return ids, out, seen


def post_retrying(client, body, deadline, retries):
    """POST until answered 200 (retrying 503s and lost connections), as a client of a service does."""
    while True:
        try:
            r = client.post("api/segment", json=body)
            if r.status_code == 200:
                return r
            assert r.status_code == 503, r.text  # only "retry" answers are retried
        except httpx.TransportError:
            pass
        retries.append(body)
        assert time.monotonic() < deadline, "no answer before the deadline"
        time.sleep(0.2)


def test_ray_answers_equal_single_process_and_respect_capacity(env, single_process):
    _, _, _, url, ids = env
    sp_ids, want, _ = single_process
    assert ids == sp_ids  # content-hash ids: the same images
    seen = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        health = http.get("api/health").json()
        assert health["arch"] == "tiny" and health["adapters"] == len(NAMES) + 1  # the folder's and the catalogue's
        assert len(http.get("api/adapters").json()["adapters"]) == len(NAMES) + 1
        for b, w in zip(bodies(ids), want):
            r = http.post("api/segment", json=b)
            assert r.status_code == 200, r.text
            assert stable(r.json()) == w, b
            resident = [n for n in r.headers["x-samadapt-resident"].split(",") if n]
            assert len(resident) <= CAPACITY, resident
            seen.setdefault(r.headers["x-samadapt-replica"], set()).update(resident)
        # errors are the single-process server's
        r = http.post("api/segment", json={"image_id": ids[0], "adapter": "missing", "points": [[5, 5, 1]]})
        assert r.status_code == 404 and "no adapter named 'missing'" in r.json()["detail"]
        assert http.post("api/segment", json={"image_id": "nope", "points": [[5, 5, 1]]}).status_code == 404
    assert len(seen) == 2, seen  # both replicas answered: 4 adapters do not fit one replica's 2 slots


def test_ray_serves_the_same_api_answers_and_errors(env, single_process):
    ckpt, _, _, url, ids = env
    _, _, want = single_process
    with httpx.Client(base_url=url, timeout=120) as http:
        got = probes(http, ids)
    # the preconditions: each probe is the case it is meant to be
    assert all(status == 200 and len(body["masks"]) > 0 for status, body, _ in want["auto"]), want["auto"]
    assert want["auto_over_budget"][0] == 422 and "use points_per_side <= 4" in want["auto_over_budget"][1]["detail"]
    status, listing, _ = want["adapters"]
    entry = {a["name"]: a for a in listing["adapters"]}[CATALOGUED]
    assert status == 200 and entry["source"] == "file" and entry["compatible"] and entry["domain"] == "catalogued"
    assert want["page"][0] == 200 and "<html" in want["page"][1].lower() and want["docs"] == (200, True)
    assert want["forged_host"][0] == 421 and want["cross_origin_upload"][0] == 403
    assert [want[k][0] for k in ("oversized_file", "oversized_body", "oversized_json")] == [413, 413, 413]
    assert want["stored_after_refusals"] == 0 and want["stored_when_allowed"] == 1
    limits = want["limits"]["limits"]
    assert limits["auto_budget"] == FLAGS["auto_budget"] and limits["max_queue"] == 5  # the flags, not defaults
    # the Ray engine gives the same answers and the same errors, probe by probe
    for key in want:
        if key != "openapi":
            assert got[key] == want[key], (key, got[key], want[key])
    # precision auto: health shows the route the replicas took, the one this machine's auto chooses
    assert got["limits"]["encoder"] == dataclasses.asdict(SamPredictor(load_base(str(ckpt))).route)
    print(f"\nray == single process on {len(want) - 1} probes (the OpenAPI operations: next test), e.g. budget: "
          f"{got['auto_over_budget'][1]['detail']}")


def test_openapi_operations_are_the_same(single_process, env):
    _, _, _, url, _ = env
    want = single_process[2]["openapi"]
    with httpx.Client(base_url=url, timeout=60) as http:
        got = http.get("openapi.json").json()

    def operations(schema):
        return {(path, method): op for path, item in schema["paths"].items() for method, op in item.items()}

    assert {("/api/auto", "post"), ("/api/segment", "post"), ("/api/images", "post"), ("/api/health", "get"),
            ("/api/adapters", "get")} <= set(operations(want))
    assert sorted(operations(got)) == sorted(operations(want))
    for key, op in operations(want).items():  # the same parameters, bodies, answers and errors
        assert operations(got)[key] == op, key
    assert got["components"] == want["components"]


def test_precision_reaches_the_replicas(env):
    ckpt, folder, _, url, _ = env
    routes = {p: dataclasses.asdict(SamPredictor(load_base(str(ckpt)), precision=p).route) for p in ("auto", "fp32")}
    assert routes["fp32"]["precision"] == "fp32" and routes["fp32"] != routes["auto"]  # the reason differs at least
    serve.run(build_app(folder, base=str(ckpt), replicas=1, threads=1, replica_cpus=1, precision="fp32"),
              name="fp32", route_prefix="/fp32")
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            encoder = http.get("fp32/api/health").json()["encoder"]
            assert http.get("api/health").json()["encoder"] == routes["auto"]  # the other app is untouched
    finally:
        serve.delete("fp32")
    assert encoder == routes["fp32"], encoder


def test_repeated_requests_land_on_a_replica_holding_the_adapter(env):
    _, _, _, url, ids = env
    with httpx.Client(base_url=url, timeout=120) as http:
        for name in NAMES:
            first = http.post("api/segment", json=dict(image_id=ids[0], adapter=name, points=[[30, 30, 1]]))
            assert first.status_code == 200, first.text
            # a replica tells Ray's router what it loaded through the Serve controller: give it a moment
            time.sleep(1.5)
            warm = []
            for k in range(6):
                r = http.post("api/segment", json=dict(image_id=ids[k % len(ids)], adapter=name,
                                                       points=[[20 + k, 30, 1]]))
                assert r.status_code == 200, r.text
                warm.append(r.headers["x-samadapt-warm"] == "1" and name in r.headers["x-samadapt-resident"])
            assert all(warm), (name, warm)


def test_killing_a_replica_loses_no_retried_request(env, single_process):
    _, _, _, url, ids = env
    _, want, _ = single_process
    todo = list(zip(bodies(ids), want)) * 2
    results, retries, pids, errors = [None] * len(todo), [], [], []
    lock, deadline = threading.Lock(), time.monotonic() + 240
    next_item = iter(range(len(todo)))

    def client():
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    k = next(next_item, None)
                if k is None:
                    return
                try:
                    r = post_retrying(c, todo[k][0], deadline, retries)
                    results[k] = stable(r.json()) == todo[k][1]
                    with lock:
                        pids.append((time.monotonic(), int(r.headers["x-samadapt-pid"])))
                except BaseException as e:  # noqa: BLE001 -- reported below
                    errors.append(repr(e))
                    return

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    while len(pids) < 6:  # mid-run: some answers in, most still to come
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with lock:
        victim = pids[-1][1]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:3]
    assert all(r is True for r in results), [i for i, r in enumerate(results) if r is not True][:5]
    assert all(pid != victim for t, pid in pids if t > killed_at + 0.5)  # the dead process answered nothing more
    assert len(todo) - len([1 for t, _ in pids if t <= killed_at]) > 10  # the kill was mid-run
    print(f"\nray: killed replica pid {victim} mid-run; {len(todo)} requests all answered correctly, "
          f"{len(retries)} retried")
