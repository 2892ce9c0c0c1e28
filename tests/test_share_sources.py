"""Loading adapters from anywhere (issue 15): local paths, `http(s)://` URLs and `hf://org/repo/file[@rev]`.

- `http://` through a plain HTTP server on 127.0.0.1: loads, no Hub token sent to it, cached copy used
  offline;
- `hf://` through huggingface_hub's real client against `FakeHub` (a local endpoint laid out as the Hub
  serves it; the public Hub is not reachable from the test machines): `main`, a branch and a commit as
  revisions, a private repo with the token from `HF_TOKEN`, and a re-load from the cache with the server
  gone and `HF_HUB_OFFLINE`;
- a sha256 pin: a wrong one is refused naming both hashes, for a local file, a URL and a Hub file;
- the base checkpoint's file name and sha256 recorded in the file, type-checked on read, and named by the
  incompatible-adapter error together with the CLI flag;
- `AdapterBank` with a catalogue mapping names to such sources.
"""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from share_util import TOKEN, file_server, make_adapter, point_hub_here

from samadapt import adapters
from samadapt.adapters.io import metadata_problem
from samadapt.adapters.sources import HashMismatchError, SourceError, load_catalogue, resolve
from samadapt.sam_core import build_sam, load_sam


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory, pretrained_tiny_path):
    """A tiny core loaded from a checkpoint file, and two adapter files for it."""
    d = tmp_path_factory.mktemp("share")
    ckpt = d / "tiny_base.safetensors"
    shutil.copyfile(pretrained_tiny_path, ckpt)
    sam = load_sam(ckpt)
    a = make_adapter(sam, d / "cod.safetensors", "cod", seed=1)
    b = make_adapter(sam, d / "cod_v2.safetensors", "cod", seed=2)
    return sam, ckpt, a, b


