"""The adapter matrix: every registered kind (plus DoRA and combinations) x every decoder policy on
the tiny SAM (256 px).

What is shown, per kind/policy:
  1. a fresh adapter changes no output, bit for bit (forward_masks with/without prompts, SamPredictor);
  2. training changes only adapter (and decoder-policy) tensors, never the core or its fingerprint;
  3. save -> load into a fresh core gives identical outputs; another core is refused with the
     expected fingerprint in the message unless allow_base_mismatch; fp16/bf16 files hold that dtype;
  4. a file is its tensor bytes plus a few-KB header;
  5. merge/unmerge is exact on the core, numerically equal on the outputs;
  6. switching adapters switches outputs and never reuses a cached embedding;
  7. damaged / foreign / other-version / wrong files fail with clear errors and leave nothing behind;
  8. AdapterBank answers concurrent mixed-adapter requests exactly like lone requests.

New kinds enrol themselves: the matrix iterates `adapters.KINDS`.
"""
import json
import os
import pickle
import random
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from samadapt import adapters
from samadapt.adapters import AdapterBank, AdapterError, AdapterFormatError, IncompatibleAdapterError
from samadapt.sam_core import SamPredictor, build_sam

# ----------------------------------------------------------------------------- the matrix
KINDS = sorted(adapters.KINDS)
POLICIES = list(adapters.DECODER_POLICIES)


def _case_table():
    """case name -> list of (kind, config kwargs). Every registered kind alone, DoRA, combinations. A kind that
    only adds a promptless output (`promptless_head`, e.g. `classes`) never changes the prompted outputs this
    matrix trains and compares, so it is tested combined with the others (all-kinds) and in its own file."""
    cases = {k: [(k, {})] for k in KINDS if not getattr(adapters.KINDS[k].config_cls, "promptless_head", False)}
    cases["lora-dora"] = [("lora", {"use_dora": True, "targets": ["qkv", "proj"]})]
    if {"sam_adapter", "lora"} <= set(KINDS):
        cases["sam_adapter+lora"] = [("sam_adapter", {}), ("lora", {})]
    if len(KINDS) > 2:
        cases["all-kinds"] = [(k, {}) for k in KINDS]
    return cases


CASES = _case_table()
CASE_NAMES = list(CASES)
MATRIX = [pytest.param(c, d, id=f"{c}-{d}") for c in CASE_NAMES for d in POLICIES]
MERGEABLE_CASES = [c for c in CASE_NAMES if any(adapters.KINDS[k].mergeable for k, _ in CASES[c])]


def configs_of(case):
    return [adapters.config(k, **kw) for k, kw in CASES[case]]


# ----------------------------------------------------------------------------- fixtures / helpers
SEED = 1234
torch.manual_seed(SEED)
_BASE = build_sam("tiny")
BASE_SD = {k: v.clone() for k, v in _BASE.core_state_dict().items()}
BASE_FP = _BASE.fingerprint
del _BASE

_g = torch.Generator().manual_seed(SEED)
IMG = (torch.rand(1, 3, 256, 256, generator=_g) * 255).round()  # already 'resized and padded'
IMG[:, :, 60:140, 80:200] = torch.tensor([230.0, 40.0, 40.0]).view(1, 3, 1, 1)  # some structure
PTS = torch.tensor([[[120.0, 100.0], [30.0, 200.0]]])
LBL = torch.tensor([[1, 0]])
BOX = torch.tensor([[70.0, 50.0, 210.0, 150.0]])
TARGET = (torch.rand(1, 1, 64, 64, generator=_g) > 0.5).float()

_rng = np.random.default_rng(SEED)
NP_IMG = _rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
NP_IMG[40:100, 60:150] = (30, 200, 60)
PRED_PROMPT = dict(point_coords=np.array([[100.0, 70.0], [20.0, 130.0]]), point_labels=np.array([1, 0]),
                   box=np.array([50.0, 30.0, 160.0, 110.0]))


def fresh():
    """A new core with the shared base weights."""
    s = build_sam("tiny")
    s.load_state_dict(BASE_SD)
    return s


def other_core():
    torch.manual_seed(SEED + 1)
    return build_sam("tiny")


def attach_case(sam, case, policy, name="a", **kw):
    adapters.attach(sam, configs_of(case), name=name, decoder=policy, **kw)


