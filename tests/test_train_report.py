"""`train` / `eval` say what data they used and what they wrote; a random full-size core needs a flag;
key suggestions know other trainers' names."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from samadapt.recipes.config import load_recipe
from samadapt.recipes.data import FolderDataset
from samadapt.recipes.data.synthetic import write_synthetic_folder
from samadapt.recipes.errors import RecipeError
from samadapt.recipes.model import RandomBaseError, build_core

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["base.pretrained_tiny=false", "train.batch_size=2", "eval.baseline=false", "eval.samples=0",
         "base.image_size=64", "train.max_steps=2", "train.warmup_steps=0"]


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "samadapt.recipes.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=600, env=env)


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    return write_synthetic_folder("camouflage", tmp_path_factory.mktemp("d") / "seven", 7, 64, 0)


def test_train_without_base_on_a_full_size_recipe_is_refused(seven, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "camouflage", "--data", seven, "--out", out)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "vit_b core" in err[0], r.stderr
    assert "--base" in err[0] and "--allow-random-base" in err[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    r = run_cli("eval", "--recipe", "camouflage", "--data", seven)
    assert r.returncode == 2 and "--base" in r.stderr.splitlines()[-1], r.stderr[-2000:]
    # the flag lets it through (built here, not trained: a vit_b step is minutes on this CPU)
    cfg = load_recipe("camouflage", ["base.image_size=64"])
    with pytest.raises(RandomBaseError, match="--allow-random-base"):
        build_core(cfg)
    assert build_core(cfg, allow_random_base=True).arch == "vit_b"
    # the tiny core may be random without the flag (the suite's own recipes do it)
    assert build_core(load_recipe("demo", ["base.pretrained_tiny=false", "base.image_size=64"])).arch == "tiny"


def test_train_prints_image_counts_their_source_and_the_files_written(seven, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "demo", "--data", seven, "--out", out, "--quiet", *sum([["--set", s] for s in SMALL], []))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_recipe("demo")
    common = dict(val_fraction=cfg["data"]["val_fraction"], seed=cfg["train"]["seed"])
    n_tr, n_ev = len(FolderDataset(seven, split="train", **common)), len(FolderDataset(seven, split="val", **common))
    assert n_tr + n_ev == 7 and n_ev >= 1  # precondition: the held-out split is the small one the issue met
    text = r.stdout + r.stderr
    assert f"data: {n_tr} train images from {seven} (layout generic)" in text, text[-3000:]
    vf = cfg["data"]["val_fraction"]
    assert f"data: {n_ev} eval images, held out of the same folder(s): data.val_fraction={vf}, seed 0" in text
    assert f"warning: only {n_ev} eval image(s)" in text
    for f in ("adapter.safetensors", "metrics.json", "recipe.yaml"):
        size = (out / f).stat().st_size
        assert f"wrote {out / f}  ({size:,} bytes)" in text, (f, text[-2000:])


def test_eval_prints_its_count_and_the_json_written(seven, tmp_path):
    js = tmp_path / "m.json"
    r = run_cli("eval", "--recipe", "demo", "--data", seven, "--json", js,
                *sum([["--set", s] for s in SMALL if "max_steps" not in s and "warmup" not in s], []))
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    n = json.loads(js.read_text())["images"]
    assert f"data: {n} eval images" in r.stderr and f"wrote {js}" in r.stderr


@pytest.mark.parametrize("given, meant", [("train.learning_rate", "train.lr"), ("train.batch", "train.batch_size"),
                                          ("train.bs", "train.batch_size"), ("train.num_epochs", "train.epochs"),
                                          ("train.gradient_accumulation_steps", "train.grad_accum")])
def test_key_suggestions_know_aliases(given, meant):
    with pytest.raises(RecipeError) as e:
        load_recipe("demo", [f"{given}=2"])
    assert f"unknown key {given!r}; did you mean {meant!r}?" in str(e.value)
    if given != "train.learning_rate":  # the CLI once: a subprocess is seconds
        return
    r = run_cli("train", "demo", "--set", f"{given}=2", "--out", "/nonexistent/never")
    assert r.returncode == 2 and f"did you mean {meant!r}" in r.stderr.splitlines()[-1], r.stderr[-1000:]
