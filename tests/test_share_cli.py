"""Naming the base (issue 15): the CLI flag for the override, and what `samadapt inspect` shows.

- `samadapt predict --adapter` with an adapter made for another checkpoint: exit 2, one line naming the
  expected checkpoint file and `--allow-base-mismatch`; with the flag, masks are written;
- `eval` and `serve` take the flag; the server built with it serves the adapter, without it answers 409;
- `samadapt inspect` shows the base checkpoint's file name and sha256.
"""
import contextlib
import hashlib
import io
import shutil
import types

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from share_util import make_adapter

from samadapt.recipes.cli import build_parser, main
from samadapt.recipes.serve.app import create_app
from samadapt.sam_core import build_sam, load_sam


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_allow_base_mismatch_flag_and_inspect(tmp_path, pretrained_tiny_path):
    trained_on = tmp_path / "sam_tiny_trained_on.safetensors"
    shutil.copyfile(pretrained_tiny_path, trained_on)
    f = make_adapter(load_sam(trained_on), tmp_path / "cod.safetensors")
    digest = hashlib.sha256(trained_on.read_bytes()).hexdigest()

    r = run("inspect", f)
    assert r.returncode == 0 and f"sam_tiny_trained_on.safetensors (sha256 {digest})" in r.stdout

    other = tmp_path / "other.pth"  # another checkpoint of the same arch: other weights
    import torch

    torch.save(build_sam("tiny").state_dict(), other)
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)).save(img)
    argv = ["predict", img, "--base", other, "--adapter", f, "--box", "4,4,40,40", "--no-overlay"]
    r = run(*argv, "--out", tmp_path / "out1")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert "checkpoint sam_tiny_trained_on.safetensors" in r.stderr and "--allow-base-mismatch" in r.stderr
    assert not (tmp_path / "out1").exists()
    r = run(*argv, "--out", tmp_path / "out2", "--allow-base-mismatch")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out2").iterdir())  # masks written

    parser = build_parser()
    for cmd in (["eval", "--allow-base-mismatch"], ["serve", "--adapters", "x", "--allow-base-mismatch"]):
        assert parser.parse_args(cmd).allow_base_mismatch is True
        assert parser.parse_args(cmd[:-1]).allow_base_mismatch is False

    buf = io.BytesIO()
    Image.open(img).save(buf, format="PNG")
    for allow, status in ((False, 409), (True, 200)):
        app = create_app(load_sam(other), None, catalogue={"cod": str(f)}, allow_base_mismatch=allow)
        with TestClient(app, base_url="http://localhost") as c:
            iid = c.post("/api/images", files={"file": ("i.png", buf.getvalue(), "image/png")}).json()["image_id"]
            resp = c.post("/api/segment", json={"image_id": iid, "adapter": "cod", "box": [4, 4, 40, 40]})
            assert resp.status_code == status, resp.text
            if status == 409:
                assert "sam_tiny_trained_on.safetensors" in resp.json()["detail"]
