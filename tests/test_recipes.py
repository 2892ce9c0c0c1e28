"""Recipes: validation, the CLI's user errors, exact resume after SIGKILL, multi-process launch."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from samadapt.recipes.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["base.pretrained_tiny=false", "data.synthetic_train_size=16", "data.synthetic_eval_size=4",
         "train.batch_size=4", "eval.baseline=false", "eval.samples=1", "data.synthetic_image_size=128",
         "base.image_size=128"]


def run_cli(*args, cwd=None, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "samadapt.recipes.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=env)


@pytest.mark.parametrize("name", ["demo", "camouflage", "shadow", "polyp", "tiny_pretrain"])
def test_builtin_recipes_validate(name):
    cfg = load_recipe(name)
    assert cfg["name"]
    # every key the schema knows is present after validation
    assert set(cfg["train"]) >= {"lr", "epochs", "batch_size"}


def test_recipe_errors_suggest_nearest_key():
    with pytest.raises(RecipeError, match=r"unknown key 'train.lerning_rate'|did you mean"):
        load_recipe("demo", ["train.lerning_rate=1"])
    with pytest.raises(RecipeError, match="did you mean 'train.lr'"):
        load_recipe("demo", ["train.lt=1"])
    with pytest.raises(RecipeError, match="should be a float"):
        load_recipe("demo", ["train.lr=fast"])
    with pytest.raises(RecipeError, match="not one of"):
        load_recipe("demo", ["adapter.decoder=half"])
    with pytest.raises(RecipeError, match="unknown adapter kind"):
        load_recipe("demo", ["adapter.kinds=[{kind: lorra}]"])
    assert load_recipe("demo", ["train.lr=1e-4"])["train"]["lr"] == 1e-4


def _no_output(path: Path):
    assert not path.exists(), f"{path} was created: {list(path.rglob('*'))}"


def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    from samadapt.recipes.data.synthetic import write_synthetic_folder

    out = tmp_path / "run"
    cases = []
    cases.append(("missing data folder", ["train", "demo", "--data", str(tmp_path / "nope"), "--out", str(out)]))
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    cases.append(("empty dataset", ["train", "demo", "--data", str(empty), "--out", str(out)]))
    unpaired = tmp_path / "unpaired"
    write_synthetic_folder("camouflage", unpaired, 3, 64, 0)
    victim = sorted((unpaired / "masks").iterdir())[0]
    victim.unlink()
    cases.append(("images without masks", ["train", "demo", "--data", str(unpaired), "--out", str(out),
                                           "--set", "base.pretrained_tiny=false"]))
    cases.append(("misspelt key", ["train", "demo", "--set", "train.epocs=2", "--out", str(out)]))
    cases.append(("unknown recipe", ["train", "nosuchrecipe", "--out", str(out)]))
    # a checkpoint of another arch than the recipe's
    from samadapt.sam_core import build_sam
    ck = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny").state_dict(), ck)
    cases.append(
        ("other arch", ["train", "camouflage", "--base", str(ck), "--data", str(unpaired), "--out", str(out)])
    )
    cases.append(("bad adapter file", ["inspect", str(ck)]))
    for what, args in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (what, r.returncode, r.stderr[-2000:])
        lines = [
            ln for ln in r.stderr.strip().splitlines()
            if not ln.startswith(("WARNING", "warn")) and "Warning" not in ln
        ]
        assert lines and lines[-1].startswith("error: "), (what, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (what, r.stderr[-2000:])
        _no_output(out)
    assert victim.stem in run_cli(*cases[2][1]).stderr  # the unpaired image is named


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    # the largest learning rate the schema allows, unclipped, drives the loss to NaN after a few steps
    r = run_cli("train", "demo", "--out", str(out), "--quiet", *sum([["--set", s] for s in SMALL], []),
                "--set", "train.lr=10", "--set", "train.checkpoint_every=1", "--set", "train.epochs=4",
                "--set", "train.max_grad_norm=0.0", "--set", "train.warmup_steps=0")
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: loss became") and "at step" in err and "Traceback" not in r.stderr
    cks = sorted((out / "checkpoints").glob("step_*"))
    assert cks, "the last good checkpoint must be kept"
    step = int(err.split("at step ")[1].split(";")[0])
    assert int(cks[-1].name.split("_")[1]) <= step


def test_multimask_trains_each_samples_best_candidate():
    """Of 3 candidate masks, each sample keeps its own lowest-loss one (SAM's rule), not one index
    for the whole batch; gradients reach only the picked candidates."""
    from samadapt.recipes.losses import CombinedLoss, pick_multimask

    loss_fn = CombinedLoss({"focal": 20.0, "dice": 1.0, "iou_mse": 1.0})
    target = torch.zeros(3, 1, 16, 16)
    target[0, :, :8] = 1
    target[1, :, :, :8] = 1
    target[2, :, 4:12, 4:12] = 1
    cands = [t[0] * 2 - 1 for t in target]  # candidate j is sample j's mask as logits (+-1)
    best = [2, 0, 1]  # put sample b's own mask at candidate index best[b]
    logits = torch.zeros(3, 3, 16, 16)
    for b in range(3):
        others = [j for j in range(3) if j != b]
        order = {best[b]: b}
        order.update({j: o for j, o in zip([j for j in range(3) if j != best[b]], others)})
        for j in range(3):
            logits[b, j] = cands[order[j]] * 8
    logits.requires_grad_(True)
    iou = torch.full((3, 3), 0.5, requires_grad=True)
    picked, picked_iou = pick_multimask(logits, iou, target, loss_fn)
    assert picked.shape == (3, 1, 16, 16) and picked_iou.shape == (3,)
    for b in range(3):
        assert torch.equal(picked[b, 0], logits[b, best[b]])
    loss_fn(picked, target, picked_iou)[0].backward()
    for b in range(3):
        for j in range(3):
            assert (logits.grad[b, j].abs().sum() > 0) == (j == best[b])


def test_encoder_attention_routes_and_compile(tmp_path, monkeypatch):
    """train.attention picks the encoder's attention route (the same function: the same losses and
    adapter); train.compile runs the encoder compiled. On CPU the triton route takes SDPA."""
    from samadapt.recipes.model import set_encoder_attention
    from samadapt.sam_core import build_sam
    from samadapt.sam_core.fast import fast_attention_enabled

    sam = build_sam("tiny", image_size=128)
    cpu = torch.device("cpu")
    assert set_encoder_attention(sam, "auto", cpu) == "as built" and not fast_attention_enabled(sam)
    assert set_encoder_attention(sam, "triton", cpu) == "triton"
    assert fast_attention_enabled(sam) and {b.attn._fast_kernel for b in sam.image_encoder.blocks} == {
        "triton",
        "sdpa",
    }
    capability = {"cc": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cc"])
    assert set_encoder_attention(sam, "auto", torch.device("cuda", 0)) == "triton"
    assert set_encoder_attention(sam, "auto", torch.device("cuda", 0), bf16=False) == "sdpa"
    capability["cc"] = (7, 5)  # no bf16 matrix units for Triton before Ampere
    assert set_encoder_attention(sam, "auto", torch.device("cuda", 0)) == "sdpa"
    monkeypatch.undo()
    assert set_encoder_attention(sam, "timm", cpu) == "timm" and not fast_attention_enabled(sam)

    common = ["--quiet", *sum([["--set", s] for s in SMALL], []), "--set", "train.epochs=1", "--set", "train.seed=3",
              "--set", "data.synthetic_train_size=8"]
    runs = {}
    for label, extra in (("timm", ["--set", "train.attention=timm"]),
                         ("sdpa+compile", ["--set", "train.attention=sdpa", "--set", "train.compile=true"])):
        out = tmp_path / label.replace("+", "_")
        r = run_cli("train", "demo", "--out", str(out), *common, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[label] = _adapter_tensors(out / "adapter.safetensors")
    a, b = runs["timm"], runs["sdpa+compile"]
    assert a.keys() == b.keys() and a
    for k in a:  # 2 optimizer steps through another attention route and a compiled encoder
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    r = run_cli("train", "demo", "--out", str(tmp_path / "bad"), *common, "--set", "train.attention=flash")
    assert r.returncode == 2 and "train.attention='flash' is not one of" in r.stderr and "Traceback" not in r.stderr


def _adapter_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_resume_after_sigkill_is_exact(tmp_path):
    common = ["--quiet", *sum([["--set", s] for s in SMALL], []), "--set", "train.epochs=3",
              "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=10"]
    full = tmp_path / "full"
    r = run_cli("train", "demo", "--out", str(full), *common)
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen(
        [sys.executable, "-m", "samadapt.recipes.cli", "train", "demo", "--out", str(killed), *common],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed / "checkpoints").glob("step_00000004")):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list((killed / "checkpoints").glob("step_*")), "no checkpoint before the kill"
    r = run_cli("train", "demo", "--out", str(killed), "--resume", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _adapter_tensors(full / "adapter.safetensors"), _adapter_tensors(killed / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # nothing half written: no temporary names left anywhere
    assert not [p for p in killed.rglob("*") if p.name.startswith(".") and "tmp" in p.name]


def test_accelerate_launch_two_processes(tmp_path):
    """`accelerate launch --config_file recipes/configs/accelerate/ddp.yaml` starts two processes that form
    one group (the old `--num_processes 2 --cpu` started one). tests/test_distributed.py checks the rest."""
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "configs" / "accelerate" / "ddp.yaml"), "-m", "samadapt.recipes.cli", "train",
           "demo", "--out", str(out), "--quiet", *sum([["--set", s] for s in SMALL], []), "--set", "train.epochs=1",
           "--set", "train.batch_size=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["distributed"] == {"strategy": "ddp", "num_processes": 2, "num_machines": 1}
    assert "distributed: ddp, 2 processes on 1 machines (backend gloo)" in r.stdout
    assert m["history"] and m["history"][-1]["step"] == 16 // 4  # 16 images, 2 processes x 2 per step
    assert [f.name for f in out.glob("*.safetensors")] == ["adapter.safetensors"]
    assert "warning: accelerate launch says" not in r.stderr  # the launch and the recipe agree


def test_every_config_opens_with_its_command():
    """Each built-in recipe opens with the command that runs it, and the name lookup reads recipes/configs/."""
    from samadapt.recipes.config import BUILTIN, resolve_path

    files = sorted(BUILTIN.glob("*.yaml"))
    assert BUILTIN.name == "configs" and {f.stem for f in files} >= {"demo", "camouflage", "shadow", "polyp",
                                                                     "tiny_pretrain"}
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("# samadapt ") and (f.stem in first or "demo" in first), (f.name, first)
        assert resolve_path(f.stem) == f


def test_recipe_choices_are_the_registries():
    """A recipe accepts exactly what the registries define: no copied lists to fall out of step."""
    from samadapt import adapters
    from samadapt.recipes import config, data, losses, metrics
    from samadapt.recipes.data import augment, prompts, synthetic
    from samadapt.sam_core import ARCHS

    ch = config.CHOICES
    assert ch[("base", "arch")] == list(ARCHS)
    assert ch[("adapter", "decoder")] == ["frozen", *adapters.DECODER_KINDS]
    assert set(ch[("adapter", "decoder")]) >= set(adapters.DECODER_POLICIES)
    assert ch[("data", "layout")] == ["auto", *data.LAYOUTS]
    assert ch[("data", "synthetic")] == [None, *synthetic.SYNTHETIC_DOMAINS]
    assert ch[("augment", "domain")] == [None, *augment.DOMAINS]
    assert ch[("prompts", "mode")] == list(prompts.PROMPT_MODES)
    assert config.ADAPTER_KINDS == list(adapters.KINDS)
    assert config.METRIC_NAMES == list(metrics.METRICS)
    assert list(config.SCHEMA["loss"]) == list(losses.RECIPE_LOSSES)
    assert set(losses.RECIPE_LOSSES) <= set(losses.LOSSES)
    # and validation uses them: every registered value is accepted, a value outside is refused
    for key, values in ch.items():
        dotted = ".".join(key)
        for v in values:
            if v is not None and key != ("base", "arch"):  # other archs would need their checkpoints to run
                assert load_recipe("demo", [f"{dotted}={v}"])[key[0]][key[1]] == v
        with pytest.raises(RecipeError, match="is not one of"):
            load_recipe("demo", [f"{dotted}=no_such_value"])
    for kind in adapters.KINDS:
        assert load_recipe("demo", [f"adapter.kinds=[{{kind: {kind}}}]"])["adapter"]["kinds"] == [{"kind": kind}]
    for m in metrics.METRICS:
        assert load_recipe("demo", [f"eval.select={m}"])["eval"]["select"] == m
    for name in losses.RECIPE_LOSSES:
        assert load_recipe("demo", [f"loss.{name}=2"])["loss"][name] == 2.0


def _quiet_train(cfg, out, **kw):
    from samadapt.recipes.train import train

    return train(cfg, out_dir=str(out), progress=False, log=lambda *a: None, **kw)


def _logged(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(Path(run_dir, "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


@pytest.mark.parametrize("warm", [3, 0])  # 0: the main schedule alone, without the SequentialLR around it
@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_learning_rate_follows_the_schedule(tmp_path, kind, warm):
    """The LR logged after each optimizer step is the schedule's: linear warmup `(k + 1) / warmup`, then
    cosine to 0 at the last step (or constant). A scheduler that is never stepped logs one LR throughout."""
    import math

    lr = 1e-3
    cfg = load_recipe("demo", SMALL + ["train.epochs=2", f"train.lr={lr}", f"train.warmup_steps={warm}",
                                       f"train.scheduler={kind}", "train.log_every=1", "train.checkpoint_every=0"])
    _quiet_train(cfg, tmp_path / "run")
    total = 2 * 16 // 4  # 16 images, batch 4, 2 epochs

    def expected(k):  # the factor of the k-th step (0-based)
        if k < warm:
            return (k + 1) / warm
        return 1.0 if kind == "constant" else 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))

    lrs = _logged(tmp_path / "run", "lr")
    assert sorted(lrs) == list(range(1, total + 1)), lrs
    for step, value in lrs.items():  # logged after `step` steps: the LR of the next one
        assert value == pytest.approx(lr * expected(step), rel=1e-5, abs=1e-12), (step, value, lrs)


def test_resume_restores_the_rng(tmp_path):
    """With LoRA dropout, every step after the resume point draws random masks: the resumed run equals the
    uninterrupted one only if the checkpoint's RNG state is restored."""
    from safetensors.torch import load_file

    common = SMALL + ["adapter.kinds=[{kind: lora, r: 4, dropout: 0.5}]", "train.scheduler=constant",
                      "train.checkpoint_every=0", "train.keep_checkpoints=0"]
    _quiet_train(load_recipe("demo", common + ["train.max_steps=8"]), tmp_path / "full")
    _quiet_train(load_recipe("demo", common + ["train.max_steps=4"]), tmp_path / "cut")  # ends at a checkpoint
    _quiet_train(load_recipe("demo", common + ["train.max_steps=8"]), tmp_path / "cut", resume=True)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_00000008" / "trained.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "step_00000008" / "trained.safetensors"))
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # checkpoints hold what trains (adapter + decoder), never a copy of the frozen core
    ck = tmp_path / "cut" / "checkpoints" / "step_00000008"
    assert not [f.name for f in ck.iterdir() if f.name.startswith(("model", "pytorch_model"))]
    assert a and all("camo-demo" in k for k in a), sorted(a)[:5]