def embedding(sam, source, **kw):
    name = adapters.load(sam, source, name="probe", **kw)
    x = torch.rand(1, 3, sam.image_size, sam.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e = sam.encode_image(sam.preprocess(x * 255))
    adapters.detach(sam, name)
    return e



# ---------------------------------------------------------------------------- base checkpoint named
def test_file_records_base_checkpoint_name_and_sha256(base, tmp_path):
    sam, ckpt, a, _ = base
    info = adapters.inspect(a)
    assert info["base"]["checkpoint"] == "tiny_base.safetensors"
    assert info["base"]["checkpoint_sha256"] == sha(ckpt)
    assert info["base"]["fingerprint"] == sam.fingerprint
    # a core built in memory names no file
    fresh = build_sam("tiny")
    assert "checkpoint" not in adapters.inspect(make_adapter(fresh, tmp_path / "x.safetensors"))["base"]


def test_checkpoint_keys_are_type_checked():
    ok = {"config": [{"kind": "lora", "r": 4}], "decoder": {"policy": "frozen", "r": 4}, "dtype": "fp32",
          "base": {"arch": "tiny", "image_size": 256, "fingerprint": "ab", "checkpoint": "t.pth",
                   "checkpoint_sha256": "0" * 64}}
    assert metadata_problem(ok) is None
    for key in ("checkpoint", "checkpoint_sha256"):
        bad = {**ok, "base": {**ok["base"], key: 12}}
        assert metadata_problem(bad) == f"'base' {key!r} should be a string, got int"


def test_incompatible_error_names_checkpoint_and_cli_flag(base):
    _, ckpt, a, _ = base
    other = build_sam("tiny")  # random weights: another fingerprint
    with pytest.raises(adapters.IncompatibleAdapterError) as ei:
        adapters.load(other, a)
    msg = str(ei.value)
    assert "checkpoint tiny_base.safetensors" in msg and sha(ckpt)[:16] in msg
    assert "--allow-base-mismatch" in msg and "allow_base_mismatch=True" in msg
    assert adapters.load(other, a, allow_base_mismatch=True) == "cod"


# ---------------------------------------------------------------------------- sha256 pins
def test_wrong_sha256_pin_is_refused_naming_both_hashes(base):
    sam, _, a, _ = base
    right, wrong = sha(a), "ab" * 32
    with pytest.raises(HashMismatchError) as ei:
        adapters.load(sam, str(a), sha256=wrong)
    assert right in str(ei.value) and wrong in str(ei.value)
    assert "probe" not in adapters.attached(sam) and "cod" not in adapters.attached(sam)  # nothing attached
    assert adapters.load(sam, a, name="pinned", sha256="sha256:" + right.upper()) == "pinned"
    adapters.detach(sam, "pinned")
    with pytest.raises(SourceError, match="not 64 hex digits"):
        resolve(a, sha256="abc")


# ---------------------------------------------------------------------------- http(s)
def test_http_url_loads_pinned_and_offline_from_cache(base, tmp_path, monkeypatch):
    sam, _, a, b = base
    point_hub_here(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf_home")  # no Hub: must not be asked
    folder = tmp_path / "www"
    folder.mkdir()
    shutil.copyfile(a, folder / "cod.safetensors")
    want = embedding(sam, a)
    assert (want - embedding(sam, b)).abs().max() > 1e-3  # the two adapters differ: the check can fail
    with file_server(folder) as (url, seen):
        src = f"{url}/cod.safetensors"
        assert torch.equal(embedding(sam, src), want)
        assert torch.equal(embedding(sam, src, sha256=sha(a)), want)
        with pytest.raises(HashMismatchError, match=sha(a)):
            adapters.load(sam, src, sha256=sha(b))
        with pytest.raises(SourceError, match="404"):
            adapters.load(sam, f"{url}/nope.safetensors")
        assert seen and not any("Authorization" in h or "authorization" in h for h in seen)  # HF_TOKEN not sent
        n = len(seen)
        assert torch.equal(embedding(sam, src, sha256=sha(a)), want)  # pinned + cached: no request
        assert len(seen) == n
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # server gone, offline: the cached copy
    assert torch.equal(embedding(sam, src), want)
    with pytest.raises(SourceError, match="offline"):
        adapters.load(sam, "http://127.0.0.1:9/other.safetensors")


# ---------------------------------------------------------------------------- hf://
def test_hf_source_revisions_private_and_offline(base, hub, monkeypatch):
    sam, _, a, b = base
    first = hub.add_repo("org/cod", {"cod.safetensors": a.read_bytes(), "README.md": b"card"})
    second = hub.add_repo("org/cod", {"cod.safetensors": b.read_bytes()}, branch="v2")
    hub.add_repo("org/secret", {"sub/cod.safetensors": a.read_bytes()}, private=True)
    want_a, want_b = embedding(sam, a), embedding(sam, b)
    assert (want_a - want_b).abs().max() > 1e-3

    assert torch.equal(embedding(sam, "hf://org/cod/cod.safetensors"), want_a)
    assert torch.equal(embedding(sam, "hf://org/cod/cod.safetensors@v2"), want_b)
    assert torch.equal(embedding(sam, f"hf://org/cod/cod.safetensors@{first}"), want_a)
    assert torch.equal(embedding(sam, f"hf://org/cod/cod.safetensors@{second}", sha256=sha(b)), want_b)
    assert torch.equal(embedding(sam, "hf://org/secret/sub/cod.safetensors"), want_a)  # token from HF_TOKEN
    assert ("HEAD", "/org/secret/resolve/main/sub/cod.safetensors", f"Bearer {TOKEN}") in hub.requests
    assert adapters.inspect("hf://org/cod/cod.safetensors@v2")["base"]["fingerprint"] == sam.fingerprint

    with pytest.raises(HashMismatchError) as ei:
        adapters.load(sam, "hf://org/cod/cod.safetensors@v2", sha256=sha(a))
    assert sha(a) in str(ei.value) and sha(b) in str(ei.value)
    for src, why in [("hf://org/cod/none.safetensors", "no such file"),
                     ("hf://org/cod/cod.safetensors@v9", "no such revision"),
                     ("hf://org/missing/cod.safetensors", "no such repository")]:
        with pytest.raises(SourceError, match=why) as ei:
            adapters.load(sam, src)
        assert TOKEN not in str(ei.value)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(SourceError, match="private"):
        adapters.load(sam, "hf://org/secret/sub/other.safetensors")

    hub.close()  # the Hub is gone; offline mode re-loads from huggingface_hub's cache
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert torch.equal(embedding(sam, "hf://org/cod/cod.safetensors"), want_a)
    assert torch.equal(embedding(sam, "hf://org/cod/cod.safetensors@v2"), want_b)
    with pytest.raises(SourceError, match="not in the local cache"):
        adapters.load(sam, "hf://org/cod/README2.safetensors")


def test_malformed_hf_source():
    with pytest.raises(SourceError, match="hf://org/repo/file.safetensors"):
        resolve("hf://org/cod.safetensors")


# ---------------------------------------------------------------------------- catalogue
def test_bank_catalogue_of_sources(base, hub, tmp_path):
    sam, _, a, b = base
    hub.add_repo("org/cod", {"cod.safetensors": b.read_bytes()}, branch="v2")
    (tmp_path / "local").mkdir()
    shutil.copyfile(a, tmp_path / "local" / "a.safetensors")
    www = tmp_path / "www"
    www.mkdir()
    shutil.copyfile(b, www / "b.safetensors")
    img = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    with file_server(www) as (url, _):
        cat = tmp_path / "catalogue.yaml"
        cat.write_text(f"local: local/a.safetensors\n"
                       f"web: {{source: {url}/b.safetensors, sha256: {sha(b)}}}\n"
                       f"hub: hf://org/cod/cod.safetensors@v2\n")
        bank = adapters.AdapterBank(sam, catalogue=cat)
        assert sorted(bank.available()) == ["hub", "local", "web"]
        assert bank.available()["web"]["domain"] == "camouflage"
        got = {n: bank.predict(img, adapter=n, box=[5, 5, 60, 50])[0] for n in ("local", "web", "hub")}
        # the same file from three places gives the same masks; a different file, different ones
        assert np.array_equal(got["web"], got["hub"]) and not np.array_equal(got["local"], got["web"])
        ref = adapters.AdapterBank(sam, catalogue={"x": str(a)})
        assert np.array_equal(ref.predict(img, adapter="x", box=[5, 5, 60, 50])[0], got["local"])

        cat.write_text(json.dumps({"web": {"source": f"{url}/b.safetensors", "sha256": sha(a)}}))
        with pytest.raises(HashMismatchError, match=sha(b)):
            adapters.AdapterBank(sam, catalogue=cat)
    for text, why in [("- a\n- b\n", "should map adapter names"), ("1bad: x.safetensors\n", "not valid"),
                      ("a: {sha256: x}\n", "needs a source"), ("a: {source: x, pin: y}\n", "unknown keys"),
                      (f"a: {{source: x, sha256: {'1' * 64}}}\n", "quote it in YAML")]:
        cat.write_text(text)
        with pytest.raises(SourceError, match=why):
            load_catalogue(cat)


def test_adapter_loaded_onto_an_eval_core_runs_without_dropout(base, tmp_path):
    """A file with LoRA dropout, served by a bank on an eval-mode core, gives the same masks every call."""
    sam, _, _, _ = base
    adapters.attach(sam, adapters.config("lora", r=4, dropout=0.5), name="drop")
    with torch.no_grad():
        for p in adapters.adapter_parameters(sam, "drop"):
            p.add_(0.1)
    f = adapters.save(sam, tmp_path / "drop.safetensors", name="drop")
    adapters.detach(sam, "drop")
    assert not sam.training
    bank = adapters.AdapterBank(sam, catalogue={"drop": str(f)})
    img = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    e1 = bank.embedding(img, adapter="drop", image_id="first").clone()
    assert torch.equal(e1, bank.embedding(img, adapter="drop", image_id="second"))  # a second encoder pass
    assert not any(m.training for m in sam.modules())
