"""The training loop's hot path: what it reads back from the device, and the rate it reports.

On a GPU every read of a device tensor on the host (`.item()`, `bool(t)`, `.cpu()`, `.numpy()`, ...)
waits for the queued work to finish and leaves the GPU idle while the host catches up. There is no GPU
here, so the test marks what the loop copies to its device: `to_device` is wrapped to return tensors
of a subclass that records every host read of it and of everything computed from it (torch hands the
subclass on through each op). The loop may read at its log steps, checkpoints, evaluations and end,
and nowhere else.
"""
import json

import pytest
import torch

from samadapt.recipes import train as train_mod
from samadapt.recipes.config import load_recipe

SMALL = ["base.pretrained_tiny=false", "base.image_size=64", "data.synthetic_image_size=64",
         "data.synthetic_train_size=28", "data.synthetic_eval_size=2", "train.batch_size=4", "eval.baseline=false",
         "eval.samples=1", "train.epochs=1", "train.checkpoint_every=0", "train.log_every=1000"]

READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
         torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}


class OnDevice(torch.Tensor):
    """A tensor the loop copied to its device; `log` gets (batch number, read) for each host read."""

    log: list = []
    batch = -1

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in READS:
            OnDevice.log.append((OnDevice.batch, func.__name__))
        return super().__torch_function__(func, types, args, kwargs or {})


def _marking(real):
    def to_device(x, device):
        out = real(x, device)
        if isinstance(x, dict) and "image" in x:  # a new batch
            OnDevice.batch += 1
        if isinstance(out, dict):
            return {k: (v.as_subclass(OnDevice) if torch.is_tensor(v) else v) for k, v in out.items()}
        return out.as_subclass(OnDevice) if torch.is_tensor(out) else out
    return to_device


@pytest.mark.parametrize("setting", [
    [],  # promptless (SAM-Adapter's camouflage and shadow recipes)
    ["prompts.mode=box+points", "prompts.n_pos=2", "prompts.n_neg=1"],
    ["prompts.keep_prompts=0.5", "prompts.keep_prompts_data=self"],  # one object of the batch's own masks
    ["adapter.kinds=[{kind: lora, r: 4, use_dora: true}]", "adapter.decoder=lora"],  # peft's layers
])
def test_the_loop_reads_from_the_device_only_where_it_logs(tmp_path, monkeypatch, setting):
    monkeypatch.setattr(OnDevice, "log", [])
    monkeypatch.setattr(OnDevice, "batch", -1)
    monkeypatch.setattr(train_mod, "to_device", _marking(train_mod.to_device))
    cfg = load_recipe("demo", SMALL + setting)
    train_mod.train(cfg, out_dir=str(tmp_path / "run"), progress=False, log=lambda *a: None)
    batches = 28 // 4
    assert OnDevice.batch == batches - 1, OnDevice.batch  # the precondition: every batch went through to_device
    at = {}
    for b, name in OnDevice.log:
        at.setdefault(b, []).append(name)
    # batch 0 is step 1, which logs (`.item()` of the loss and its terms): the marking sees reads at all
    assert "item" in at.get(0, []), OnDevice.log
    # the last batch is followed by the end-of-epoch check, evaluation and checkpoint
    between = {b: names for b, names in at.items() if 0 < b < batches - 1}
    assert between == {}, between


def test_correction_rounds_read_the_prediction_back(tmp_path, monkeypatch):
    """The marking finds a read where there must be one: a correction click is drawn from the previous
    round's prediction on the host (as SAM's interactive training does), every step."""
    monkeypatch.setattr(OnDevice, "log", [])
    monkeypatch.setattr(OnDevice, "batch", -1)
    monkeypatch.setattr(train_mod, "to_device", _marking(train_mod.to_device))
    cfg = load_recipe("demo", SMALL + ["prompts.mode=box", "prompts.correction_rounds=1",
                                       "data.synthetic_train_size=12"])
    train_mod.train(cfg, out_dir=str(tmp_path / "run"), progress=False, log=lambda *a: None)
    assert {b for b, _ in OnDevice.log} >= {0, 1, 2}, OnDevice.log


def test_non_finite_loss_is_named_with_its_own_step_although_checked_later(tmp_path, monkeypatch):
    """The check is deferred to the log step, but names the step whose loss went bad first, and nothing
    is written from the state after it (no adapter, no checkpoint)."""
    real = train_mod.CombinedLoss.__call__
    calls = []

    def poisoned(self, logits, target, iou):
        loss, terms = real(self, logits, target, iou)
        calls.append(1)
        return (loss * float("nan"), terms) if len(calls) == 3 else (loss, terms)

    monkeypatch.setattr(train_mod.CombinedLoss, "__call__", poisoned)
    cfg = load_recipe("demo", SMALL + ["train.log_every=5"])
    from samadapt.recipes.errors import TrainingError

    with pytest.raises(TrainingError) as e:
        train_mod.train(cfg, out_dir=str(tmp_path / "run"), progress=False, log=lambda *a: None)
    assert str(e.value).startswith("loss became nan at step 2;"), str(e.value)  # the third step: 0-based 2
    assert "no checkpoint was written yet" in str(e.value)
    assert len(calls) == 5  # it ran on to the log step (step 5) before it could know
    run = tmp_path / "run"
    assert not (run / "adapter.safetensors").exists() and not list(run.glob("checkpoints/*"))


def test_the_trainer_reports_its_rate(tmp_path):
    cfg = load_recipe("demo", SMALL + ["train.log_every=1", "data.synthetic_train_size=40"])
    lines = []
    metrics = train_mod.train(cfg, out_dir=str(tmp_path / "run"), progress=False, log=lines.append)
    speed = metrics["speed"]
    assert speed["steps"] == 10 - 5 and speed["warmup_steps"] == 5  # steps 5..10 timed: 5 spans
    assert speed["images_per_s"] == pytest.approx(speed["steps"] * 4 / speed["seconds"], rel=1e-3)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["speed"] == speed
    assert any(ln.startswith("training: ") and "images/s over 5 steps" in ln for ln in lines), lines


def test_uint8_training_items_train_exactly_as_float32_ones(tmp_path, monkeypatch):
    """The trainer's items are uint8 (a quarter of the bytes to batch, pin and copy); the values are the
    float32 items' and so is the trained adapter, bit for bit."""
    from safetensors.torch import load_file

    cfg = load_recipe("demo", SMALL + ["prompts.keep_prompts=0.5"])
    tr, ev = train_mod.build_datasets(cfg, 64)
    assert tr[0]["image"].dtype == torch.uint8 and tr[0]["mask"].dtype == torch.uint8
    assert ev[0]["image"].dtype == torch.float32
    real = train_mod.build_datasets
    quiet = dict(progress=False, log=lambda *a: None)
    train_mod.train(cfg, out_dir=str(tmp_path / "uint8"), **quiet)

    def float_items(*a, **k):
        tr, ev = real(*a, **k)
        tr.dtype = torch.float32
        return tr, ev

    monkeypatch.setattr(train_mod, "build_datasets", float_items)
    train_mod.train(cfg, out_dir=str(tmp_path / "float32"), **quiet)
    a = load_file(str(tmp_path / "uint8" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "float32" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in a.values())  # it trained at all