def test_launch_mixed_precision_wins_over_the_recipe(tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision` decides; a recipe that disagrees gets a warning line."""
    from samadapt.recipes.train import launched_mixed_precision

    lines = []
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launched_mixed_precision("bf16", lines.append) == "bf16" and not lines
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert launched_mixed_precision("bf16", lines.append) == "bf16" and not lines
    assert launched_mixed_precision("no", lines.append) == "bf16"
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "train.mixed_precision=no" in lines[0]
    monkeypatch.undo()

    out = tmp_path / "bf16"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "samadapt.recipes.cli", "train", "demo",
           "--out", str(out), "--quiet", *sum([["--set", s] for s in SMALL], []), "--set", "train.max_steps=1",
           "--set", "train.mixed_precision=no"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    says = "warning: accelerate launch says --mixed_precision bf16"
    warned = [line for line in r.stderr.splitlines() if line.startswith(says)]
    assert len(warned) == 1, r.stderr[-4000:]
    import yaml
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["mixed_precision"] == "bf16"


def test_run_directory_is_locked(tmp_path):
    from samadapt.recipes.checkpointing import run_lock
    from samadapt.recipes.errors import TrainingError

    with run_lock(tmp_path / "run"):
        with pytest.raises(TrainingError, match="in use by another run"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released on exit
        pass


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    from samadapt.recipes.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"samadapt {version('samadapt')}\n"


def test_tensorboard_gets_overlays_and_hparams(tmp_path):
    """Next to the scalars, TensorBoard shows each evaluation's overlays (image | ground truth | frozen |
    adapted, the same rows as samples/*.png) and the recipe as hyperparameters."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_recipe("demo", SMALL + ["train.epochs=1", "eval.samples=2"])
    _quiet_train(cfg, tmp_path / "run")
    images, hparams = {}, {}
    for events in sorted(Path(tmp_path / "run", "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags().get("images", []):
            images[tag] = acc.Images(tag)
        try:
            hparams.update(acc.PluginTagToContent("hparams"))
        except KeyError:  # this events file holds no hyperparameters
            pass
    pngs = sorted((tmp_path / "run" / "samples").rglob("*.png"))
    assert len(pngs) == 2 and len(images) == 2, (pngs, list(images))
    for png in pngs:
        ev = images[f"samples/{png.stem}"][-1]
        assert (ev.width, ev.height) == Image.open(png).size  # the same overlay row
    assert "_hparams_/session_start_info" in hparams, hparams
    logged = (tmp_path / "run" / "logs").rglob("hparams.yml")
    import yaml

    values = yaml.safe_load(next(iter(logged)).read_text())
    assert values["train/lr"] == cfg["train"]["lr"] and values["adapter/decoder"] == cfg["adapter"]["decoder"]


@pytest.mark.parametrize("source", ["self", "objects"])
def test_keep_prompts_mixes_prompted_batches_into_promptless_training(tmp_path, monkeypatch, source):
    """`prompts.keep_prompts` turns that share of a promptless recipe's batches into prompted ones: a box
    or a click on one object, of the recipe's own masks (`self`) or of another dataset (`objects`)."""
    import torch

    from samadapt.recipes import model as model_mod
    from samadapt.recipes.data.pipeline import build_keep_prompts_data

    seen = []
    orig = model_mod.TrainStep.forward

    def spy(self, images, point_coords=None, point_labels=None, boxes=None, gt=None, **kw):
        seen.append((point_coords is not None or boxes is not None, images.detach().clone(), gt.detach().clone()))
        return orig(self, images, point_coords, point_labels, boxes, gt=gt, **kw)

    monkeypatch.setattr(model_mod.TrainStep, "forward", spy)
    cfg = load_recipe("demo", SMALL + ["train.epochs=4", "prompts.keep_prompts=0.5",
                                       f"prompts.keep_prompts_data={source}"])
    _quiet_train(cfg, tmp_path / "run")
    assert len(seen) == 16 and 0 < sum(p for p, _, _ in seen) < 16, [p for p, _, _ in seen]
    if source == "objects":  # prompted batches are scenes of the keep_prompts data, the others are not
        keep = build_keep_prompts_data(cfg, 128)
        pool = [keep[j]["image"].float() for j in range(len(keep))]
        for prompted, images, _ in seen:
            hits = [any(torch.equal(img.float(), q) for q in pool) for img in images]
            assert all(hits) if prompted else not any(hits)
    else:  # one object of the batch's own masks: a prompted target is one connected component
        import cv2
        import numpy as np

        def parts(m):
            return cv2.connectedComponents((m[0] > 0.5).numpy().astype(np.uint8), connectivity=8)[0] - 1

        assert all(parts(m) <= 1 for p, _, g in seen if p for m in g)
        assert any(parts(m) > 1 for p, _, g in seen if not p for m in g)  # the recipe's own masks have several
