"""`samadapt inspect` reads the header without torch: the table, `--tensors`, and what a non-adapter file is."""
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from samadapt import adapters
from samadapt.recipes.inspect import inspect_file
from samadapt.recipes.model import TINY_CORE
from samadapt.sam_core import build_sam

# A fresh interpreter in which importing torch raises: `samadapt inspect` must still work.
NO_TORCH = r"""
import sys, time
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, NoTorch())
def hwm():  # this process's peak resident memory (ru_maxrss would carry the forking parent's peak over)
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
t0 = time.perf_counter()
from samadapt.recipes.cli import main
rc = main(sys.argv[1:])
sys.stdout.flush()
print(f"@@ rc={rc} seconds={time.perf_counter() - t0:.3f} maxrss_kb={hwm()} "
      f"torch={'torch' in sys.modules}", file=sys.stderr)
"""


def no_torch_cli(*args):
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], capture_output=True, text=True, timeout=120)
    stats = [ln for ln in r.stderr.splitlines() if ln.startswith("@@ ")]
    assert stats, r.stderr[-3000:]  # the script ran to its end: main returned, no ImportError escaped
    fields = dict(kv.split("=") for kv in stats[-1][3:].split())
    return r, fields


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    sam = build_sam("tiny")
    adapters.attach(sam, [adapters.config("lora", r=2), adapters.config("sam_adapter"), adapters.config("bottleneck")],
                    name="combo", decoder="full")
    return adapters.save(sam, tmp_path_factory.mktemp("a") / "combo.safetensors", name="combo", domain="camouflage")


def test_inspect_runs_with_torch_blocked_fast_and_small(adapter_file):
    """The table of every field, with `import torch` raising: under a second, small memory."""
    r, stats = no_torch_cli("inspect", adapter_file)
    assert r.returncode == 0 and stats["rc"] == "0", r.stderr[-2000:]
    assert stats["torch"] == "False"
    print(f"inspect without torch: {stats['seconds']} s, max RSS {int(stats['maxrss_kb']) / 1024:.0f} MiB")
    assert float(stats["seconds"]) < 1.0, stats
    assert int(stats["maxrss_kb"]) < 150 * 1024, stats  # torch alone costs several hundred MB
    lib = adapters.inspect(adapter_file)  # the library's reader (with torch) gives the reference numbers
    rows = {re.split(r"\s{2,}", ln.strip())[0]: ln for ln in r.stdout.splitlines()}
    for k in ("name", "format", "domain", "prompt_mode", "samadapt_version", "dtype"):
        assert rows[k].split()[-1] == str(lib[k]), (k, r.stdout)
    assert f"fingerprint {lib['base']['fingerprint']}" in rows["base"]
    assert rows["decoder"].split()[-1] == "full"
    assert f"{lib['tensors']} tensors, {lib['parameters']:,} parameters" in rows["tensors"]
    for kind, n in lib["parameters_by_kind"].items():
        assert f"{n:,} parameters" in rows[kind], (kind, r.stdout)
    size = f"{lib['file_bytes']:,} bytes ({lib['tensor_bytes']:,} tensor + {lib['header_bytes']:,} header)"
    assert size in rows["size"]
    for k in ("kind lora", "kind sam_adapter", "kind bottleneck"):
        assert k in rows


@pytest.mark.parametrize("fixture", ["v1_bottleneck_evp_lora", "v1_lora_dora_declora"])
def test_torch_free_summary_equals_the_library_inspect(fixture, adapter_file):
    """Same labels, counts and non-finite list as `samadapt.adapters.inspect` (which reads with torch)."""
    from pathlib import Path

    for path in (Path(__file__).parent / "fixtures" / f"{fixture}.safetensors", adapter_file):
        mine, lib = inspect_file(path), adapters.inspect(path)
        for k in lib:
            assert mine[k] == lib[k], (path, k)


