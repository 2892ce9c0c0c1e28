"""`samadapt serve` under load: a real uvicorn server on 127.0.0.1 (background thread, free port),
8 concurrent clients x 50 /api/segment requests spread over three adapters and the plain core on
the tiny model. Zero errors, and every response equals the same request made alone (a sequential
baseline computed first). Prints p50/p95 latency. Bounded: fixed request counts and a deadline.
"""
import random
import statistics
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_serve import NAMES, make_core_and_adapters, png_bytes, scene  # noqa: E402

from samadapt.recipes.model import load_base  # noqa: E402
from samadapt.recipes.serve import background_server, create_app  # noqa: E402

CLIENTS, REQUESTS = 8, 50
DEADLINE_S = 240.0
ADAPTERS = [None, *NAMES]
IMAGES = [scene(96, 128, seed=11), scene(128, 80, seed=12)]
PROMPTS = [
    {"points": [[40, 40, 1]]},
    {"points": [[20, 30, 1], [60, 50, 0]], "multimask": False},
    {"box": [10, 10, 70, 60]},
    {"points": [[30, 30, 1]], "box": [5, 5, 75, 75], "format": "rle"},
    {},
]


def _stable(resp: dict) -> dict:
    return {k: v for k, v in resp.items() if k != "elapsed_ms"}


def test_concurrent_clients_get_lone_results(tmp_path):
    ckpt, folder = make_core_and_adapters(tmp_path)
    app = create_app(load_base(str(ckpt)), folder)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # the bank runs one model call at a time; one thread leaves a core for HTTP on a 2-core VM
    try:
        with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            ids = []
            for img in IMAGES:
                r = http.post("api/images", files={"file": ("x.png", png_bytes(img), "image/png")})
                assert r.status_code == 200, r.text
                ids.append(r.json()["image_id"])
            keys = [(a, i, p) for a in ADAPTERS for i in range(len(ids)) for p in range(len(PROMPTS))]

            def body(key):
                a, i, p = key
                return dict(PROMPTS[p], image_id=ids[i], adapter=a)

            baseline = {}
            for key in keys:  # alone, one at a time (computes each embedding once)
                r = http.post("api/segment", json=body(key))
                assert r.status_code == 200, (key, r.text)
                baseline[key] = _stable(r.json())

            errors, latencies, lock = [], [], threading.Lock()
            deadline = time.monotonic() + DEADLINE_S

            def worker(t: int) -> None:
                rng = random.Random(1000 + t)
                with httpx.Client(base_url=url, timeout=60) as c:
                    for n in range(REQUESTS):
                        if time.monotonic() > deadline:
                            with lock:
                                errors.append((t, n, "deadline passed"))
                            return
                        key = rng.choice(keys)
                        t0 = time.perf_counter()
                        try:
                            r = c.post("api/segment", json=body(key))
                            dt = time.perf_counter() - t0
                            ok = r.status_code == 200 and _stable(r.json()) == baseline[key]
                            problem = (
                                None
                                if ok
                                else f"{r.status_code} "
                                f"{'differs from the lone result' if r.status_code == 200 else r.text[:200]}"
                            )
                        except Exception as e:  # noqa: BLE001 -- counted as an error below
                            dt, problem = time.perf_counter() - t0, repr(e)
                        with lock:
                            latencies.append(dt)
                            if problem:
                                errors.append((t, n, key, problem))

            threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(CLIENTS)]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=max(1.0, deadline - time.monotonic() + 30))
            wall = time.perf_counter() - t0
            assert not any(th.is_alive() for th in threads), "clients did not finish"
            health = http.get("api/health").json()
    finally:
        torch.set_num_threads(threads_before)

    assert not errors, errors[:5]
    assert len(latencies) == CLIENTS * REQUESTS
    assert sorted(health["resident"]) == sorted(NAMES)
    q = statistics.quantiles(latencies, n=100)
    print(f"\nserve load: {CLIENTS} clients x {REQUESTS} requests, {len(ADAPTERS) - 1} adapters + core: "
          f"p50 {1000 * statistics.median(latencies):.1f} ms, p95 {1000 * q[94]:.1f} ms, "
          f"{len(latencies) / wall:.1f} req/s, 0 errors")
