"""`samadapt serve --engine ray` (`recipes/serve/ray_app.py`) on a local Ray instance started here,
on 127.0.0.1, with 2 CPU model replicas of the tiny core holding at most 2 adapters each.

Shown: answers equal the single-process server's for every adapter and the plain core; no replica
ever holds more adapters than its capacity; repeated requests for one adapter land on a replica
that already holds it (once Ray's router has heard that it loaded it, within a second or so);
killing one replica mid-run (SIGKILL to its process) loses no request that the client retries.
Run with `python -m pytest -m ray tests/test_serve_ray.py` (its own CI line).
"""
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

from samadapt.recipes.model import load_base  # noqa: E402
from samadapt.recipes.serve import background_server, create_app  # noqa: E402
from samadapt.recipes.serve.ray_app import build_app  # noqa: E402

NAMES = ("ra_a", "ra_b", "ra_c", "ra_d")
CAPACITY = 2
IMAGES = [scene(80, 100, seed=40 + i) for i in range(3)]
PROMPTS = [{"points": [[40, 35, 1]]}, {"box": [10, 10, 70, 60], "multimask": False}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stable(resp: dict) -> dict:
    return {k: v for k, v in resp.items() if k != "elapsed_ms"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ckpt, folder = make_core_and_adapters(tmp_path_factory.mktemp("ray"), names=NAMES)
    port = free_port()
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(folder, base=str(ckpt), replicas=2, capacity=CAPACITY, threads=1, replica_cpus=1),
                  name="samadapt", route_prefix="/")
        url = f"http://127.0.0.1:{port}/"
        with httpx.Client(base_url=url, timeout=120) as http:
            ids = [upload(http, img) for img in IMAGES]
        yield ckpt, folder, url, ids
    finally:
        serve.shutdown()
        ray.shutdown()


def upload(http, img) -> str:
    r = http.post("api/images", files={"file": ("x.png", png_bytes(img), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()["image_id"]


def bodies(ids):
    return [dict(PROMPTS[p], image_id=ids[i], adapter=a)
            for a in (None, *NAMES) for i in range(len(ids)) for p in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def single_process(env):
    """The same requests answered by the single-process server, one at a time."""
    ckpt, folder, _, _ = env
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replicas run one torch thread each
    try:
        app = create_app(load_base(str(ckpt)), folder, max_batch=1)
        with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            ids = [upload(http, img) for img in IMAGES]
            out = []
            for b in bodies(ids):
                r = http.post("api/segment", json=b)
                assert r.status_code == 200, r.text
                out.append(stable(r.json()))
    finally:
        torch.set_num_threads(threads)
    return ids, out


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
    _, _, url, ids = env
    sp_ids, want = single_process
    assert ids == sp_ids  # content-hash ids: the same images
    seen = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        health = http.get("api/health").json()
        assert health["arch"] == "tiny" and health["adapters"] == len(NAMES)
        assert len(http.get("api/adapters").json()["adapters"]) == len(NAMES)
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


def test_repeated_requests_land_on_a_replica_holding_the_adapter(env):
    _, _, url, ids = env
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
    _, _, url, ids = env
    _, want = single_process
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