def test_tensors_flag_lists_names_shapes_dtypes(adapter_file):
    r, stats = no_torch_cli("inspect", "--tensors", adapter_file)
    assert stats["rc"] == "0" and stats["torch"] == "False", r.stderr
    listed = {}
    for ln in r.stdout.splitlines():
        parts = ln.split()
        if len(parts) == 3 and parts[2] in ("F32", "F16", "BF16"):
            listed[parts[0]] = (parts[1], parts[2])
    with safe_open(str(adapter_file), "pt") as f:
        expected = {k: ("x".join(map(str, f.get_slice(k).get_shape())), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert listed == expected and len(listed) == 174
    r, _ = no_torch_cli("inspect", "--json", "--tensors", adapter_file)
    tl = json.loads(r.stdout)["tensor_list"]
    assert {t["name"]: ("x".join(map(str, t["shape"])), t["dtype"]) for t in tl} == expected


def test_core_checkpoint_is_named_and_pointed_to_base(tmp_path):
    r, stats = no_torch_cli("inspect", TINY_CORE)
    assert r.returncode == 0 and stats["rc"] == "2" and stats["torch"] == "False"
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "a SAM core checkpoint (tiny" in err[0] and "pass it as --base" in err[0], r.stderr
    assert "upgrade" not in r.stderr
    # a plain .safetensors state dict of a core (no samadapt metadata) and Meta's .pth zip
    sd = {k: v.contiguous() for k, v in build_sam("tiny").state_dict().items()}
    save_file(sd, str(tmp_path / "core.safetensors"))
    torch.save(sd, tmp_path / "core.pth")
    r, stats = no_torch_cli("inspect", tmp_path / "core.safetensors")
    assert stats["rc"] == "2" and "a SAM core checkpoint" in r.stderr and "pass it as --base" in r.stderr
    r, stats = no_torch_cli("inspect", tmp_path / "core.pth")
    assert stats["rc"] == "2" and "not a .safetensors file: it is a zip archive" in r.stderr and "--base" in r.stderr


def test_non_safetensors_files_are_named(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 10)).save(tmp_path / "photo.jpg")
    Image.new("RGB", (20, 10)).save(tmp_path / "mask.png")
    (tmp_path / "notes.txt").write_bytes(b"\x00\x01" * 40)
    (tmp_path / "cut.safetensors").write_bytes(adapters_head(tmp_path))
    for name, expected in [("photo.jpg", "not a .safetensors file: it is a JPEG image"),
                           ("mask.png", "not a .safetensors file: it is a PNG image"),
                           ("notes.txt", "not a .safetensors file (its first 8 bytes are no header length)"),
                           ("cut.safetensors", "the file is truncated")]:
        r, stats = no_torch_cli("inspect", tmp_path / name)
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert stats["rc"] == "2" and len(err) == 1 and expected in err[0], (name, r.stderr)
        assert "Traceback" not in r.stderr and "header too large" not in r.stderr


def adapters_head(tmp_path):
    """The first 200 bytes of a real adapter file: a header that promises more than the file holds."""
    sam = build_sam("tiny")
    adapters.attach(sam, adapters.config("lora", r=2), name="t")
    return adapters.save(sam, tmp_path / "full.safetensors", name="t").read_bytes()[:200]


def test_base_checkpoint_and_sha256_shown_when_the_file_has_them(tmp_path, adapter_file):
    with safe_open(str(adapter_file), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    base = json.loads(meta["base"])
    assert "checkpoint" not in base  # precondition: rows appear only for files that carry the keys
    r, _ = no_torch_cli("inspect", adapter_file)
    assert "base file" not in r.stdout
    base.update(checkpoint="sam_vit_b_01ec64.pth", checkpoint_sha256="ab" * 32)
    save_file(tensors, str(tmp_path / "with_ckpt.safetensors"), metadata={**meta, "base": json.dumps(base)})
    r, stats = no_torch_cli("inspect", tmp_path / "with_ckpt.safetensors")
    assert stats["rc"] == "0" and stats["torch"] == "False", r.stderr
    row = [ln for ln in r.stdout.splitlines() if ln.startswith("base file")]
    assert len(row) == 1 and row[0].split(None, 2)[2] == f"sam_vit_b_01ec64.pth (sha256 {'ab' * 32})", r.stdout


def test_torch_free_settings_checks_follow_the_kinds_configs():
    """`KIND_SETTINGS` names exactly each built-in Config's fields, and refuses what the library refuses."""
    import dataclasses

    from samadapt.adapters.io import metadata_problem as lib_problem
    from samadapt.recipes.inspect import KIND_SETTINGS
    from samadapt.recipes.inspect import metadata_problem as our_problem

    for kind, table in KIND_SETTINGS.items():
        cls = type(adapters.config(kind))
        assert set(table) == {f.name for f in dataclasses.fields(cls)}, kind
    ok = {"config": [{"kind": "lora", "r": 4}], "decoder": {"policy": "frozen", "r": 4},
          "base": {"arch": "tiny", "image_size": 256, "fingerprint": "ab"}, "dtype": "fp32"}
    bad_settings = [{"kind": "lora", "r": 2, "alpha": "abc"}, {"kind": "lora", "r": 0}, {"kind": "lora", "r": True},
                    {"kind": "lora", "dropout": 1.5}, {"kind": "lora", "targets": 5},
                    {"kind": "lora", "targets": ["nope"]}, {"kind": "lora", "rank": 4}, {"kind": "lora", "r": 4096},
                    {"kind": "bottleneck", "width": 0}, {"kind": "bottleneck", "positions": []},
                    {"kind": "sam_adapter", "freq_ratio": 1.0}, {"kind": "sam_adapter", "scale_factor": "x"},
                    {"kind": "sam_adapter", "handcrafted": False, "embedding": False}]
    good_settings = [{"kind": "lora", "r": 8, "alpha": 16, "targets": "qkv"}, {"kind": "bottleneck", "width": 8},
                     {"kind": "sam_adapter", "blocks": [0, 1]}, {"kind": "lora", "r": 2, "use_dora": True}]
    disagree = []
    for c in bad_settings + good_settings:
        meta = {**ok, "config": [c]}
        if (our_problem(meta) is None) != (lib_problem(meta) is None):
            disagree.append((c, our_problem(meta), lib_problem(meta)))
    assert not disagree, disagree
    assert all(our_problem({**ok, "config": [c]}) for c in bad_settings)
