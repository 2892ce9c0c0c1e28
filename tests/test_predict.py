"""`samadapt predict`: streaming batch inference, prompts, adapters, partial failure, user errors.

The tiny core is built here (seeded) and passed with --base; two runs go through a subprocess
(`python -m samadapt.recipes.cli predict ...`, as a user would), the rest call `recipes.cli.main` in-process.
Masks are compared with `SamPredictor` on the same image and prompts (multimask_output=False).
"""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samadapt import adapters
from samadapt.recipes.cli import main
from samadapt.recipes.data import read_image
from samadapt.sam_core import SamPredictor, build_sam, load_sam

ROOT = Path(__file__).resolve().parents[1]
BOX = [12, 10, 70, 50]
POINTS = [(40, 30, 1), (5, 55, 0)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    torch.manual_seed(7)
    core = d / "core.pth"
    torch.save(build_sam("tiny").state_dict(), core)
    imgs = d / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    (imgs / "bad.png").write_bytes(rng.bytes(700))  # corrupt: random bytes named .png
    gray = rng.integers(0, 80, (70, 90), dtype=np.uint8)
    gray[15:45, 20:60] = 220
    Image.fromarray(gray).save(imgs / "gray.png")
    deep = rng.integers(0, 20000, (50, 40)).astype(np.uint16)
    deep[10:30, 5:25] = 60000
    Image.fromarray(deep).save(imgs / "deep16.png")
    assert Image.open(imgs / "deep16.png").mode.startswith("I;16")
    rgb = rng.integers(0, 255, (60, 100, 3), dtype=np.uint8)
    rgb[10:50, 15:70] = (230, 40, 40)
    Image.fromarray(rgb).save(imgs / "rgb.jpg", quality=95)
    (imgs / "notes.txt").write_text("not an image")
    good = {"gray": imgs / "gray.png", "deep16": imgs / "deep16.png", "rgb": imgs / "rgb.jpg"}
    return {"dir": d, "core": str(core), "imgs": imgs, "good": good}


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "samadapt.recipes.cli", "predict", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def mask(path):
    a = np.array(Image.open(path))
    assert a.dtype == np.uint8 and set(np.unique(a)) <= {0, 255}, path
    return a > 127


_SAMS, _PREDICTORS = {}, {}


def reference(core, image_path, adapter=None, **prompt):
    """SamPredictor's single mask for the image and prompts (original-image pixels); the models and
    image embeddings are cached across tests (encoding is the slow part)."""
    key = (core, adapter)
    if key not in _SAMS:
        sam = load_sam(core)
        if adapter:
            adapters.load(sam, adapter)
        _SAMS[key] = sam
    pkey = key + (str(image_path),)
    if pkey not in _PREDICTORS:
        _PREDICTORS[pkey] = SamPredictor(_SAMS[key])
        _PREDICTORS[pkey].set_image(read_image(image_path))
    masks, _, _ = _PREDICTORS[pkey].predict(multimask_output=False, **prompt)
    assert masks.shape[0] == 1
    return masks[0]


PROMPT = dict(box=np.array(BOX, float), point_coords=np.array([p[:2] for p in POINTS], float),
              point_labels=np.array([p[2] for p in POINTS]))
PROMPT_ARGS = ["--box", ",".join(map(str, BOX))] + sum((["--point", ",".join(map(str, p))] for p in POINTS), [])


# ----------------------------------------------------------------------------- partial success (subprocess)
def test_folder_with_corrupt_image_partial_success(env):
    out = env["dir"] / "out_folder"
    r = cli(env["imgs"], "--base", env["core"], "--out", out, "--probs")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "bad.png" in errors[0], r.stderr
    names = set(os.listdir(out))
    for stem, src in env["good"].items():
        h, w = read_image(src).shape[:2]
        assert mask(out / f"{stem}.png").shape == (h, w)
        prob = np.array(Image.open(out / f"{stem}_prob.png"))
        assert prob.shape == (h, w) and prob.dtype == np.uint8
        ov = np.array(Image.open(out / f"{stem}_overlay.png"))
        assert ov.shape == (h, w, 3)
    assert not any(n.startswith("bad") for n in names)
    assert not any(n.startswith(".") for n in names), "temporary files left behind"
    # the batched (one encode_image call) promptless masks agree with SamPredictor, bar float noise
    for stem, src in env["good"].items():
        ref = reference(env["core"], src)
        assert (mask(out / f"{stem}.png") != ref).mean() < 1e-3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bad_box_exits_2_and_writes_nothing(env, capsys, monkeypatch):
    """As `python -m samadapt.recipes.cli` (the CLI module runs as __main__, with its own UserError class),
    in-process to spare a second interpreter start."""
    out = env["dir"] / "out_badbox"
    argv = [
        "samadapt",
        "predict",
        str(env["good"]["gray"]),
        "--base",
        env["core"],
        "--out",
        str(out),
        "--box",
        "1,2,3",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("samadapt.recipes.cli", run_name="__main__", alter_sys=True)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error:") and "--box" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("bad", [
    ["--box", "10,10,5,5"], ["--box", "a,b,c,d"], ["--point", "1"], ["--point", "1,2,7"],
    ["--adapter", "missing.safetensors"], ["--base", "missing.pth"], ["--batch-size", "0"],
])
def test_user_errors_exit_2(env, bad, capsys):
    out = env["dir"] / "out_user_error"
    argv = ["predict", str(env["good"]["gray"]), "--base", env["core"], "--out", str(out)] + bad
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().startswith("error:")
    assert not out.exists()


