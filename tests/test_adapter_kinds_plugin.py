"""A new adapter kind from outside the package, installed through the `samadapt.adapter_kinds` entry
point, goes through the whole lifecycle -- and adding it changes no file of samadapt."""
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samadapt import adapters
from samadapt.sam_core import build_sam

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).resolve().parent / "plugins" / "samadapt_scale_kind.py"
IMG = (torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3)) * 255).round()
BOX = torch.tensor([[70.0, 50.0, 210.0, 150.0]])


def package_hashes():
    """sha256 of every file under the three package folders."""
    out = {}
    for folder in ("adapters", "sam_core", "recipes"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                out[str(p.relative_to(ROOT))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


SHIFT_MODULE = """
from dataclasses import dataclass
from typing import ClassVar

import samadapt_scale_kind as scale
from samadapt import adapters


@dataclass
class ShiftConfig(scale.ScaleConfig):
    kind: ClassVar[str] = "shift"


# not registered here: the entry point names this object, and samadapt registers it
SPEC = adapters.KindSpec("shift", ShiftConfig, scale.inject, scale.remove, owns=lambda k: ".samadapt_scale." in k)
"""


def write_site(tmp_path: Path) -> Path:
    """A site directory as pip would leave it: the plugin modules plus their `.dist-info` (METADATA
    and entry_points.txt): one entry point names a module that registers its kind on import, one
    names a `KindSpec` object, and a broken distribution's entry point cannot be imported."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(PLUGIN, site / PLUGIN.name)
    (site / "samadapt_shift_kind.py").write_text(SHIFT_MODULE)
    dists = {"samadapt_scale_kind": "scale = samadapt_scale_kind",
             "samadapt_shift_kind": "shift = samadapt_shift_kind:SPEC",
             "samadapt_broken_kind": "broken = samadapt_broken_kind_missing_module"}
    for dist, ep in dists.items():
        info = site / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[samadapt.adapter_kinds]\n{ep}\n")
    return site


@torch.no_grad()
def outputs(sam):
    return sam.forward_masks(IMG, boxes=BOX, multimask_output=True)


def env_with(site: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="module")
def scale_site(tmp_path_factory):
    """The plugins installed on sys.path and loaded through their entry points, once per module (an
    entry point is loaded once per process); unregistered afterwards."""
    site = write_site(tmp_path_factory.mktemp("plugins"))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        importlib.invalidate_caches()
        for mod in ("samadapt_scale_kind", "samadapt_shift_kind"):
            mp.delitem(sys.modules, mod, raising=False)
        with pytest.warns(RuntimeWarning, match="'broken'.*samadapt_broken_kind_missing_module"):
            loaded = adapters.load_plugins()
        assert sorted(loaded) == ["scale", "shift"]
        assert adapters.KINDS["shift"] is sys.modules["samadapt_shift_kind"].SPEC  # a KindSpec entry point
        assert adapters.load_plugins() == []  # each entry point is loaded once
        yield site
        for kind in ("scale", "shift"):
            adapters.unregister_kind(kind)
        for mod in ("samadapt_scale_kind", "samadapt_shift_kind"):
            sys.modules.pop(mod, None)


def test_plugin_kind_lifecycle(scale_site, tiny_sam, tmp_path):
    before = package_hashes()
    sam = tiny_sam
    assert "scale" in adapters.KINDS
    ref = outputs(sam)
    adapters.attach(sam, adapters.config("scale", blocks=[0, 1]), name="sc")
    # a fresh adapter is a no-op, bit for bit
    for x, y in zip(outputs(sam), ref):
        assert torch.equal(x, y)
    own = adapters.adapter_parameters(sam, "sc")
    assert len(own) == 4 and adapters.trainable_summary(sam)["by_kind"] == {"scale": sum(p.numel() for p in own)}

    # one optimiser step: only the kind's parameters get gradients and change
    start = {n: p.detach().clone() for n, p in sam.named_parameters()}
    opt = torch.optim.SGD([p for p in sam.parameters() if p.requires_grad], lr=0.1)
    low, iou = sam.forward_masks(IMG, boxes=BOX, multimask_output=True)
    (low.square().mean() + iou.sum()).backward()
    opt.step()
    own_ids = {id(p) for p in own}
    for n, p in sam.named_parameters():
        if id(p) in own_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p, start[n]), n
        else:
            assert p.grad is None, n
            assert torch.equal(p, start[n]), n
    trained = outputs(sam)
    assert any(not torch.equal(x, y) for x, y in zip(trained, ref))

    # save, load into a fresh core: bit-exact tensors and equal outputs
    path = adapters.save(sam, tmp_path / "sc.safetensors", name="sc")
    torch.manual_seed(0)
    other = build_sam("tiny").eval()
    adapters.load(other, path)
    saved, got = adapters.adapter_state_dict(sam, "sc"), adapters.adapter_state_dict(other, "sc")
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    for x, y in zip(outputs(other), trained):
        assert torch.equal(x, y)

    # inspect labels the tensors with the kind's name
    meta = adapters.inspect(path)
    assert meta["parameters_by_kind"] == {"scale": sum(v.numel() for v in saved.values())}
    assert sorted(meta["tensors_by_kind"]["scale"]) == sorted(saved)

    # the CLI, in a fresh interpreter that finds the plugin only through its entry point
    run = subprocess.run([sys.executable, "-m", "samadapt.recipes.cli", "inspect", str(path)],
                         env=env_with(scale_site), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "kind scale" in run.stdout
    row = [line for line in run.stdout.splitlines() if line.split()[:1] == ["scale"]]
    assert row and f"{meta['parameters_by_kind']['scale']:,} parameters" in row[0], run.stdout
    run = subprocess.run([sys.executable, "-m", "samadapt.recipes.cli", "inspect", "--json", str(path)],
                         env=env_with(scale_site), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(json.loads(run.stdout)["tensors_by_kind"]["scale"]) == sorted(saved)

    assert package_hashes() == before  # adding a kind touched no file of samadapt


def test_plugins_load_lazily_and_a_broken_one_only_warns(tmp_path):
    """`import samadapt.adapters` does not read entry points; the first lookup does, and a plugin
    that fails to import is a warning naming it, not a crash."""
    site = write_site(tmp_path)
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('always')\n"
        "from samadapt import adapters\n"
        "print('before', 'samadapt_scale_kind' in sys.modules)\n"
        "cfg = adapters.config('scale', blocks=[0])\n"
        "print('after', 'samadapt_scale_kind' in sys.modules, type(cfg).__name__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env_with(site), capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "before False" in run.stdout and "after True ScaleConfig" in run.stdout, run.stdout
    assert "'broken'" in run.stderr and "samadapt_broken_kind_missing_module" in run.stderr, run.stderr


def test_a_kind_must_own_the_tensors_it_injects(scale_site, tiny_sam):
    """Labels come from `KindSpec.owns`: a kind whose `owns` does not claim its tensors is refused at
    attach, and the failed attach leaves the model as it was."""
    scale = sys.modules["samadapt_scale_kind"]
    spec = adapters.unregister_kind("scale")
    adapters.register_kind(adapters.KindSpec("scale", scale.ScaleConfig, scale.inject, scale.remove,
                                             owns=lambda k: False))
    try:
        with pytest.raises(adapters.AdapterError, match="does not claim"):
            adapters.attach(tiny_sam, adapters.config("scale"), name="bad")
        assert adapters.attached(tiny_sam) == []
        assert not any("samadapt_scale" in n for n, _ in tiny_sam.named_modules())
    finally:
        adapters.unregister_kind("scale")
        adapters.register_kind(spec)


def test_duplicate_kind_is_refused():
    spec = adapters.KINDS["lora"]
    clone = adapters.KindSpec("lora", spec.config_cls, spec.inject, spec.remove)
    with pytest.raises(adapters.AdapterError, match=r"'lora' is already registered.*another name"):
        adapters.register_kind(clone)
    assert adapters.KINDS["lora"] is spec  # the first registration stands
    with pytest.raises(adapters.AdapterError, match="already registered"):
        adapters.register_kind(adapters.DECODER_KINDS["full"])
