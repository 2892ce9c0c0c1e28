"""peft interop for LoRA-only adapters (issue 15), on transformers' `SamModel` with the same base weights.

- vit_b random weights (`SamModel` saved with `save_pretrained`, loaded by our `load_sam`): our adapter
  exported with `to_peft` and loaded by `PeftModel.from_pretrained` gives our image embedding to 1e-3, and
  imported back with `from_peft` to 1e-4 (256 px in the default suite; 1024 px, SAM's size, marked slow);
- a matrix on a tiny `SamModel` (LoRA, DoRA, some blocks, alpha and dropout) through the CLI both ways;
- a LoRA made by peft's own `get_peft_model` on `SamModel` imported with `samadapt convert --from peft`;
- kinds and settings peft cannot express refused with a message naming them, exit 2 from the CLI.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samadapt import adapters
from samadapt.adapters.peft_interop import PeftInteropError, from_peft, to_peft
from samadapt.sam_core import load_sam

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*argv):
    """`samadapt ARGV` run by the CLI's own `main` in this process (a subprocess would re-import torch,
    transformers and peft for each call: seconds each); exit status and printed lines as a shell sees them.
    """
    import contextlib
    import io

    from samadapt.recipes.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


def test_cli_convert_in_a_subprocess(tmp_path, tiny_sam):
    """Once as a user runs it: a separate process, exit 2 and one error line for a kind peft cannot express."""
    adapters.attach(tiny_sam, adapters.config("bottleneck"), name="b")
    f = adapters.save(tiny_sam, tmp_path / "b.safetensors", name="b")
    r = subprocess.run([sys.executable, "-m", "samadapt.recipes.cli", "convert", "--to", "peft", str(f),
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "bottleneck" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def randomize(sam, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.adapter_parameters(sam, name):
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # B = 0 at init: give the LoRA an effect


def pixels(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g) * 4 - 2  # normalised, as get_image_embeddings takes


def hf_embedding(folder, peft_dir, px):
    from peft import PeftModel
    from transformers import SamModel

    model = PeftModel.from_pretrained(SamModel.from_pretrained(folder), str(peft_dir)).eval()
    with torch.no_grad():
        return model.get_image_embeddings(px)


def round_trip(folder, tmp, cfg, size, seed=0, tol_peft=1e-3, tol_back=1e-4, via_cli=False):
    """Ours -> peft -> ours; returns (|ours - peft|, |ours - back|, |ours - plain|)."""
    sam = load_sam(folder)
    adapters.attach(sam, cfg, name="cod")
    randomize(sam, "cod", seed)
    f = adapters.save(sam, tmp / "cod.safetensors", name="cod", domain="camouflage")
    px = pixels(size, seed)
    with torch.no_grad():
        ours = sam.encode_image(px)
        adapters.activate(sam, None)
        plain = sam.encode_image(px)
    if via_cli:
        r = cli("convert", "--to", "peft", f, tmp / "peft")
        assert r.returncode == 0, r.stderr
        r = cli("convert", "--from", "peft", tmp / "peft", tmp / "back.safetensors", "--base", folder)
        assert r.returncode == 0, r.stderr
        back_file = tmp / "back.safetensors"
    else:
        to_peft(f, tmp / "peft")
        back_file = from_peft(tmp / "peft", load_sam(folder), tmp / "back.safetensors")
    d_peft = (ours - hf_embedding(folder, tmp / "peft", px)).abs().max().item()
    fresh = load_sam(folder)
    adapters.load(fresh, back_file, name="cod")
    with torch.no_grad():
        back = fresh.encode_image(px)
    info = adapters.inspect(back_file)
    assert info["config"] == adapters.inspect(f)["config"] and info["domain"] == "camouflage"
    for k, t in adapters.adapter_state_dict(sam, "cod").items():
        assert torch.equal(t, adapters.adapter_state_dict(fresh, "cod")[k]), k
    return d_peft, (ours - back).abs().max().item(), (ours - plain).abs().max().item()


# ---------------------------------------------------------------------------- vit_b (the numbers)
def vit_b_folder(tmp, size):
    from test_sam_core_loading import _randomize_all_
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    model = SamModel(SamConfig(vision_config=dict(image_size=size), prompt_encoder_config=dict(image_size=size)))
    _randomize_all_(model, 0)  # every weight random at a sane scale (transformers' init zeroes some tables)
    model.save_pretrained(tmp / "hf")
    return tmp / "hf"


@pytest.mark.parametrize("size", [256, pytest.param(1024, marks=pytest.mark.slow)])
def test_vit_b_peft_export_and_import(tmp_path, size, capsys):
    folder = vit_b_folder(tmp_path, size)
    assert load_sam(folder).arch == "vit_b"
    cfg = adapters.config("lora", r=4, alpha=8, targets=["qkv", "proj", "mlp.fc1", "mlp.fc2"])
    d_peft, d_back, effect = round_trip(folder, tmp_path, cfg, size)
    with capsys.disabled():
        print(f"\n    vit_b@{size} peft: |ours - PeftModel(SamModel)| {d_peft:.2e}, after the round trip "
              f"{d_back:.2e}; the adapter itself moves the embedding by {effect:.2e}")
    assert effect > 1e-2  # the adapter changes the embedding: the tolerances below mean something
    assert d_peft <= 1e-3 and d_back <= 1e-4


# ---------------------------------------------------------------------------- tiny matrix through the CLI
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from test_sam_core_loading import _hf_sam

    d = tmp_path_factory.mktemp("hf_tiny")
    _hf_sam(seed=1).save_pretrained(d)
    return d


CASES = {
    "lora-qkv": dict(r=4),
    "dora-all": dict(r=2, targets=["qkv", "proj", "mlp.fc1", "mlp.fc2"], use_dora=True),
    "blocks-alpha-dropout": dict(r=3, alpha=12, dropout=0.1, targets=["proj", "mlp.fc2"], blocks=[1, 2]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tiny_round_trip_matrix(tiny_folder, tmp_path, case):
    cfg = adapters.config("lora", **CASES[case])
    d_peft, d_back, effect = round_trip(tiny_folder, tmp_path, cfg, 256, via_cli=case == "lora-qkv")
    assert effect > 1e-2 and d_peft <= 1e-4 and d_back == 0


def test_peft_trained_lora_imports(tiny_folder, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import SamModel

    model = get_peft_model(SamModel.from_pretrained(tiny_folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules=r"vision_encoder\..*\.(qkv|mlp\.lin1)",
                                      init_lora_weights=False)).eval()  # random A and B: a "trained" LoRA
    model.save_pretrained(tmp_path / "peft")
    px = pixels(256, 3)
    with torch.no_grad():
        want = model.get_image_embeddings(px)
    r = cli("convert", "--from", "peft", tmp_path / "peft", tmp_path / "x.safetensors", "--base", tiny_folder,
            "--domain", "polyp")
    assert r.returncode == 0, r.stderr
    info = adapters.inspect(tmp_path / "x.safetensors")
    assert info["config"][0]["targets"] == ["qkv", "mlp.fc1"] and info["domain"] == "polyp"
    assert info["base"]["checkpoint"] == f"{tiny_folder.name}/model.safetensors"
    sam = load_sam(tiny_folder)
    adapters.load(sam, tmp_path / "x.safetensors")
    with torch.no_grad():
        got = sam.encode_image(px)
        adapters.activate(sam, None)
        plain = sam.encode_image(px)
    assert (want - plain).abs().max() > 1e-2 and (want - got).abs().max() <= 1e-4

    # the same folder without --base: its base_model_name_or_path is the local folder -> used
    r = cli("convert", "--from", "peft", tmp_path / "peft", tmp_path / "y.safetensors")
    assert r.returncode == 0, r.stderr
    r = cli("convert", "--from", "peft", tmp_path / "peft", tmp_path / "y.safetensors")
    assert r.returncode == 2 and "already exists" in r.stderr  # nothing overwritten


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kinds,decoder,named", [
    (["sam_adapter"], "frozen", "sam_adapter"),
    (["bottleneck", "lora"], "frozen", "bottleneck"),
    (["lora"], "full", "decoder policy 'full'"),
    (["lora"], "lora", "decoder policy 'lora'"),
])
def test_to_peft_refuses_what_peft_cannot_express(tiny_sam, tmp_path, kinds, decoder, named):
    cfgs = [adapters.config(k) for k in kinds]
    adapters.attach(tiny_sam, cfgs, name="x", decoder=decoder)
    f = adapters.save(tiny_sam, tmp_path / "x.safetensors", name="x")
    with pytest.raises(PeftInteropError, match="cannot convert to peft") as ei:
        to_peft(f, tmp_path / "out")
    assert named in str(ei.value) and not (tmp_path / "out").exists()
    if kinds == ["sam_adapter"]:
        r = cli("convert", "--to", "peft", f, tmp_path / "out")
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "sam_adapter" in r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_from_peft_refuses_foreign_modules_and_settings(tiny_folder, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import SamModel

    # "lin1" also names the mask decoder's MLP layers: peft adapts them, our lora kind does not
    model = get_peft_model(SamModel.from_pretrained(tiny_folder), LoraConfig(r=2, target_modules=["lin1"]))
    model.save_pretrained(tmp_path / "p")
    sam = load_sam(tiny_folder)
    with pytest.raises(PeftInteropError, match=r"does not adapt: mask_decoder\.transformer\.layers\.0\.mlp\.lin1"):
        from_peft(tmp_path / "p", sam, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not adapters.attached(sam)
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    for change, named in [({"bias": "all"}, "bias='all'"), ({"peft_type": "IA3"}, "is not LoRA"),
                          ({"rank_pattern": {"qkv": 8}}, "rank_pattern")]:
        (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(PeftInteropError, match=named):
            from_peft(tmp_path / "p", sam, tmp_path / "x.safetensors")
    r = cli("convert", "--from", "peft", tmp_path / "p", tmp_path / "x.safetensors", "--base", tiny_folder)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "rank_pattern" in r.stderr


def test_from_peft_checks_the_base_it_is_given(tiny_folder, tmp_path, tiny_sam):
    sam = load_sam(tiny_folder)
    adapters.attach(sam, adapters.config("lora"), name="cod")
    to_peft(adapters.save(sam, tmp_path / "cod.safetensors", name="cod"), tmp_path / "p")
    with pytest.raises(adapters.IncompatibleAdapterError, match=f"checkpoint {tiny_folder.name}/model.safetensors"):
        from_peft(tmp_path / "p", tiny_sam, tmp_path / "x.safetensors")  # other weights
    assert from_peft(tmp_path / "p", tiny_sam, tmp_path / "x.safetensors", allow_base_mismatch=True).is_file()