def test_out_is_a_file_or_holds_inputs(env, capsys):
    f = env["dir"] / "a_file"
    f.write_text("x")
    assert main(["predict", str(env["good"]["gray"]), "--base", env["core"], "--out", str(f)]) == 2
    assert main(["predict", str(env["imgs"]), "--base", env["core"], "--out", str(env["imgs"])]) == 2
    assert capsys.readouterr().err.count("error:") == 2
    assert f.read_text() == "x"


# ----------------------------------------------------------------------------- prompts == SamPredictor
def test_prompted_masks_equal_predictor(env):
    out = env["dir"] / "out_prompted"
    srcs = [env["good"]["gray"], env["good"]["rgb"]]
    assert main(["predict", *map(str, srcs), "--base", env["core"], "--out", str(out), "--batch-size", "1",
                 "--no-overlay", *PROMPT_ARGS]) == 0
    for src in srcs:
        got = mask(out / f"{src.stem}.png")
        assert np.array_equal(got, reference(env["core"], src, **PROMPT))
    assert sorted(os.listdir(out)) == ["gray.png", "masks.json", "rgb.png"]


@pytest.fixture(scope="module")
def adapter_file(env):
    sam = load_sam(env["core"])
    adapters.attach(sam, adapters.config("lora", r=4), name="dom", decoder="lora")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapters.adapter_parameters(sam, "dom"):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return str(adapters.save(sam, env["dir"] / "dom.safetensors", name="dom", domain="test", prompt_mode="none"))


def test_adapter_changes_masks_and_equals_predictor(env, adapter_file):
    src = env["good"]["rgb"]
    out = env["dir"] / "out_adapted"
    assert main(["predict", str(src), "--base", env["core"], "--adapter", adapter_file, "--out", str(out),
                 "--batch-size", "1", *PROMPT_ARGS]) == 0
    got = mask(out / "rgb.png")
    assert not np.array_equal(got, reference(env["core"], src, **PROMPT)), "the adapter changed nothing"
    assert np.array_equal(got, reference(env["core"], src, adapter=adapter_file, **PROMPT))
    # promptless with the promptless adapter
    out = env["dir"] / "out_adapted_promptless"
    assert main(["predict", str(src), "--base", env["core"], "--adapter", adapter_file, "--out", str(out),
                 "--batch-size", "1"]) == 0
    assert np.array_equal(mask(out / "rgb.png"), reference(env["core"], src, adapter=adapter_file))


# ----------------------------------------------------------------------------- --prompts files
def test_prompts_json_mapping(env, capsys):
    spec = {
        "gray.png": {"box": [10, 8, 60, 50], "points": [[30, 30, 1], [80, 60, 0]]},
        "rgb": {"boxes": [[10, 5, 60, 40], [40, 20, 95, 58]]},  # stem key, two masks
    }
    pf = env["dir"] / "prompts.json"
    pf.write_text(json.dumps(spec))
    out = env["dir"] / "out_json"
    assert main(["predict", str(env["imgs"]), "--base", env["core"], "--out", str(out), "--prompts", str(pf),
                 "--batch-size", "1", "--probs"]) == 0
    err = capsys.readouterr().err  # images without an entry are skipped, with one warning naming them
    warn = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "bad.png" in warn[0] and "deep16.png" in warn[0], err
    names = set(os.listdir(out))
    assert {"gray.png", "rgb_0.png", "rgb_1.png", "rgb_0_prob.png", "gray_overlay.png", "rgb_overlay.png"} <= names
    assert not any(n.startswith("deep16") for n in names)
    g = spec["gray.png"]
    ref = reference(env["core"], env["good"]["gray"], box=np.array(g["box"], float),
                    point_coords=np.array([p[:2] for p in g["points"]], float),
                    point_labels=np.array([p[2] for p in g["points"]]))
    assert np.array_equal(mask(out / "gray.png"), ref)
    for k, b in enumerate(spec["rgb"]["boxes"]):
        assert np.array_equal(
            mask(out / f"rgb_{k}.png"), reference(env["core"], env["good"]["rgb"], box=np.array(b, float))
        )


