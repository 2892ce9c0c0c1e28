"""The built wheel, installed (not editable) in a fresh environment: it puts only `samadapt` on the
import path, so PyPI's `adapters` (AdapterHub) installed beside it imports, and so do ours."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPI_ADAPTERS = "adapters==1.3.0"  # AdapterHub; it pins its own transformers, installed in the fresh env only


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert p.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", ".lsvenv", "build", "runs", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)])
    wheels = list(out.glob("samadapt-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_only_the_samadapt_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"samadapt"}, f"top-level entries besides samadapt: {sorted(tops - dist_info)}"
    # every module of the three folders is in it (a subpackage missing from pyproject's list would not be)
    sources = {f"samadapt/{p.relative_to(ROOT).as_posix()}" for sub in ("sam_core", "adapters", "recipes")
               for p in (ROOT / sub).rglob("*.py")}
    assert sources - set(names) == set(), f"modules missing from the wheel: {sorted(sources - set(names))}"
    # the package data a fresh install needs
    assert "samadapt/recipes/weights/tiny_generic.safetensors" in names
    assert any(n.startswith("samadapt/recipes/") and n.endswith(".yaml") for n in names)
    assert any(n.endswith("static/index.html") for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "samadapt = samadapt.recipes.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_fresh_install_beside_pypi_adapters(wheel, tmp_path):
    env_dir = tmp_path / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # heavy dependencies (torch, timm, peft, ...) come from this test environment's site-packages, added by
    # a .pth line: that folder's own .pth files (the editable samadapt's finder) are not processed there
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-input"]
    _run(pip + ["--no-deps", str(wheel)])
    _run(pip + [PYPI_ADAPTERS])
    probe = textwrap.dedent("""
        import importlib, importlib.util, json
        found = {n: importlib.util.find_spec(n) is not None for n in ("sam_core", "recipes")}
        hub = importlib.import_module("adapters")  # PyPI's AdapterHub
        import samadapt.sam_core as core
        from samadapt import adapters as ours
        import samadapt.recipes.cli as cli
        sam = core.build_sam("tiny")
        ours.attach(sam, ours.config("lora", r=2, targets=["qkv"]), name="x")
        print(json.dumps({"found": found, "hub": hub.__file__, "hub_has_model": hasattr(hub, "AutoAdapterModel"),
                          "ours": ours.__file__, "core": core.__file__, "attached": ours.attached(sam),
                          "version": cli.version()}))
    """)
    # -I: no current directory or PYTHONPATH on the path, as in a user's project
    out = json.loads(_run([str(py), "-I", "-c", probe], cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert out["found"] == {"sam_core": False, "recipes": False}, out
    assert out["hub"].startswith(str(site)) and out["hub_has_model"], out
    assert out["ours"].startswith(str(site / "samadapt")) and out["core"].startswith(str(site / "samadapt")), out
    assert out["attached"] == ["x"]
    version = _run(
        [str(env_dir / "bin" / "samadapt"), "--version"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}
    )
    assert version.stdout.strip() == f"samadapt {out['version']}" and out["version"][0].isdigit(), version.stdout
