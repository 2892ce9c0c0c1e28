"""Dynamic batching in `samadapt serve` (`recipes/serve/batching.py`), on real uvicorn servers on
127.0.0.1 driven by httpx clients in threads.

Shown: 16 concurrent clients over 4 adapters and the plain core, each with its own image, get the
answers the unbatched server (`max_batch=1`) gives, while the batched server ran fewer encoder
passes (batches of more than one request); a request on a cached embedding is answered at once,
while one that needs an embedding waits up to `--max-wait-ms` for company; the bounded queue still
answers 503 with Retry-After, and a request past its time limit 504/503 -- never holding the
others back.
"""
import threading
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_serve import decode_masks, make_core_and_adapters, png_bytes, scene  # noqa: E402

from samadapt.recipes.model import load_base  # noqa: E402
from samadapt.recipes.serve import background_server, create_app  # noqa: E402

NAMES = ("ad_a", "ad_b", "ad_c", "ad_d")
CLIENTS = 16


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_core_and_adapters(tmp_path_factory.mktemp("batching"), names=NAMES)


def upload_all(http, images):
    ids = []
    for img in images:
        r = http.post("api/images", files={"file": ("x.png", png_bytes(img), "image/png")})
        assert r.status_code == 200, r.text
        ids.append(r.json()["image_id"])
    return ids


def concurrent(url, bodies):
    """POST every body at once from its own thread; returns the responses (status, json) in order."""
    out = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def one(i):
        with httpx.Client(base_url=url, timeout=120) as c:
            start.wait()
            r = c.post("api/segment", json=bodies[i])
            out[i] = (r.status_code, r.json(), dict(r.headers))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(o is not None for o in out), "clients did not finish"
    return out


def serve_16(env, max_batch):
    ckpt, folder = env
    app = create_app(load_base(str(ckpt)), folder, max_batch=max_batch, max_wait_ms=200, max_queue=CLIENTS)
    images = [scene(80 + 4 * i, 100, seed=100 + i) for i in range(CLIENTS)]
    adapters_ = [None, *NAMES]
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        ids = upload_all(http, images)
        bodies = [dict(image_id=ids[i], adapter=adapters_[i % len(adapters_)], box=[10, 10, 70, 60],
                       points=[[40, 35, 1]]) for i in range(CLIENTS)]
        got = concurrent(url, bodies)
        work = http.get("api/health").json()["work"]
    return got, work, app.state.batcher


def test_batched_answers_equal_unbatched_and_share_encoder_passes(env):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leave a core for the HTTP side on a 2-core machine
    try:
        plain, plain_work, none = serve_16(env, max_batch=1)
        batched, batched_work, batcher = serve_16(env, max_batch=8)
    finally:
        torch.set_num_threads(threads)
    assert none is None  # max_batch=1: no batcher
    assert all(s == 200 for s, _, _ in plain + batched), [b for s, b, _ in plain + batched if s != 200][:3]
    for (_, want, _), (_, got, _) in zip(plain, batched):
        assert got["adapter"] == want["adapter"] and got["best"] == want["best"]
        assert np.abs(np.array(got["scores"]) - np.array(want["scores"])).max() <= 1e-4
        gm, wm = decode_masks(got), decode_masks(want)
        assert gm.shape == wm.shape and (gm == wm).mean() >= 0.999
    # the answers differ between adapters (so equality above is not about one model's output)
    assert len({tuple(np.round(b["scores"], 4)) for _, b, _ in plain[:5]}) == 5
    # 16 distinct (image, adapter) embeddings: alone each is one encoder pass of 4 blocks
    blocks = 4
    assert plain_work["encoder_blocks"] == CLIENTS * blocks
    assert batcher.stats["batched_requests"] == CLIENTS and batcher.stats["largest_batch"] > 1
    assert batched_work["encoder_blocks"] == batcher.stats["batches"] * blocks < CLIENTS * blocks
    print(f"\nbatching: {CLIENTS} requests in {batcher.stats['batches']} encoder passes "
          f"(largest batch {batcher.stats['largest_batch']}); unbatched: {CLIENTS} passes")


def test_cached_embedding_is_not_held_back(env):
    ckpt, folder = env
    app = create_app(load_base(str(ckpt)), folder, max_batch=8, max_wait_ms=1500)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        (iid,) = upload_all(http, [scene(90, 90, seed=3)])
        body = dict(image_id=iid, adapter=NAMES[0], points=[[40, 40, 1]])
        t0 = time.perf_counter()
        first = http.post("api/segment", json=body)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = http.post("api/segment", json=dict(body, points=[[20, 30, 1]]))
        t_again = time.perf_counter() - t0
    assert first.status_code == again.status_code == 200
    assert t_first >= 1.5  # alone and uncached: it waited the whole --max-wait-ms for company
    assert t_again < 1.0, t_again  # a prompt on the cached embedding: answered at once
    assert app.state.batcher.stats["batches"] == 1


def test_queue_and_time_limits_hold_with_batching(env):
    ckpt, folder = env
    app = create_app(load_base(str(ckpt)), folder, max_batch=4, max_wait_ms=300, max_queue=2)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        ids = upload_all(http, [scene(90, 90, seed=20 + i) for i in range(6)])
        got = concurrent(url, [dict(image_id=i, adapter=NAMES[k % 4], points=[[40, 40, 1]])
                               for k, i in enumerate(ids)])
    codes = sorted(s for s, _, _ in got)
    # 1 running + 2 waiting admitted at a time: the rest refused at once with a retry hint
    assert codes.count(503) >= 1 and codes.count(200) >= 3, codes
    for s, b, h in got:
        if s == 503:
            assert int(h["retry-after"]) >= 1 and "--max-queue 2" in b["detail"]

    # a time limit shorter than the wait for company: the request gets its 503, and the server still answers
    app = create_app(load_base(str(ckpt)), folder, max_batch=8, max_wait_ms=5000, request_timeout=1.0)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        (iid,) = upload_all(http, [scene(70, 70, seed=9)])
        t0 = time.perf_counter()
        r = http.post("api/segment", json=dict(image_id=iid, adapter=None, points=[[30, 30, 1]]))
        assert time.perf_counter() - t0 < 4.0
        assert r.status_code == 503 and "for its turn" in r.json()["detail"], r.text
        assert app.state.batcher.pending() == 0  # it left the batcher
        assert http.get("api/health").json()["work"]["queued"] == 0


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "error: --max-batch 0 must be a positive number"),
    (["--max-batch", "2.5"], "error: --max-batch 2.5 must be a whole number"),
    (["--max-wait-ms", "-1"], "error: --max-wait-ms -1 must be 0 or more"),
    (["--engine", "ray", "--replicas", "0"], "error: --replicas 0 must be a whole number of at least 1"),
])
def test_batching_and_engine_flags_are_checked(tmp_path, capsys, flags, message):
    from samadapt.recipes.cli import main

    if "ray" in flags:
        pytest.importorskip("ray")
    assert main(["serve", "--adapters", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message), err
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("size, want", [(256, 8), (512, None)])
def test_default_batch_follows_the_core_on_a_cpu(tmp_path, size, want):
    """Without max_batch the server batches below 512 px and not from 512 px on a CPU, where a batch
    costs more per image than one image at a time (`sam_core.fast.encoder_batch`); a given value wins."""
    from samadapt.sam_core import build_sam

    sam = build_sam("tiny", image_size=size).eval()
    batcher = create_app(sam, tmp_path).state.batcher
    assert (batcher.max_batch if batcher is not None else None) == want
    assert create_app(sam, tmp_path, max_batch=4).state.batcher.max_batch == 4