def perturb(sam, name, seed=0, scale=0.05):
    """Give every parameter of adapter `name` seeded random nudges (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.adapter_parameters(sam, name):
            p.add_(torch.randn(p.shape, generator=g) * scale)


@torch.no_grad()
def outputs(sam, promptless=True):
    """(low-res logits, IoU) of forward_masks with prompts, and without prompts."""
    out = list(sam.forward_masks(IMG, point_coords=PTS, point_labels=LBL, boxes=BOX, multimask_output=True))
    if promptless:
        out += list(sam.forward_masks(IMG))
    return out


def predictor_out(sam):
    p = SamPredictor(sam)
    p.set_image(NP_IMG)
    return p.predict(**PRED_PROMPT, multimask_output=True)


def assert_equal_outputs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y), f"max abs diff {np.abs(x.astype(float) - y.astype(float)).max()}"
        else:
            assert torch.equal(x, y), f"max abs diff {(x - y).abs().max().item()}"


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def adapter_names(sam, name):
    ids = {id(p) for p in adapters.adapter_parameters(sam, name)}
    return {n for n, p in sam.named_parameters() if id(p) in ids}


def state_snapshot(sam):
    """Everything a failed call must leave as it was."""
    return (adapters.attached(sam), adapters.active(sam), sorted(sam.state_dict()),
            [p.requires_grad for p in sam.parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in sam.modules()))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's ops are too small to gain from intra-op threads, and 2 threads on 2 busy cores
    (8 Python threads in the bank test) oversubscribe badly: run this module on one, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plain():
    s = fresh()
    assert s.fingerprint == BASE_FP
    return {"out": outputs(s), "pred": predictor_out(s)}


# ----------------------------------------------------------------------------- 1. identity at init
@pytest.mark.parametrize("case,policy", MATRIX)
def test_fresh_adapter_changes_nothing(case, policy, plain):
    sam = fresh()
    attach_case(sam, case, policy)
    assert adapters.active(sam) == "a"
    assert adapters.trainable_summary(sam)["trainable"] > 0
    assert_equal_outputs(outputs(sam), plain["out"])
    assert_equal_outputs(predictor_out(sam), plain["pred"])
    assert sam.fingerprint == BASE_FP


# ----------------------------------------------------------------------------- 2. training touches the adapter only
@pytest.mark.parametrize("case,policy", MATRIX)
def test_training_changes_adapter_only(case, policy):
    torch.manual_seed(SEED)
    sam = fresh()
    attach_case(sam, case, policy)
    before = {k: v.detach().clone() for k, v in sam.state_dict().items()}
    trainable = [p for p in sam.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapters.adapter_parameters(sam, "a")}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    for step in range(2):
        low, iou = sam.forward_masks(IMG, boxes=BOX)
        if step == 0:
            before_low = low.detach().clone()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(low, TARGET) + iou.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sam.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    owned = adapter_names(sam, "a")
    assert changed, "training changed nothing"
    assert changed <= owned, f"core tensors changed: {sorted(changed - owned)[:5]}"
    if policy == "full":
        assert any(k.startswith("adapter_decoders.") for k in changed)
    if policy == "lora":
        assert any(k.startswith("mask_decoder.") and ".lora_" in k for k in changed)
    if policy != "full":
        assert not any(k.startswith("adapter_decoders.") for k in after)
    assert sam.fingerprint == BASE_FP
    assert all(torch.equal(v, BASE_SD[k]) for k, v in sam.core_state_dict().items())
    with torch.no_grad():
        after_low, _ = sam.forward_masks(IMG, boxes=BOX)
    assert (after_low - before_low).abs().max() > 1e-4, "training did not change the outputs"


# ----------------------------------------------------------------------------- 3. round trip
@pytest.mark.parametrize("case,policy", MATRIX)
def test_round_trip(case, policy, tmp_path):
    sam = fresh()
    attach_case(sam, case, policy, name="dom")
    perturb(sam, "dom", seed=1)
    ref = outputs(sam, promptless=False)
    path = adapters.save(sam, tmp_path / "dom.safetensors", name="dom", domain="test", metrics={"iou": 0.5})

    # a fresh core from the same weights: identical outputs, whatever name it is loaded under
    s2 = build_sam("tiny")
    s2.load_state_dict(sam.core_state_dict())
    assert adapters.load(s2, path) == "dom"
    assert adapters.active(s2) == "dom"
    assert not any(p.requires_grad for p in s2.parameters())
    assert_equal_outputs(outputs(s2, promptless=False), ref)
    s2_sd = adapters.adapter_state_dict(s2, "dom")
    for k, v in adapters.adapter_state_dict(sam, "dom").items():
        assert torch.equal(v, s2_sd[k]), k
    assert adapters.load(s2, path, name="again", activate=False) == "again"
    assert adapters.active(s2) == "dom"
    again = adapters.adapter_state_dict(s2, "again")  # each adapter holds its own tensors only
    assert set(again) == set(s2_sd) and all(torch.equal(again[k], v) for k, v in s2_sd.items())

    # a core with other weights: refused, naming the fingerprint the file expects
    s3 = other_core()
    before = state_snapshot(s3)
    with pytest.raises(IncompatibleAdapterError) as ei:
        adapters.load(s3, path)
    assert BASE_FP in str(ei.value) and "allow_base_mismatch" in str(ei.value)
    assert state_snapshot(s3) == before
    assert adapters.load(s3, path, allow_base_mismatch=True) == "dom"
    s3_sd = adapters.adapter_state_dict(s3, "dom")
    assert all(torch.equal(v, s3_sd[k]) for k, v in s2_sd.items())

    meta = adapters.inspect(path)
    assert meta["format"] == adapters.FORMAT and meta["base"]["fingerprint"] == BASE_FP
    assert meta["domain"] == "test" and meta["metrics"] == {"iou": 0.5}
    assert meta["decoder"]["policy"] == policy
    assert [c["kind"] for c in meta["config"]] == [k for k, _ in CASES[case]]


HALF = [("fp16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 2e-2)]  # dtype, torch dtype, relative tolerance


def test_base_check_sees_core_changes(saved):
    """The load-time base check stays right when core weights change after an earlier load."""
    sam = fresh()
    adapters.load(sam, saved, name="first")
    w = sam.image_encoder.blocks[0].norm1.weight
    keep = w.detach().clone()
    with torch.no_grad():
        w.add_(1e-3)  # in place
    with pytest.raises(IncompatibleAdapterError, match=BASE_FP):
        adapters.load(sam, saved, name="second")
    with torch.no_grad():
        w.copy_(keep)
    adapters.load(sam, saved, name="second")
    sam.load_state_dict(other_core().core_state_dict(), strict=False)  # other weights, loaded in place
    with pytest.raises(IncompatibleAdapterError, match=BASE_FP):
        adapters.load(sam, saved, name="third")
    s2 = fresh().to(torch.float64)  # replaced tensors
    with pytest.raises(IncompatibleAdapterError):
        adapters.load(s2, saved)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_half_precision_files(case, tmp_path):
    sam = fresh()
    policy = "lora" if case == "lora" else "frozen"
    attach_case(sam, case, policy)
    perturb(sam, "a", seed=2, scale=0.02)
    ref = outputs(sam, promptless=False)
    ref_sd = adapters.adapter_state_dict(sam, "a")
    scale = max(r.abs().max().item() for r in ref)
    for dtype, torch_dtype, tol in HALF:
        path = adapters.save(sam, tmp_path / f"a_{dtype}.safetensors", name="a", dtype=dtype)
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            assert keys and all(f.get_tensor(k).dtype == torch_dtype for k in keys)
            assert f.metadata()["dtype"] == dtype
        meta = adapters.inspect(path)
        assert meta["tensor_bytes"] == 2 * meta["parameters"]
        assert meta["file_bytes"] == meta["tensor_bytes"] + meta["header_bytes"]
        s2 = fresh()
        adapters.load(s2, path)
        # the stored values are the rounded fp32 values, loaded back into the fp32 adapter
        for k, v in adapters.adapter_state_dict(s2, "a").items():
            assert v.dtype == torch.float32
            assert torch.equal(v, ref_sd[k].to(torch_dtype).float()), k
        got = outputs(s2, promptless=False)
        assert max_diff(got, ref) <= tol * max(1.0, scale), (dtype, max_diff(got, ref), scale)


def test_full_decoder_copy_is_plain_next_to_decoder_lora(tmp_path):
    """A full decoder copy made while another adapter has decoder LoRA holds the core decoder only."""
    sam = fresh()
    adapters.attach(sam, adapters.config("lora"), name="dl", decoder="lora")
    perturb(sam, "dl", seed=7)
    adapters.attach(sam, adapters.config("bottleneck"), name="df", decoder="full")
    perturb(sam, "df", seed=8)
    plain_names = {f"mask_decoder.{k}" for k in fresh().mask_decoder.state_dict()}
    dec_keys = {k for k in adapters.adapter_state_dict(sam, "df") if k.startswith("mask_decoder.")}
    assert dec_keys == plain_names
    ref = outputs(sam, promptless=False)
    path = adapters.save(sam, tmp_path / "df.safetensors", name="df")
    adapters.detach(sam, "df")
    s2 = fresh()
    adapters.load(s2, path)
    assert_equal_outputs(outputs(s2, promptless=False), ref)
    adapters.load(sam, path)  # next to the decoder LoRA again
    assert_equal_outputs(outputs(sam, promptless=False), ref)


# ----------------------------------------------------------------------------- 4. file size
@pytest.mark.parametrize("case,policy", MATRIX)
def test_file_is_tensors_plus_small_header(case, policy, tmp_path):
    sam = fresh()
    attach_case(sam, case, policy)
    sd = adapters.adapter_state_dict(sam, "a")
    path = adapters.save(sam, tmp_path / "a.safetensors", name="a", recipe="model: tiny\n" * 20)
    meta = adapters.inspect(path)
    assert meta["parameters"] == sum(v.numel() for v in sd.values())
    assert meta["tensors"] == len(sd)
    assert meta["tensor_bytes"] == 4 * meta["parameters"]
    # the header is the metadata (~1 KB here, recipe included) plus ~100-130 B of JSON per tensor name
    assert meta["header_bytes"] <= 1536 + 160 * meta["tensors"], meta["header_bytes"]
    if policy != "full":
        assert meta["header_bytes"] < 16 * 1024, meta["header_bytes"]
    else:  # a full decoder copy adds ~120 tensor names (~14 KB of header), still ~2% of the file
        assert meta["header_bytes"] < 0.03 * meta["file_bytes"], meta["header_bytes"]
    assert meta["file_bytes"] == meta["tensor_bytes"] + meta["header_bytes"] == os.path.getsize(path)
    assert sum(meta["parameters_by_kind"].values()) == meta["parameters"]


@pytest.mark.parametrize("case,policy", MATRIX)
def test_kinds_label_their_tensors(case, policy, tmp_path):
    """`trainable_summary` (live model) and `inspect` (file) label every tensor by the kind that owns
    it, from the registry: the same counts, one label per kind in the adapter, nothing `other`."""
    sam = fresh()
    attach_case(sam, case, policy)
    labels = {adapters.KINDS[k].label for k, _ in CASES[case]}
    if policy != "frozen":
        labels.add(adapters.DECODER_KINDS[policy].label)
    by_kind = adapters.trainable_summary(sam)["by_kind"]
    assert set(by_kind) == labels
    meta = adapters.inspect(adapters.save(sam, tmp_path / "a.safetensors", name="a"))
    assert meta["parameters_by_kind"] == by_kind
    assert sorted(k for names in meta["tensors_by_kind"].values() for k in names) == \
        sorted(adapters.adapter_state_dict(sam, "a"))


def test_vit_b_lora_file_size(tmp_path):
    torch.manual_seed(0)
    sam = build_sam("vit_b")
    adapters.attach(sam, adapters.config("lora", r=4, targets=["qkv"]), name="cod")
    path = adapters.save(sam, tmp_path / "cod.safetensors", name="cod", dtype="fp16")
    meta = adapters.inspect(path)
    assert meta["parameters"] == 12 * 4 * (768 + 3 * 768)
    assert meta["tensor_bytes"] == 2 * meta["parameters"]
    assert meta["header_bytes"] < 16 * 1024
    assert meta["file_bytes"] == meta["tensor_bytes"] + meta["header_bytes"]
    assert meta["file_bytes"] < 0.7e6, meta["file_bytes"]


# ----------------------------------------------------------------------------- 5. merge / unmerge
MERGE_MATRIX = [pytest.param(c, d, id=f"{c}-{d}") for c in MERGEABLE_CASES for d in ("frozen", "lora")] + (
    [pytest.param("sam_adapter+lora", "full", id="sam_adapter+lora-full")] if "sam_adapter+lora" in CASES else [])


@pytest.mark.parametrize("case,policy", MERGE_MATRIX)
def test_merge_unmerge(case, policy):
    sam = fresh()
    attach_case(sam, case, policy, name="m")
    perturb(sam, "m", seed=3, scale=0.02)
    adapters.attach(sam, adapters.config("lora", r=2), name="other", activate=False)
    perturb(sam, "other", seed=4)
    assert adapters.active(sam) == "m"
    unmerged = outputs(sam, promptless=False)

    adapters.merge(sam, "m")
    assert sam.fingerprint != BASE_FP  # the LoRA update is folded into the frozen weights
    merged = outputs(sam, promptless=False)
    assert max_diff(merged, unmerged) <= 1e-5, max_diff(merged, unmerged)
    for bad in ("other", None):
        with pytest.raises(AdapterError, match="merged"):
            adapters.activate(sam, bad)
    with pytest.raises(AdapterError, match="merged"):
        adapters.attach(sam, adapters.config("lora"), name="late")
    with pytest.raises(AdapterError, match="merged"):
        adapters.detach(sam, "m")
    with pytest.raises(AdapterError, match="merged"):
        adapters.merge(sam, "other")
    assert adapters.active(sam) == "m"

    adapters.unmerge(sam)
    assert sam.fingerprint == BASE_FP
    assert all(torch.equal(v, BASE_SD[k]) for k, v in sam.core_state_dict().items())
    assert_equal_outputs(outputs(sam, promptless=False), unmerged)

    kinds = {k for k, _ in CASES[case]}
    if kinds != {"lora"} or policy == "full":
        # the non-LoRA parts stayed active while merged: without them the result is far off
        adapters.detach(sam, "other")
        only_lora = fresh()
        cfg = [c for c in configs_of(case) if c.kind == "lora"]
        adapters.attach(only_lora, cfg, name="m")
        sd = {
            k: v for k, v in adapters.adapter_state_dict(sam, "m").items() if ".lora_" in k and k.startswith("image_")
        }
        adapters.base.load_adapter_tensors(only_lora, "m", sd)
        assert max_diff(outputs(only_lora, promptless=False), merged) > 1e-3


# ----------------------------------------------------------------------------- 6. swap
SWAP_PAIRS = [
    pytest.param(
        CASE_NAMES[i],
        POLICIES[i % len(POLICIES)],
        CASE_NAMES[(i + 1) % len(CASE_NAMES)],
        POLICIES[(i + 1) % len(POLICIES)],
        id=f"{CASE_NAMES[i]}-vs-{CASE_NAMES[(i + 1) % len(CASE_NAMES)]}",
    )
    for i in range(len(CASE_NAMES))
]


@pytest.mark.parametrize("case_a,policy_a,case_b,policy_b", SWAP_PAIRS)
def test_swap(case_a, policy_a, case_b, policy_b, plain):
    sam = fresh()
    attach_case(sam, case_a, policy_a, name="A")
    attach_case(sam, case_b, policy_b, name="B")
    perturb(sam, "A", seed=5)
    perturb(sam, "B", seed=6)
    assert adapters.active(sam) == "B"
    out_b = outputs(sam, promptless=False)
    adapters.activate(sam, "A")
    out_a = outputs(sam, promptless=False)
    assert not torch.equal(out_a[0], out_b[0])
    adapters.activate(sam, None)
    assert adapters.active(sam) is None
    assert_equal_outputs(outputs(sam, promptless=False), plain["out"][:2])
    adapters.activate(sam, "B")
    assert_equal_outputs(outputs(sam, promptless=False), out_b)

    # a predictor whose image was set under A re-encodes after a switch to B
    adapters.activate(sam, "A")
    pred = SamPredictor(sam)
    pred.set_image(NP_IMG)
    res_a = pred.predict(**PRED_PROMPT)
    emb_a = pred.get_image_embedding().clone()
    adapters.activate(sam, "B")
    res_b = pred.predict(**PRED_PROMPT)
    assert not torch.equal(pred.get_image_embedding(), emb_a)
    fresh_b = SamPredictor(sam)
    fresh_b.set_image(NP_IMG)
    assert_equal_outputs(res_b, fresh_b.predict(**PRED_PROMPT))
    assert not np.array_equal(res_a[2], res_b[2])
    adapters.activate(sam, None)
    assert_equal_outputs(pred.predict(**PRED_PROMPT, multimask_output=True), plain["pred"])
    adapters.activate(sam, "A")
    assert_equal_outputs(pred.predict(**PRED_PROMPT), res_a)

    # detaching the active adapter falls back to the plain core
    adapters.detach(sam, "A")
    assert adapters.active(sam) is None and adapters.attached(sam) == ["B"]
    adapters.detach(sam, "B")
    assert adapters.attached(sam) == []
    # no adapter tensor is left (peft's emptied LoRA wrappers stay, computing the plain layer)
    assert not [k for k in sam.state_dict() if ".lora_" in k or "samadapt_" in k or k.startswith("adapter_decoders.")]
    assert {k: v.shape for k, v in sam.core_state_dict().items()} == {k: v.shape for k, v in BASE_SD.items()}
    assert_equal_outputs(outputs(sam, promptless=False), plain["out"][:2])


# ----------------------------------------------------------------------------- 7. errors
class _Tripwire:
    """Unpickling this creates a file: proof that something unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rewrite(src, dst, **meta_changes):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    sam = fresh()
    adapters.attach(sam, adapters.config("lora", r=4), name="good")
    perturb(sam, "good")
    return adapters.save(sam, d / "good.safetensors", name="good")