def test_prompts_coco(env):
    coco = {
        "images": [{"id": 1, "file_name": "val/rgb.jpg"}, {"id": 2, "file_name": "gray.png"}],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [10, 5, 50, 35]},
            {"id": 11, "image_id": 2, "bbox": [15, 12, 45, 33]},
            {"id": 12, "image_id": 1, "bbox": [40, 20, 55, 38]},
        ],
    }
    pf = env["dir"] / "coco.json"
    pf.write_text(json.dumps(coco))
    out = env["dir"] / "out_coco"
    srcs = [env["good"]["rgb"], env["good"]["gray"]]
    assert main(["predict", *map(str, srcs), "--base", env["core"], "--out", str(out), "--prompts", str(pf),
                 "--batch-size", "1", "--no-overlay"]) == 0
    assert sorted(os.listdir(out)) == ["gray.png", "masks.json", "rgb_0.png", "rgb_1.png"]
    xywh = lambda b: np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]], float)  # noqa: E731
    assert np.array_equal(
        mask(out / "rgb_0.png"), reference(env["core"], srcs[0], box=xywh(coco["annotations"][0]["bbox"]))
    )
    assert np.array_equal(
        mask(out / "rgb_1.png"), reference(env["core"], srcs[0], box=xywh(coco["annotations"][2]["bbox"]))
    )
    assert np.array_equal(
        mask(out / "gray.png"), reference(env["core"], srcs[1], box=xywh(coco["annotations"][1]["bbox"]))
    )


def test_bad_prompts_file_exits_2(env, capsys):
    pf = env["dir"] / "bad_prompts.json"
    pf.write_text(json.dumps({"gray.png": {"box": [1, 2, 3]}}))
    out = env["dir"] / "out_bad_prompts"
    assert (
        main(["predict", str(env["good"]["gray"]), "--base", env["core"], "--out", str(out), "--prompts", str(pf)])
        == 2
    )
    assert "box" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- --auto
def test_auto(env, adapter_file):
    try:
        from samadapt.sam_core import SamAutomaticMaskGenerator  # noqa: F401
    except (ImportError, AttributeError):
        pytest.skip("SamAutomaticMaskGenerator is not available yet")
    out = env["dir"] / "out_auto"
    src = env["good"]["rgb"]
    assert main(["predict", str(src), "--base", env["core"], "--adapter", adapter_file, "--out", str(out),
                 "--auto", "--points-per-side", "4"]) == 0
    labels = np.array(Image.open(out / "rgb_auto.png"))
    assert labels.shape == read_image(src).shape[:2]
    records = json.loads((out / "rgb_auto.json").read_text())
    assert isinstance(records, list)
    for rec in records:
        assert {"area", "bbox", "predicted_iou", "stability_score"} <= set(rec)
    assert int(labels.max()) <= len(records)
    assert (out / "rgb_overlay.png").is_file()


def test_output_names_never_collide_whatever_the_input_names(env, tmp_path, capsys):
    """Inputs named like another input's derived outputs (overlay, k-th mask, probabilities) each get their
    own files: every image's outputs are written, none overwrites another's."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    names = ["a.png", "a_overlay.png", "a_0.png", "a_prob.png", "a_0_prob.png", "A.jpg"]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(src / n)
    out = tmp_path / "out"
    prompts = {n: [{"box": [2, 2, 30, 30]}, {"box": [10, 10, 45, 35]}] for n in names[:2]}
    prompts.update({n: {"box": [3, 3, 20, 20]} for n in names[2:]})
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    assert main(["predict", str(src), "--base", env["core"], "--out", str(out), "--probs",
                 "--prompts", str(tmp_path / "p.json")]) == 0
    assert f"{len(names)} image(s) written" in capsys.readouterr().err
    # 2 images x (2 masks x 2 files + overlay) + 4 images x (mask + prob + overlay): no name was reused
    files = sorted(p.name.lower() for p in out.iterdir() if p.name != "masks.json")  # + the run's masks.json
    assert len(files) == 2 * 5 + 4 * 3 == len(set(files)), files


def test_a_sliver_image_is_segmented_and_never_fails_its_batch(env, tmp_path, capsys):
    """A 1 x 2000 image rounds to 0 px a side at the model size by SAM's rule; it is segmented (1 px high)
    in a batch with ordinary images, and an image over --max-pixels is refused alone, naming its size."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 255, (1, 2000, 3), dtype=np.uint8)).save(src / "b_sliver.png")
    Image.fromarray(rng.integers(0, 255, (60, 1, 3), dtype=np.uint8)).save(src / "c_tall.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(src / "a_plain.png")
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(src / "d_big.png")
    out = tmp_path / "out"
    code = main(["predict", str(src), "--base", env["core"], "--out", str(out), "--batch-size", "4",
                 "--max-pixels", "50000", "--no-overlay"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "d_big.png: image is 300x300 = 90,000 pixels; the limit is 50,000" in err
    assert "3 image(s) written" in err and "1 failed" in err
    assert mask(out / "b_sliver.png").shape == (1, 2000) and mask(out / "c_tall.png").shape == (60, 1)
    assert mask(out / "a_plain.png").shape == (40, 50) and not (out / "d_big.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--auto", "--points-per-side", "100000"], "--points-per-side 100000: use 1 to 64"),
    (["--max-pixels", "0"], "--max-pixels 0: use 1 or more"),
    (sum([["--point", f"{i % 40},{i % 30}"] for i in range(65)], []), "65 points in one prompt set; the limit is 64"),
])
def test_prompt_and_pixel_caps_exit_2_before_writing(env, tmp_path, argv, message):
    out = tmp_path / "out"
    r = cli(env["good"]["gray"], "--base", env["core"], "--out", out, *argv)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
