"""The CPU route and threads where users meet them: `samadapt predict` (its log line, `--precision`,
decoding overlapped with encoding), `samadapt serve` (`/api/health`'s `encoder`), and the OpenMP wait
policy the CLI starts with (read back from the OpenMP runtime itself).
"""
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samadapt.recipes import model as recipe_model
from samadapt.recipes.cli import main
from samadapt.sam_core import SamPredictor, build_sam
from samadapt.sam_core.fast import cpu as cpu_route

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    images = {}
    for k in range(5):
        img = rng.integers(0, 255, (60 + 7 * k, 90, 3), dtype=np.uint8)
        img[10:40, 20:60] = (230, 40, 40)
        Image.fromarray(img).save(d / f"im{k}.png")
        images[f"im{k}"] = img
    return d, images


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predict_logs_the_route_and_matches_the_predictor(folder, tmp_path, capsys, monkeypatch, precision):
    d, images = folder
    torch.manual_seed(3)
    sam = build_sam("tiny").eval()
    monkeypatch.setattr(recipe_model, "load_base", lambda base=None, image_size=None: sam)
    out = tmp_path / "out"
    code = main(["predict", str(d), "--out", str(out), "--box", "15,10,70,45", "--batch-size", "2",
                 "--precision", precision, "--no-overlay"])
    assert code == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("predict: "))
    assert f"encoder cpu {'bf16 autocast' if precision == 'bf16' else 'fp32'}, factorised attention" in line, line
    assert "thread" in line
    pred = SamPredictor(sam, precision=precision)
    for stem, img in images.items():
        pred.set_image(img)
        want = pred.predict(box=np.array([15, 10, 70, 45]), multimask_output=False)[0][0]
        got = np.array(Image.open(out / f"{stem}.png")) > 127
        assert (got == want).all(), stem


def test_predict_decodes_while_the_next_batch_encodes(folder, tmp_path, monkeypatch):
    """The first batch's decoding waits until the second batch's encoding has begun: it can only
    finish if decoding runs beside encoding (sequential code would time out here)."""
    d, _ = folder
    sam = build_sam("tiny").eval()
    monkeypatch.setattr(recipe_model, "load_base", lambda base=None, image_size=None: sam)
    second_encode = threading.Event()
    calls = {"encode": 0, "decode_threads": set(), "overlapped": None}

    def on_encode(module, args):
        calls["encode"] += 1
        if calls["encode"] == 2:
            second_encode.set()

    def on_decode(module, args):
        calls["decode_threads"].add(threading.current_thread().name)
        if calls["overlapped"] is None:
            calls["overlapped"] = second_encode.wait(timeout=30)

    hooks = [sam.image_encoder.patch_embed.register_forward_pre_hook(on_encode),  # once per encoder batch
             sam.prompt_encoder.register_forward_pre_hook(on_decode)]
    try:
        code = main(["predict", str(d), "--out", str(tmp_path / "o"), "--point", "30,20", "--batch-size", "2"])
    finally:
        for h in hooks:
            h.remove()
    assert code == 0 and calls["encode"] == 3  # 5 images in batches of 2: the encoder ran batched
    assert calls["overlapped"] is True
    assert all(n.startswith("samadapt-decode") for n in calls["decode_threads"]), calls["decode_threads"]
    assert len(list((tmp_path / "o").glob("*_overlay.png"))) == 5


@pytest.mark.parametrize("size, calls", [(256, [5]), (512, [1] * 5)])
def test_predict_batches_small_inputs_and_encodes_large_ones_alone_on_a_cpu(folder, tmp_path, monkeypatch, size,
                                                                           calls):
    """Without --batch-size a CPU run batches the encoder below 512 px and encodes each image alone from
    512 px (a batch was slower per image there: `sam_core.fast.encoder_batch`); --batch-size still
    batches (the test above)."""
    d, _ = folder
    sam = build_sam("tiny", image_size=size).eval()
    monkeypatch.setattr(recipe_model, "load_base", lambda base=None, image_size=None: sam)
    sizes = []
    hook = sam.image_encoder.patch_embed.register_forward_pre_hook(lambda m, a: sizes.append(int(a[0].shape[0])))
    try:
        assert main(["predict", str(d), "--out", str(tmp_path / "o"), "--point", "30,20", "--no-overlay"]) == 0
    finally:
        hook.remove()
    assert sizes == calls, sizes
    assert len(list((tmp_path / "o").glob("*.png"))) == 5


def test_predict_bad_precision_setting_exits_2(folder, tmp_path, capsys, monkeypatch):
    d, _ = folder
    monkeypatch.setenv(cpu_route.ENV_PRECISION, "fp8")
    out = tmp_path / "o"
    assert main(["predict", str(d), "--out", str(out), "--point", "3,3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: SAMADAPT_PRECISION='fp8' is not a precision") and "fp32" in err[-1]
    assert not out.exists()


def test_health_shows_the_encoder_route(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from samadapt.recipes.serve import create_app

    monkeypatch.setattr(cpu_route, "cpu_features", lambda: {"avx512_bf16": True, "amx_bf16": True})
    sam = build_sam("tiny", image_size=512).eval()
    for precision, want in ((None, "bf16"), ("fp32", "fp32")):
        app = create_app(sam, tmp_path, precision=precision)
        h = TestClient(app, base_url="http://localhost").get("/api/health").json()
        assert h["encoder"]["precision"] == want and h["encoder"]["device"] == "cpu", h["encoder"]
        assert h["encoder"]["attention"] == "factorised" and h["encoder"]["reason"]


def _omp_report(argv, extra):
    """The OpenMP runtime's own report of its settings (GNU OpenMP's OMP_DISPLAY_ENV=VERBOSE, printed
    when torch loads it): `GOMP_SPINCOUNT` is how long an idle thread spins before it sleeps."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **extra)
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if "OPENMP DISPLAY ENVIRONMENT" not in r.stderr:
        if "libgomp" in " ".join(p.name for p in (Path(torch.__file__).parent / "lib").iterdir()):
            raise AssertionError(f"torch ships GNU OpenMP, yet {argv} printed no OpenMP report (did it load torch?)")
        pytest.skip("this torch's OpenMP runtime does not report its settings (not GNU OpenMP)")
    return r


# `predict` of a missing image loads torch and exits 2 before writing anything: the cheapest torch-loading
# command (`inspect` no longer loads torch)
PREDICT_MISSING = ["-m", "samadapt.recipes.cli", "predict", "no/such.png", "--out", "no/such/out"]


def test_cli_starts_with_a_short_spin_unless_the_user_chose_a_wait_policy():
    r = _omp_report(PREDICT_MISSING, {})
    assert r.returncode == 2 and "error:" in r.stderr
    assert "GOMP_SPINCOUNT = '3000'" in r.stderr, r.stderr[-1500:]  # a short spin, then sleep
    # the user's choice is kept
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in _omp_report(PREDICT_MISSING, {"OMP_WAIT_POLICY": "ACTIVE"}).stderr
    assert "GOMP_SPINCOUNT = '5000'" in _omp_report(PREDICT_MISSING, {"GOMP_SPINCOUNT": "5000"}).stderr
    # torch imported without the CLI spins first (the runtime's default): the CLI made the change
    plain = _omp_report(["-c", "import torch"], {}).stderr
    assert "GOMP_SPINCOUNT = '3000'" not in plain and "GOMP_SPINCOUNT" in plain, plain[-1500:]
