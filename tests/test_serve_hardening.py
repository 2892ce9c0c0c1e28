"""`samadapt serve` hardening: bounded work, timeouts, cancellation, shutdown, the Host and origin
guards, and no 500 from odd adapter files or thin images.

  1. /api/auto's pixel-point budget refuses the issue's freezing request at once (422), and the
     budget is in /api/health and the OpenAPI schema;
  2. a heavy request within the budget is stopped at its time limit (504) while /api/health keeps
     answering in under a second, and its model work really stops (the decoder-batch counter);
  3. a client that goes away cancels its work; a full queue answers 503 with Retry-After;
  4. a client sending its head or body too slowly is answered 408 and cut off (raw sockets);
  5. SIGTERM during a request stops a real `samadapt serve` process within the grace period;
  6. a forged Host gets 421 and a cross-origin upload 403, and neither does any work; same-origin and
     non-browser requests pass; `--allowed-host` adds a name;
  7. adapter files with wrong-typed metadata are listed as unusable (200) and answer 409, never 500;
     images that round to 0 px at the model size answer 200 or 422, never 500;
  8. `samadapt serve --port 99999` (and other bad flags) is one `error:` line and exit 2.

Every heavy request is proved heavy (its work started and its counter grew) before its limit is
checked; time bounds are generous (they separate "stops" from "hangs for minutes").
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_serve import make_core_and_adapters, png_bytes, scene  # noqa: E402

from samadapt.recipes.cli import main  # noqa: E402
from samadapt.recipes.model import load_base  # noqa: E402
from samadapt.recipes.serve import background_server, create_app  # noqa: E402
from samadapt.recipes.serve.guard import allowed_hosts_for  # noqa: E402
from samadapt.sam_core import build_sam  # noqa: E402

HEAVY = {"points_per_side": 64, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "max_masks": 1000}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the model worker leaves a core for the HTTP side on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_core_and_adapters(tmp_path_factory.mktemp("hard"), names=("seg_a",))


def local(app) -> TestClient:
    return TestClient(app, base_url="http://localhost")


def upload(http, img: np.ndarray) -> str:
    r = http.post("api/images" if isinstance(http, httpx.Client) else "/api/images",
                  files={"file": ("x.png", png_bytes(img), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()["image_id"]


def work(http) -> dict:
    return http.get("api/health").json()["work"]


def wait_for(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def heavy_started(http, before: int) -> dict:
    """Wait until a model request runs and has decoded at least two point batches (the precondition)."""
    return wait_for(lambda: (w := work(http))["running"] == 1 and w["decoder_batches"] >= before + 2 and w,
                    30, "the heavy request starting")


def raw_request(url: str, data: bytes) -> socket.socket:
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(data)
    return sock


def read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


# ----------------------------------------------------------------------------- 1. the budget
def test_budget_refuses_the_freezing_request_at_once():
    app = create_app(build_sam("tiny"), _empty_dir())
    c = local(app)
    iid = upload(c, np.full((2048, 2048, 3), 90, np.uint8))  # the request: 2048^2, 64 points per side
    t0 = time.monotonic()
    r = c.post("/api/auto", json=dict(HEAVY, image_id=iid))
    assert time.monotonic() - t0 < 5
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "17,179,869,184 pixel-points" in detail and "points_per_side <= 16" in detail, detail
    assert work(c)["decoder_batches"] == 0  # no model work was done
    h = c.get("/api/health").json()
    assert h["limits"]["auto_budget"] == 2**30 and h["limits"]["request_timeout_s"] == 60
    spec = c.get("/openapi.json").json()
    assert "1,073,741,824 pixel-points" in spec["paths"]["/api/auto"]["post"]["description"]
    assert {"413", "422", "503", "504", "421", "403"} <= set(spec["paths"]["/api/auto"]["post"]["responses"])
    # within the budget it runs (16 points per side is what the page asks for)
    r = c.post("/api/auto", json=dict(HEAVY, image_id=upload(c, scene(64, 64)), points_per_side=16))
    assert r.status_code == 200, r.text


def _empty_dir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp())


# ----------------------------------------------------------------------------- 2. time limit, health stays quick
def test_heavy_request_stops_at_its_limit_while_health_answers():
    app = create_app(build_sam("tiny"), _empty_dir(), auto_budget=2**40, request_timeout=4)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        iid = upload(http, scene(512, 512, seed=5))  # 512^2 x 64^2: about a minute of work on one core
        result = {}

        def heavy():
            t0 = time.monotonic()
            result["r"] = http.post("api/auto", json=dict(HEAVY, image_id=iid))
            result["s"] = time.monotonic() - t0

        t = threading.Thread(target=heavy)
        t.start()
        heavy_started(http, 0)
        latencies = []
        while t.is_alive():
            t0 = time.monotonic()
            assert http.get("api/health").status_code == 200
            assert http.get("api/adapters").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.1)
        t.join()
        r = result["r"]
        assert r.status_code == 504 and "4 s limit" in r.json()["detail"], r.text
        assert result["s"] < 4 + 6, result["s"]  # the limit plus one model step, not a minute
        assert len(latencies) >= 5 and max(latencies) < 1.0, latencies
        # the work really stopped: the batch counter does not grow any more
        after = work(http)
        assert after["running"] == 0 and after["cancelled"] == 1
        time.sleep(1.0)
        assert work(http)["decoder_batches"] == after["decoder_batches"]
        # and the server still serves
        assert http.post("api/segment", json={"image_id": iid, "points": [[10, 10, 1]]}).status_code == 200


# ----------------------------------------------------------------------------- 3. disconnect, queue
def test_client_disconnect_cancels_the_work():
    app = create_app(build_sam("tiny"), _empty_dir(), auto_budget=2**40, request_timeout=120)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        iid = upload(http, scene(512, 512, seed=6))
        body = json.dumps(dict(HEAVY, image_id=iid)).encode()
        host = url.split("//")[1].rstrip("/")
        sock = raw_request(url, b"POST /api/auto HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: "
                           b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        heavy_started(http, 0)
        sock.close()  # the client goes away
        stopped = wait_for(lambda: (w := work(http))["running"] == 0 and w["cancelled"] == 1 and w, 10,
                           "the cancelled work stopping")
        time.sleep(1.0)
        assert work(http)["decoder_batches"] == stopped["decoder_batches"]
        assert stopped["completed"] == 0


def test_full_queue_answers_503_with_retry_after():
    app = create_app(build_sam("tiny"), _empty_dir(), auto_budget=2**40, request_timeout=6, max_queue=1)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        iid = upload(http, scene(512, 512, seed=7))
        answers = []
        def heavy():
            answers.append(http.post("api/auto", json=dict(HEAVY, image_id=iid)))

        threads = [threading.Thread(target=heavy) for _ in range(2)]
        threads[0].start()
        heavy_started(http, 0)
        threads[1].start()
        wait_for(lambda: work(http)["queued"] == 1, 10, "the second request queueing")
        t0 = time.monotonic()
        r = http.post("api/segment", json={"image_id": iid})  # a third model request: over the queue
        assert time.monotonic() - t0 < 1.0
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1 and "--max-queue 1" in r.json()["detail"]
        for t in threads:
            t.join()
        assert sorted(a.status_code for a in answers) in ([503, 504], [504, 504]), [a.text for a in answers]
        assert work(http)["refused"] == 1
        assert http.post("api/segment", json={"image_id": iid}).status_code == 200


# ----------------------------------------------------------------------------- 4. slow clients
def test_slow_head_and_idle_connections_are_cut_off():
    app = create_app(build_sam("tiny"), _empty_dir())
    with background_server(app, header_timeout=1.0) as url:
        host = url.split("//")[1].rstrip("/").encode()
        sock = raw_request(url, b"GET /api/health HTTP/1.1\r\nHost: " + host + b"\r\n")
        t0 = time.monotonic()
        got = b""
        try:
            for i in range(40):  # a header byte every 0.2 s: never finishes on its own
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
                time.sleep(0.2)
        except OSError:
            pass  # the server closed the connection under us
        got = read_all(sock, 5)
        assert got.startswith(b"HTTP/1.1 408") and b"--header-timeout" in got, got
        assert time.monotonic() - t0 < 6
        sock.close()
        idle = raw_request(url, b"")  # a connection that sends nothing
        t0 = time.monotonic()
        assert read_all(idle, 5).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - t0 < 4
        idle.close()
        # a prompt client on a kept-alive connection is unaffected
        with httpx.Client(base_url=url) as http:
            for _ in range(3):
                assert http.get("api/health").status_code == 200
                time.sleep(0.4)


def test_slow_body_is_cut_off():
    app = create_app(build_sam("tiny"), _empty_dir(), body_timeout=1.0)
    with background_server(app) as url:
        host = url.split("//")[1].rstrip("/").encode()
        for path, ctype in ((b"/api/segment", b"application/json"), (b"/api/images", b"multipart/form-data; "
                                                                                     b"boundary=xyz")):
            sock = raw_request(url, b"POST " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: " + ctype
                               + b"\r\nContent-Length: 1000\r\n\r\n" + b"--xyz\r\n")
            t0 = time.monotonic()
            got = read_all(sock, 10)
            sock.close()
            assert got.startswith(b"HTTP/1.1 408"), (path, got)
            assert b"--body-timeout" in got and time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------- 5. SIGTERM
def test_sigterm_during_a_request_stops_the_server(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    cmd = [sys.executable, "-m", "samadapt.recipes.cli", "serve", "--adapters", str(folder), "--port", "0",
           "--auto-budget", str(2**40), "--request-timeout", "300"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("samadapt serve: http://127.0.0.1:"), line
        url = line.split()[2]
        with httpx.Client(base_url=url, timeout=60) as http:
            iid = upload(http, scene(512, 512, seed=8))
            result = {}
            t = threading.Thread(target=lambda: result.update(r=_post_or_error(http, iid)))
            t.start()
            heavy_started(http, 0)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            stopped_s = time.monotonic() - t0
            t.join(10)
        out = proc.stdout.read()
        # uvicorn re-raises the signal it handled once it has shut down: exit by SIGTERM, after a clean stop
        assert code in (0, -signal.SIGTERM) and "Finished server process" in out, (code, out)
        assert "Traceback" not in out, out
        assert stopped_s < 5 + 3, stopped_s  # the 5 s grace period and a model step, not minutes
        r = result["r"]
        assert isinstance(r, Exception) or r.status_code == 503, r
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _post_or_error(http, iid):
    try:
        return http.post("api/auto", json=dict(HEAVY, image_id=iid))
    except httpx.HTTPError as e:
        return e


# ----------------------------------------------------------------------------- 6. Host and origin
def test_forged_host_and_cross_origin_upload_are_refused():
    app = create_app(build_sam("tiny"), _empty_dir())
    with background_server(app) as url, httpx.Client(base_url=url) as http:
        own = url.rstrip("/")
        files = {"file": ("x.png", png_bytes(scene(32, 32)), "image/png")}
        images = lambda: http.get("api/health").json()["images"]  # noqa: E731
        for headers in ({"Host": "evil.example"}, {"Host": "evil.example:" + own.rsplit(":", 1)[1]}):
            r = http.post("api/images", files=files, headers=headers)
            assert r.status_code == 421 and "evil.example" in r.json()["detail"], r.text
            assert http.get("api/adapters", headers=headers).status_code == 421  # DNS rebinding reads nothing
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}, {"Origin": "null"},
                        {"Origin": "http://localhost:1"}):
            r = http.post("api/images", files=files, headers=headers)
            assert r.status_code == 403 and "cross-origin" in r.json()["detail"], (headers, r.text)
            r = http.post("api/segment", json={"image_id": "x"}, headers=headers)
            assert r.status_code == 403, (headers, r.text)
        assert images() == 0  # nothing refused was stored
        for headers in ({}, {"Origin": own, "Sec-Fetch-Site": "same-origin"}, {"Host": "localhost:1"}):
            assert http.post("api/images", files=files, headers=headers).status_code == 200, headers
        assert images() == 1


def test_allowed_host_adds_a_name():
    hosts = allowed_hosts_for("127.0.0.1", ["seg.example.com"])
    c = TestClient(create_app(build_sam("tiny"), _empty_dir(), allowed_hosts=hosts), base_url="http://seg.example.com")
    files = {"file": ("x.png", png_bytes(scene(32, 32)), "image/png")}
    assert c.get("/api/health").status_code == 200
    assert c.post("/api/images", files=files, headers={"Origin": "https://seg.example.com"}).status_code == 200
    # behind a proxy that rewrites Host to the loopback address, the public Origin is still this server's
    r = c.post("/api/images", files=files, headers={"Host": "127.0.0.1:8000", "Origin": "https://seg.example.com"})
    assert r.status_code == 200, r.text
    assert c.get("/api/health", headers={"Host": "other.example.com"}).status_code == 421
    assert local(create_app(build_sam("tiny"), _empty_dir())).get("/api/health").status_code == 200
    assert TestClient(create_app(build_sam("tiny"), _empty_dir())).get("/api/health").status_code == 421  # testserver


# ----------------------------------------------------------------------------- 7. odd files, thin images
BAD_META = {
    "base-list": ("base", '["tiny"]'),
    "decoder-list": ("decoder", '["frozen"]'),
    "config-object": ("config", '{"kind": "lora", "r": 4}'),
    "alpha-text": ("config", None),  # alpha "abc" in the LoRA config
    "base-number": ("base", "7"),
    "config-not-json": ("config", "[{"),
}


def _rewrite(src: Path, dst: Path, key: str, value) -> None:
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if value is None:
        cfg = json.loads(meta["config"])
        cfg[0]["alpha"] = "abc"
        value = json.dumps(cfg)
    meta[key] = value
    save_file(tensors, str(dst), metadata=meta)


def test_wrong_typed_adapter_metadata_is_listed_not_500(env, tmp_path):
    ckpt, folder = env
    d = tmp_path / "odd"
    d.mkdir()
    (d / "seg_a.safetensors").write_bytes((folder / "seg_a.safetensors").read_bytes())
    for i, (key, value) in enumerate(BAD_META.values()):
        _rewrite(folder / "seg_a.safetensors", d / f"bad_{i}.safetensors", key, value)
    c = local(create_app(load_base(str(ckpt)), d))
    r = c.get("/api/adapters")
    assert r.status_code == 200, r.text
    listing = {a["name"]: a for a in r.json()["adapters"]}
    assert listing["seg_a"]["compatible"] and listing["seg_a"]["error"] is None
    assert c.get("/api/health").status_code == 200
    iid = upload(c, scene(64, 80))
    for i, case in enumerate(BAD_META):
        name = f"bad_{i}"
        entry = listing[name]
        r = c.post("/api/segment", json={"image_id": iid, "adapter": name, "points": [[10, 10, 1]]})
        assert r.status_code in (200, 409), (case, r.status_code, r.text)
        if not entry["compatible"]:
            assert entry["error"] and "\n" not in entry["error"], (case, entry)
            assert r.status_code == 409 and name in r.json()["detail"], (case, r.text)
        r = c.post("/api/auto", json={"image_id": iid, "adapter": name, "points_per_side": 2})
        assert r.status_code in (200, 409), (case, r.status_code, r.text)
    for case in ("base-list", "decoder-list", "base-number", "config-not-json"):
        assert not listing[f"bad_{list(BAD_META).index(case)}"]["compatible"], case
    r = c.post("/api/segment", json={"image_id": iid, "adapter": "seg_a", "points": [[10, 10, 1]]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("h,w", [(1, 2000), (2000, 1), (1, 1), (3, 4096)])
def test_thin_images_are_segmented_or_refused_not_500(h, w):
    c = local(create_app(build_sam("tiny"), _empty_dir()))
    iid = upload(c, np.full((h, w, 3), 120, np.uint8))
    for path, body in (("/api/segment", {"image_id": iid}), ("/api/segment", {"image_id": iid, "points": [[0, 0, 1]]}),
                       ("/api/auto", {"image_id": iid, "points_per_side": 2})):
        r = c.post(path, json=body)
        assert r.status_code in (200, 422), (path, r.status_code, r.text)
        if r.status_code == 422:
            assert f"{w}x{h}" in r.json()["detail"], r.text
    assert c.post("/api/segment", json={"image_id": upload(c, scene(40, 50))}).status_code == 200


# ----------------------------------------------------------------------------- 8. CLI flags
@pytest.mark.parametrize("flags,text", [
    (["--port", "99999"], "--port 99999"), (["--port", "-1"], "--port -1"), (["--port", "http"], "--port http"),
    (["--request-timeout", "0"], "--request-timeout"), (["--max-queue", "-2"], "--max-queue"),
    (["--auto-budget", "nan"], "--auto-budget"), (["--allowed-host", "http://x.example/"], "--allowed-host"),
])
def test_bad_serve_flags_are_one_error_line(tmp_path, capsys, flags, text):
    assert main(["serve", "--adapters", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and text in err, err
    assert "Traceback" not in err
