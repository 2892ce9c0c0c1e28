"""The Label Studio ML backend (`samadapt.recipes.serve.label_studio`).

In-process (default suite): the protocol routes, prompts from an interactive context, and one-line errors.
Against a real Label Studio (`-m labelstudio`, run by .ci/run): PyPI's `label-studio` in its own virtual
environment (`.lsvenv`, created here on first use), started on 127.0.0.1 with SQLite; a project and an
image task created, the backend connected, interactive (click, box) and pre-annotation predictions
requested and read back through the Label Studio SDK, brush masks decoded by the SDK's own decoder and
compared with `AdapterBank` run directly.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samadapt import adapters
from samadapt.adapters import AdapterBank
from samadapt.recipes.model import load_base

ROOT = Path(__file__).resolve().parents[1]
LS_VENV = ROOT / ".lsvenv"
LS_PACKAGES = ["label-studio>=1.23,<2", "label-studio-sdk>=2.1,<3"]
CLICK, BOX = (24.0, 20.0), (10.0, 8.0, 40.0, 34.0)  # in pixels of the 64 x 48 image (label_studio_client.py)
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="object"/></BrushLabels><KeyPointLabels name="kp" toName="image" smart="true">'
          '<Label value="object"/></KeyPointLabels></View>')


def picture() -> np.ndarray:
    a = np.full((48, 64, 3), 30, np.uint8)
    a[10:34, 12:38] = (220, 200, 40)
    return a


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ls_adapters")
    sam = load_base()
    adapters.attach(sam, adapters.config("lora", r=2), name="cod")
    adapters.save(sam, d / "cod.safetensors", name="cod", domain="camouflage")
    Image.fromarray(picture()).save(d.parent / "task.png")
    return d


# ----------------------------------------------------------------------------- in-process
def test_protocol_routes_in_process(folder):
    import base64
    import io

    from fastapi.testclient import TestClient

    from samadapt.recipes.serve.label_studio import create_label_studio_app

    c = TestClient(create_label_studio_app(load_base(), folder))
    assert c.get("/health").json() == {"status": "UP", "model_class": "samadapt", "adapters": ["cod"]}
    r = c.post("/setup", json={"project": "7.1700000000", "schema": CONFIG, "extra_params": {"adapter": "cod"}})
    assert r.status_code == 200 and r.json() == {"model_version": "samadapt-cod"}
    buf = io.BytesIO()
    Image.fromarray(picture()).save(buf, format="PNG")
    task = {"id": 1, "data": {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}
    ctx = {"result": [{"type": "keypointlabels", "original_width": 64, "original_height": 48,
                       "value": {"x": 100 * CLICK[0] / 64, "y": 100 * CLICK[1] / 48, "keypointlabels": ["object"]}}]}
    r = c.post("/predict", json={"tasks": [task], "project": "7.1700000000", "label_config": CONFIG,
                                 "params": {"context": ctx}})
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    (entry,) = res["result"]
    assert entry["type"] == "brushlabels" and entry["from_name"] == "tag" and entry["to_name"] == "image"
    assert entry["value"]["brushlabels"] == ["object"] and entry["value"]["format"] == "rle"
    masks, scores, _ = AdapterBank(load_base(), folder).predict(picture(), adapter="cod", multimask_output=False,
                                                                point_coords=np.array([CLICK]),
                                                                point_labels=np.array([1]))
    assert res["score"] == pytest.approx(float(scores[0]), abs=1e-6) and res["model_version"] == "samadapt-cod"
    assert c.post("/webhook", json={"action": "ANNOTATION_CREATED"}).json()["status"] == "ok"
    # errors: one line naming the problem, 400, never a 500
    bad = c.post("/setup", json={"project": "8.1", "schema": CONFIG, "extra_params": {"adapter": "nope"}})
    assert bad.status_code == 400 and "adapter 'nope' is not in" in bad.json()["error"]
    bad = c.post("/predict", json={"tasks": [task], "label_config": "<View><Image name='i' value='$image'/></View>"})
    assert bad.status_code == 400 and "no <BrushLabels> or <PolygonLabels>" in bad.json()["error"]
    bad = c.post("/predict", json={"tasks": [{"id": 2, "data": {"image": "ftp://x"}}], "label_config": CONFIG})
    assert bad.status_code == 400 and "not a data: URI" in bad.json()["error"]


# ----------------------------------------------------------------------------- against Label Studio
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ls_venv() -> Path:
    """Label Studio's own virtual environment (its Django pins are not ours), installed from PyPI once."""
    py = LS_VENV / "bin" / "python"
    probe = [str(py), "-c", "import label_studio, label_studio_sdk"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(LS_VENV)], check=True)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", *LS_PACKAGES], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, f"installing {LS_PACKAGES} into {LS_VENV} failed:\n{r.stderr[-3000:]}"
    return py