def _fails_cleanly(sam, path, exc, match, **kw):
    before = state_snapshot(sam)
    with pytest.raises(exc, match=match):
        adapters.load(sam, path, **kw)
    assert state_snapshot(sam) == before


def test_load_errors(saved, tmp_path, plain):
    sam = fresh()
    # an adapter being trained: its state must survive failed loads
    adapters.attach(sam, adapters.config("bottleneck", width=8), name="trainee")
    adapters.activate(sam, None)

    data = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    _fails_cleanly(sam, cut, AdapterFormatError, "truncated")

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(foreign), metadata={"producer": "someone else"})
    _fails_cleanly(sam, foreign, AdapterFormatError, "not a samadapt adapter")
    bare = tmp_path / "bare.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(bare))
    _fails_cleanly(sam, bare, AdapterFormatError, "not a samadapt adapter")

    v2 = _rewrite(saved, tmp_path / "v2.safetensors", format="samadapt.adapter/2")
    _fails_cleanly(sam, v2, AdapterFormatError, r"samadapt\.adapter/2.*not supported")
    with pytest.raises(AdapterFormatError, match="not supported"):
        adapters.inspect(v2)

    cfg = adapters.inspect(saved)["config"]
    cfg[0]["kind"] = "hypernet"
    unknown = _rewrite(saved, tmp_path / "unknown.safetensors", config=json.dumps(cfg))
    _fails_cleanly(sam, unknown, AdapterFormatError, "unknown adapter kind 'hypernet'")

    cfg[0]["kind"] = "lora"
    cfg[0]["r"] = 8  # tensors say r=4: fails after attaching, which must be undone
    wrong_r = _rewrite(saved, tmp_path / "wrong_r.safetensors", config=json.dumps(cfg))
    _fails_cleanly(sam, wrong_r, AdapterError, "do not fit")

    not_json = _rewrite(saved, tmp_path / "notjson.safetensors", config="{lora")
    _fails_cleanly(sam, not_json, AdapterFormatError, "not valid JSON")

    extra = tmp_path / "extra.safetensors"
    with safe_open(str(saved), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["image_encoder.blocks.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, str(extra), metadata=meta)
    _fails_cleanly(sam, extra, AdapterError, "mystery")

    _fails_cleanly(sam, tmp_path / "missing.safetensors", AdapterFormatError, "no such")
    _fails_cleanly(other_core(), saved, IncompatibleAdapterError, BASE_FP)
    _fails_cleanly(sam, saved, AdapterError, "bad name", name="bad name")
    adapters.load(sam, saved, activate=False)
    _fails_cleanly(sam, saved, AdapterError, "already attached")

    # a pickle in disguise is refused without being unpickled
    for i, writer in enumerate((torch.save, lambda obj, p: Path(p).write_bytes(pickle.dumps(obj)))):
        wire = tmp_path / f"tripped{i}"
        disguised = tmp_path / f"model{i}.safetensors"
        writer({"weight": torch.zeros(2), "payload": _Tripwire(wire)}, str(disguised))
        _fails_cleanly(sam, disguised, AdapterFormatError, "safetensors")
        with pytest.raises(AdapterFormatError):
            adapters.inspect(disguised)
        assert not wire.exists(), "the file was unpickled"

    assert adapters.attached(sam) == ["good", "trainee"]
    assert [n for n, p in sam.named_parameters() if p.requires_grad] and all(
        "samadapt_bottleneck.trainee" in n for n, p in sam.named_parameters() if p.requires_grad)
    adapters.detach(sam, "good")
    assert_equal_outputs(outputs(sam), plain["out"])


def test_attach_errors():
    sam = fresh()
    before = state_snapshot(sam)
    lora = adapters.config("lora")
    with pytest.raises(AdapterError, match=r"out of range.*0\.\.3"):
        adapters.attach(sam, adapters.config("lora", blocks=[99]), name="x")
    with pytest.raises(AdapterError, match="not valid"):
        adapters.config("lora", targets=["nothing"])
    with pytest.raises(AdapterError, match="unknown adapter kind 'hypernet'"):
        adapters.config("hypernet")
    with pytest.raises(AdapterError, match="no setting"):
        adapters.config("lora", rank=4)
    for bad in ("", "1abc", "a b", "a/b", "x" * 65, None, "a.b", "training", "train", "forward", "keys", "to"):
        with pytest.raises(AdapterError, match="not allowed"):
            adapters.attach(sam, lora, name=bad)
        with pytest.raises(AdapterError, match="not allowed"):
            adapters.attach(sam, [adapters.config(k) for k in KINDS], name=bad, decoder="full")
    with pytest.raises(AdapterError, match="decoder policy 'half'"):
        adapters.attach(sam, lora, name="x", decoder="half")
    with pytest.raises(AdapterError, match="listed twice"):
        adapters.attach(sam, [lora, adapters.config("lora", r=2)], name="x")
    with pytest.raises(AdapterError, match="not an adapter config"):
        adapters.attach(sam, {"kind": "lora"}, name="x")
    with pytest.raises(AdapterError, match="nothing to attach"):
        adapters.attach(sam, [], name="x")
    with pytest.raises(AdapterError, match="expected a sam_core.Sam"):
        adapters.attach(torch.nn.Linear(2, 2), lora, name="x")
    assert state_snapshot(sam) == before
    # every kind refuses out-of-range blocks, leaving nothing behind
    for kind in KINDS:
        fields = adapters.KINDS[kind].config_cls.__dataclass_fields__
        if "blocks" in fields:
            with pytest.raises(AdapterError, match="out of range"):
                adapters.attach(
                    sam,
                    [adapters.config(k) for k in KINDS if k != kind] + [adapters.config(kind, blocks=[99])],
                    name="x",
                )
            assert state_snapshot(sam) == before
    adapters.attach(sam, lora, name="x")
    with pytest.raises(AdapterError, match="already attached"):
        adapters.attach(sam, adapters.config("bottleneck"), name="x")
    with pytest.raises(AdapterError, match="no adapter named 'y'"):
        adapters.activate(sam, "y")
    with pytest.raises(AdapterError, match="no adapter named 'y'"):
        adapters.detach(sam, "y")
    with pytest.raises(AdapterError, match="fp8"):
        adapters.save(sam, "/tmp/never.safetensors", name="x", dtype="fp8")
    with pytest.raises(AdapterError, match="format"):
        adapters.save(sam, "/tmp/never.safetensors", name="x", format="mine")


# ----------------------------------------------------------------------------- 8. AdapterBank
BANK_FILES = {  # name -> (case, policy): three different kinds
    "seg_lora": ("lora", "lora"),
    "seg_evp": ("sam_adapter", "full"),
    "seg_bottle": ("bottleneck", "frozen"),
}
BANK_IMAGES = [np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8) for i in range(3)]
BANK_PROMPTS = [
    dict(point_coords=np.array([[64.0, 40.0]]), point_labels=np.array([1])),
    dict(box=np.array([10.0, 12.0, 90.0, 80.0])),
    dict(
        point_coords=np.array([[30.0, 30.0], [100.0, 70.0]]),
        point_labels=np.array([1, 0]),
        box=np.array([5.0, 5.0, 120.0, 90.0]),
        multimask_output=False,
    ),
]
BANK_ADAPTERS = [None] + list(BANK_FILES)


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bank")
    for i, (name, (case, policy)) in enumerate(BANK_FILES.items()):
        s = fresh()
        attach_case(s, case, policy, name=name)
        perturb(s, name, seed=10 + i)
        adapters.save(s, d / f"{name}.safetensors", name=name)
    return d


@pytest.fixture(scope="module")
def lone_results(bank_dir):
    """Every (adapter, image, prompt) request run alone: a fresh core and predictor per adapter."""
    out = {}
    for a in BANK_ADAPTERS:
        s = fresh()
        if a is not None:
            adapters.load(s, bank_dir / f"{a}.safetensors")
        pred = SamPredictor(s)
        for i, img in enumerate(BANK_IMAGES):
            pred.set_image(img)
            for j, pr in enumerate(BANK_PROMPTS):
                out[a, i, j] = pred.predict(**pr)
    return out


def assert_same_result(got, want):
    assert np.array_equal(got[0], want[0])
    assert np.allclose(got[1], want[1], rtol=0, atol=0)
    assert np.allclose(got[2], want[2], rtol=0, atol=0)


def test_bank_threads(bank_dir, lone_results):
    bank = AdapterBank(fresh(), bank_dir, capacity=8)
    assert sorted(bank.available()) == sorted(BANK_FILES)
    errors, done = [], []

    def worker(t):
        rng = random.Random(SEED + t)
        try:
            for _ in range(50):
                a, i, j = rng.choice(BANK_ADAPTERS), rng.randrange(len(BANK_IMAGES)), rng.randrange(len(BANK_PROMPTS))
                got = bank.predict(BANK_IMAGES[i], adapter=a, **BANK_PROMPTS[j])
                assert_same_result(got, lone_results[a, i, j])
                done.append((a, i, j))
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append((t, repr(e)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert len(done) == 400
    assert bank.stats["loads"] == len(BANK_FILES) and bank.stats["evictions"] == 0
    assert sorted(bank.resident()) == sorted(BANK_FILES)


def assert_close_result(got, want, tol=1e-4):
    """Equal up to float rounding: the bank encodes a batch's images together, and a batched GEMM
    rounds differently from one image at a time (~1e-6 on the embedding)."""
    assert got[0].shape == want[0].shape and (got[0] == want[0]).mean() >= 0.999
    assert np.allclose(got[1], want[1], rtol=0, atol=tol)
    assert np.allclose(got[2], want[2], rtol=0, atol=tol)


def test_bank_batch_mixed(bank_dir, lone_results):
    bank = AdapterBank(fresh(), bank_dir)
    # one image, every adapter and prompt, shuffled: one mixed encoder pass (tests/test_mixed_batch.py), so
    # equal up to a batched GEMM's rounding; one by one (mode="single") each image is encoded alone -> bit-exact
    keys = [(a, 0, j) for a in BANK_ADAPTERS for j in range(len(BANK_PROMPTS))]
    random.Random(SEED).shuffle(keys)
    items = [dict(BANK_PROMPTS[j], image=BANK_IMAGES[i], adapter=a) for a, i, j in keys]
    for got, key in zip(bank.predict_batch(items), keys):
        assert_close_result(got, lone_results[key])
    for got, key in zip(AdapterBank(fresh(), bank_dir).predict_batch(items, mode="single"), keys):
        assert_same_result(got, lone_results[key])

    # every image too: misses of one adapter are encoded as one batch
    keys = [(a, i, j) for a in BANK_ADAPTERS for i in range(len(BANK_IMAGES)) for j in range(len(BANK_PROMPTS))]
    random.Random(SEED + 1).shuffle(keys)
    items = [dict(BANK_PROMPTS[j], image=BANK_IMAGES[i], adapter=a) for a, i, j in keys]
    first = bank.predict_batch(items)
    for got, key in zip(first, keys):
        assert_close_result(got, lone_results[key])
    # again: all from the per-(image, adapter) cache, identical to the first answers
    misses = bank.stats["cache_misses"]
    for got, want in zip(bank.predict_batch(items), first):
        assert_same_result(got, want)
    assert bank.stats["cache_misses"] == misses
    # and each item alone through the bank (cached embeddings) gives the batch's answer
    for it, want in list(zip(items, first))[:12]:
        assert_same_result(bank.predict(**it), want)


def test_bank_capacity_and_listing(bank_dir, lone_results, tmp_path):
    d = tmp_path / "dir"
    shutil.copytree(bank_dir, d)
    bank = AdapterBank(fresh(), d, capacity=2)
    order = ["seg_lora", "seg_evp", "seg_bottle", "seg_lora", None, "seg_evp", "seg_evp", "seg_bottle"]
    for k, a in enumerate(order):
        i, j = k % len(BANK_IMAGES), k % len(BANK_PROMPTS)
        assert_same_result(bank.predict(BANK_IMAGES[i], adapter=a, **BANK_PROMPTS[j]), lone_results[a, i, j])
        assert len(bank.resident()) <= 2
    # LRU: after ... seg_evp, seg_evp, seg_bottle the residents are seg_evp and seg_bottle
    assert bank.resident() == ["seg_evp", "seg_bottle"]
    assert bank.stats["evictions"] == 4 and bank.stats["loads"] == 6
    assert len(adapters.attached(bank.sam)) == 2

    # a file dropped in appears, a removed one disappears
    shutil.copy(d / "seg_lora.safetensors", d / "seg_new.safetensors")
    assert "seg_new" in bank.available()
    assert_same_result(
        bank.predict(BANK_IMAGES[0], adapter="seg_new", **BANK_PROMPTS[0]), lone_results["seg_lora", 0, 0]
    )
    (d / "seg_lora.safetensors").unlink()
    assert "seg_lora" not in bank.available()
    with pytest.raises(AdapterError, match="no adapter named 'seg_lora'"):
        bank.predict(BANK_IMAGES[0], adapter="seg_lora", **BANK_PROMPTS[0])
    assert sorted(bank.available()) == ["seg_bottle", "seg_evp", "seg_new"]


def test_bank_capacity_and_cache_size_are_exact(bank_dir):
    """`capacity` below 1 is refused and 1 is allowed; `cache_size=n` keeps exactly the n newest embeddings;
    evicting an adapter drops its embeddings with it (a reload encodes again)."""
    with pytest.raises(AdapterError, match="capacity=0"):
        AdapterBank(fresh(), bank_dir, capacity=0)
    bank = AdapterBank(fresh(), bank_dir, capacity=1, cache_size=2)
    prompt = BANK_PROMPTS[0]
    for image in BANK_IMAGES[:2]:
        bank.predict(image, adapter="seg_lora", **prompt)
    hits, misses = bank.stats["cache_hits"], bank.stats["cache_misses"]
    for image in BANK_IMAGES[:2]:  # both still cached: the cache holds `cache_size` embeddings, not fewer
        bank.predict(image, adapter="seg_lora", **prompt)
    assert (bank.stats["cache_hits"], bank.stats["cache_misses"]) == (hits + 2, misses)
    bank.predict(BANK_IMAGES[2], adapter="seg_lora", **prompt)  # a third: the oldest goes, not more
    bank.predict(BANK_IMAGES[1], adapter="seg_lora", **prompt)
    assert (bank.stats["cache_hits"], bank.stats["cache_misses"]) == (hits + 3, misses + 1)
    bank.predict(BANK_IMAGES[1], adapter="seg_evp", **prompt)  # capacity 1: seg_lora is evicted ...
    assert bank.resident() == ["seg_evp"] and bank.stats["evictions"] == 1
    misses = bank.stats["cache_misses"]
    bank.predict(BANK_IMAGES[1], adapter="seg_lora", **prompt)  # ... and its embeddings went with it
    assert bank.stats["cache_misses"] == misses + 1


def test_bank_reloads_a_file_rewritten_on_disk(tmp_path):
    """A file rewritten in place with other weights (same name, same size) is served with the new
    weights on the next request, as a direct load of the new file gives them."""
    path = tmp_path / "x.safetensors"
    s = fresh()
    adapters.attach(s, adapters.config("lora", targets=["qkv", "proj"]), name="x")
    perturb(s, "x", seed=1)
    adapters.save(s, path, name="x")
    bank = AdapterBank(fresh(), tmp_path)
    image, prompt = BANK_IMAGES[0], BANK_PROMPTS[1]
    first = bank.predict(image, adapter="x", **prompt)
    old = path.stat()
    perturb(s, "x", seed=2)
    adapters.save(s, path, name="x")
    # a later mtime even where the clock is coarser than two writes apart
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    assert path.stat().st_size == old.st_size
    second = bank.predict(image, adapter="x", **prompt)
    direct = fresh()
    adapters.load(direct, path)
    pred = SamPredictor(direct)
    pred.set_image(image)
    assert_same_result(second, pred.predict(**prompt))
    assert not np.array_equal(first[2], second[2])  # the new weights answer differently
    assert bank.stats["loads"] == 2


GEN_ARGS = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def assert_same_masks(got, want):
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert np.array_equal(g["segmentation"], w["segmentation"])
        for k in ("area", "bbox", "predicted_iou", "stability_score", "point_coords", "crop_box"):
            assert g[k] == w[k], k


@pytest.mark.parametrize("adapter", BANK_ADAPTERS)
def test_bank_generate_matches_the_generator(bank_dir, adapter):
    """`AdapterBank.generate` under adapter X gives `SamAutomaticMaskGenerator(sam).generate` after
    `adapters.activate(sam, X)`, and a second call takes the whole-image embedding from the cache."""
    from samadapt.sam_core import SamAutomaticMaskGenerator

    image = BANK_IMAGES[1]
    s = fresh()
    if adapter is not None:
        adapters.load(s, bank_dir / f"{adapter}.safetensors")
    adapters.activate(s, adapter)
    want = SamAutomaticMaskGenerator(s, **GEN_ARGS).generate(image)

    bank = AdapterBank(fresh(), bank_dir)
    got = bank.generate(image, adapter=adapter, **GEN_ARGS)
    assert_same_masks(got, want)
    hits, misses = bank.stats["cache_hits"], bank.stats["cache_misses"]
    assert misses == 1
    assert_same_masks(bank.generate(image, adapter=adapter, **GEN_ARGS), want)
    assert (bank.stats["cache_hits"], bank.stats["cache_misses"]) == (hits + 1, misses)


# ----------------------------------------------------------------------------- peft as the reference
PEFT_CASES = {
    "qkv-all-blocks": (dict(r=4, targets=["qkv"]), "frozen"),
    "all-targets-some-blocks": (
        dict(r=3, alpha=6.0, targets=["qkv", "proj", "mlp.fc1", "mlp.fc2"], blocks=[0, 2]),
        "frozen",
    ),
    "dora": (dict(r=2, use_dora=True, targets=["qkv", "proj"]), "frozen"),
    "decoder-lora": (dict(r=4, targets=["proj"]), "lora"),
}


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_lora_matches_peft_inject_adapter_in_model(case):
    """Our targeted construction gives what peft's model-wide `inject_adapter_in_model` gives: the
    same layers (type, r, alpha, scaling, DoRA), the same tensor names as peft's
    `get_peft_model_state_dict`, tensors that peft's `set_peft_model_state_dict` places identically,
    and bit-identical outputs."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    kw, policy = PEFT_CASES[case]
    ours = fresh()
    adapters.attach(ours, adapters.config("lora", **kw), name="dom", decoder=policy)
    perturb(ours, "dom")
    sd = adapters.adapter_state_dict(ours, "dom")

    ref = fresh()
    cfg = adapters.config("lora", **kw)
    blocks = "|".join(map(str, cfg.blocks if cfg.blocks is not None else range(len(ref.image_encoder.blocks))))
    regex = r"image_encoder\.blocks\.(%s)\.(%s)" % (
        blocks,
        "|".join(re.escape(t if t.startswith("mlp") else "attn." + t) for t in cfg.targets),
    )
    enc_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=regex, use_dora=cfg.use_dora, bias="none")
    inject_adapter_in_model(enc_cfg, ref, adapter_name="dom")
    peft_cfgs = [("image_encoder.", enc_cfg)]
    if policy == "lora":
        dec_cfg = LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=r"mask_decoder\.transformer\..*(q_proj|k_proj|v_proj|out_proj)",
            bias="none",
        )
        inject_adapter_in_model(dec_cfg, ref, adapter_name="dom_dec")
        peft_cfgs.append(("mask_decoder.", dec_cfg))

    def lora_layers(model):
        return {p: m for p, m in model.named_modules() if isinstance(m, LoraLayer)}

    mine, theirs = lora_layers(ours), lora_layers(ref)
    for path, layer in theirs.items():  # peft's second injection made its adapter the active one everywhere
        layer.set_adapter("dom" if path.startswith("image_encoder.") else "dom_dec")
    assert sorted(mine) == sorted(theirs)
    for path, layer in mine.items():
        other = theirs[path]
        key = "dom" if path.startswith("image_encoder.") else "dom_dec"
        assert type(layer) is type(other)
        assert (layer.r["dom"], layer.lora_alpha["dom"], layer.scaling["dom"], layer.use_dora["dom"]) == \
            (other.r[key], other.lora_alpha[key], other.scaling[key], other.use_dora[key])

    # peft's names for peft's tensors = our file's names; peft places our tensors where ours are
    ref_sd = {}
    for prefix, pcfg in peft_cfgs:
        key = "dom" if prefix == "image_encoder." else "dom_dec"
        ref.__dict__["peft_config"] = {key: pcfg}
        part = {k: v for k, v in get_peft_model_state_dict(ref, adapter_name=key).items() if k.startswith(prefix)}
        ref_sd.update(part)
        res = set_peft_model_state_dict(ref, {k: v for k, v in sd.items() if k.startswith(prefix)}, adapter_name=key)
        assert not [k for k in res.unexpected_keys if "lora_" in k]
    assert sorted(ref_sd) == sorted(sd)
    for prefix, _ in peft_cfgs:
        key = "dom" if prefix == "image_encoder." else "dom_dec"
        ref.__dict__["peft_config"] = {key: peft_cfgs[0][1] if key == "dom" else peft_cfgs[-1][1]}
        for k, v in get_peft_model_state_dict(ref, adapter_name=key).items():
            if k.startswith(prefix):
                assert torch.equal(v, sd[k]), k
    assert_equal_outputs(outputs(ours), outputs(ref))


def test_adapter_index_is_every_adapter_tensor():
    """The per-adapter index (what save, load, trainable flags and parameter lists read) holds
    exactly the tensors the model's state_dict shows for that adapter, for every kind and policy."""
    sam = fresh()
    adapters.attach(sam, configs_of("all-kinds") if "all-kinds" in CASES else configs_of(CASE_NAMES[0]), name="a",
                    decoder="full")
    adapters.attach(sam, adapters.config("lora", r=2, use_dora=True), name="b", decoder="lora")
    full = sam.state_dict(keep_vars=True)
    for name in ("a", "b"):
        idx = adapters.base.adapter_tensors(sam, name)
        owned = {id(t) for t in idx.values()}
        in_model = {
            id(v)
            for k, v in full.items()
            if f".{name}." in f".{k}." and (".lora_" in k or "samadapt_" in k or k.startswith("adapter_decoders."))
        }
        assert owned == in_model, name
        assert {id(p) for p in adapters.adapter_parameters(sam, name)} == owned
    # nothing outside the core and the indexes holds parameters
    known = {id(p) for p in sam.core_parameters()} | {
        id(p) for n in ("a", "b") for p in adapters.adapter_parameters(sam, n)
    }
    assert known == {id(p) for p in sam.parameters()}


def test_load_keeps_requires_grad_flags(tmp_path):
    """Loading a LoRA file onto layers that already hold a LoRA being trained (peft re-flags the
    adapters of a layer it adds to): the trainee stays trainable, the loaded adapter and the core
    stay frozen; `is_trainable=True` makes the loaded adapter the only trainable one."""
    donor = fresh()
    adapters.attach(donor, adapters.config("lora", r=2, targets=["qkv"]), name="x", decoder="lora")
    path = adapters.save(donor, tmp_path / "x.safetensors", name="x")

    sam = fresh()
    adapters.attach(sam, adapters.config("lora", r=4, targets=["qkv", "proj"]), name="trainee", decoder="lora")
    adapters.activate(sam, "trainee")
    trainee = {id(p) for p in adapters.adapter_parameters(sam, "trainee")}

    def trainable():
        return {id(p) for p in sam.parameters() if p.requires_grad}

    assert trainable() == trainee
    adapters.load(sam, path)
    assert adapters.active(sam) == "x" and trainable() == trainee
    adapters.load(sam, path, name="y", activate=False, is_trainable=True)
    assert adapters.active(sam) == "x"
    assert trainable() == {id(p) for p in adapters.adapter_parameters(sam, "y")}


def test_deepcopy_keeps_its_own_adapter_index(tmp_path):
    """A deep copy of an adapted model has its own index (pointing into the copy): swapping,
    detaching and loading on the copy leaves the original untouched."""
    import copy

    sam = fresh()
    adapters.attach(
        sam, [adapters.config("bottleneck", width=8), adapters.config("lora", r=2)], name="a", decoder="lora"
    )
    perturb(sam, "a")
    ref = outputs(sam)
    twin = copy.deepcopy(sam)
    own = {id(p) for p in sam.parameters()}
    assert not own & {id(p) for p in adapters.adapter_parameters(twin, "a")}
    assert_equal_outputs(outputs(twin), ref)
    path = adapters.save(twin, tmp_path / "a.safetensors", name="a")
    adapters.detach(twin, "a")
    adapters.load(twin, path, name="b")
    assert_equal_outputs(outputs(twin), ref)
    assert adapters.attached(sam) == ["a"] and adapters.active(sam) == "a"
    assert_equal_outputs(outputs(sam), ref)


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize("name", ["v1_lora_dora_declora", "v1_bottleneck_evp_lora"])
def test_files_written_by_earlier_versions_still_load(name):
    """Adapter files written by an earlier samadapt (format samadapt.adapter/1, commit 0e9a1ff, fp16;
    see tests/fixtures/make_v1_fixtures.py) load with this code and give the outputs that code computed."""
    import importlib.util

    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("make_v1_fixtures", FIXTURES / "make_v1_fixtures.py")
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    want = load_file(str(FIXTURES / "v1_expected.safetensors"))
    assert torch.equal(want["image"], fx.formula_image())
    sam = fx.formula_core()
    assert adapters.load(sam, FIXTURES / f"{name}.safetensors") == name  # the base fingerprint matches too

    def run():
        with torch.no_grad():
            return sam.forward_masks(want["image"].float(), point_coords=torch.tensor(fx.IMAGE_POINT),
                                     point_labels=torch.tensor([[1]]), multimask_output=True)

    low, iou = run()
    # float rounding only (thread partitioning); a misplaced tensor is far off, as the plain core shows
    assert (low - want[f"{name}.low_res"]).abs().max().item() <= 1e-5  # measured: 0.0
    assert (iou - want[f"{name}.iou"]).abs().max().item() <= 1e-5
    adapters.activate(sam, None)  # the adapter's effect: 0.035 and 0.012 here
    assert (run()[0] - want[f"{name}.low_res"]).abs().max().item() > 1e-3