def wait_http(url: str, proc, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def servers(folder, tmp_path_factory):
    py = ensure_ls_venv()
    work = tmp_path_factory.mktemp("ls")
    token = "samadaptTestToken0123456789"
    env = dict(os.environ, OMP_NUM_THREADS="1", HOME=str(work), LABEL_STUDIO_BASE_DATA_DIR=str(work / "data"),
               ML_BLOCK_LOCAL_IP="false", SSRF_PROTECTION_ENABLED="false")  # the backend is on 127.0.0.1 too
    be_port, ls_port = free_port(), free_port()
    procs = []
    try:
        be_log = work / "backend.log"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "samadapt.recipes.serve.label_studio", "--adapters", str(folder), "--port",
             str(be_port)], stdout=open(be_log, "w"), stderr=subprocess.STDOUT, env=env))
        ls_log = work / "label_studio.log"
        procs.append(subprocess.Popen(
            [str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
             "--port", str(ls_port), "--data-dir", str(work / "data"), "--username", "annotator@example.com",
             "--password", "samadapt-test-pass", "--user-token", token, "--enable-legacy-api-token",
             "--log-level", "WARNING"], stdout=open(ls_log, "w"), stderr=subprocess.STDOUT, env=env, cwd=work))
        wait_http(f"http://127.0.0.1:{be_port}/health", procs[0], 120, be_log)
        wait_http(f"http://127.0.0.1:{ls_port}/health", procs[1], 600, ls_log)  # first start migrates SQLite
        yield {"py": py, "ls": f"http://127.0.0.1:{ls_port}", "token": token, "backend": f"http://127.0.0.1:{be_port}",
               "env": env}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def through_label_studio(servers, image: Path, output: str, extra: dict) -> dict:
    r = subprocess.run([str(servers["py"]), str(ROOT / "tests" / "label_studio_client.py"), servers["ls"],
                        servers["token"], servers["backend"], str(image), output, json.dumps(extra)],
                       capture_output=True, text=True, timeout=600, env=servers["env"])
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("@@")]
    assert r.returncode == 0 and lines, r.stderr[-4000:]
    return json.loads(lines[-1][2:])


@pytest.mark.labelstudio
def test_brush_predictions_round_trip_through_label_studio(servers, folder):
    got = through_label_studio(servers, folder.parent / "task.png", "brush", {"adapter": "cod"})
    assert got["ml_state"] == "CO"  # Label Studio reached the backend (/health, /setup) and calls it connected
    bank = AdapterBank(load_base(), folder)
    rgb = picture()
    click, cs, _ = bank.predict(rgb, adapter="cod", point_coords=np.array([CLICK]), point_labels=np.array([1]),
                                multimask_output=False)
    box, bs, _ = bank.predict(rgb, adapter="cod", box=np.array(BOX), multimask_output=False)
    plain, ps, _ = bank.predict(rgb, adapter="cod", multimask_output=False)
    for name, mask, score in (("click", click[0], cs[0]), ("box", box[0], bs[0])):
        (res,) = got[name]["results"]
        ls_mask = np.array(res["mask"], bool)
        assert res["type"] == "brush" and res["labels"] == ["object"]
        assert mask.any() and np.array_equal(ls_mask, mask), name  # decoded by Label Studio's SDK
        assert got[name]["score"] == pytest.approx(float(score), abs=1e-6)
    # pre-annotation (no context): promptless, stored by Label Studio and read back through the SDK
    (stored,) = got["stored"]
    assert stored["model_version"] == "samadapt-cod" and stored["score"] == pytest.approx(float(ps[0]), abs=1e-6)
    (res,) = stored["results"]
    assert np.array_equal(np.array(res["mask"], bool), plain[0])


@pytest.mark.labelstudio
def test_polygon_and_automatic_pre_annotation_through_label_studio(servers, folder):
    from samadapt.recipes.serve.label_studio import mask_polygons

    extra = {"adapter": "cod", "output": "polygon", "mode": "auto", "points_per_side": 4, "pred_iou_thresh": 0.0,
             "stability_score_thresh": 0.0}
    got = through_label_studio(servers, folder.parent / "task.png", "polygon", extra)
    bank = AdapterBank(load_base(), folder)
    click, _, _ = bank.predict(picture(), adapter="cod", point_coords=np.array([CLICK]), point_labels=np.array([1]),
                               multimask_output=False)
    want = mask_polygons(click[0])
    assert want and [r["points"] for r in got["click"]["results"]] == want
    assert all(r["type"] == "polygon" and r["labels"] == ["object"] for r in got["click"]["results"])
    found = bank.generate(picture(), adapter="cod", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    n = sum(len(mask_polygons(m["segmentation"])) for m in found)
    (stored,) = got["stored"]
    assert n > 0 and len(stored["results"]) == n  # every automatic mask's regions, stored as polygons
