"""The image encoder's CPU route (`sam_core.fast.cpu`): which route is chosen (the CPU's capability
patched both ways), that the route chosen is the one that runs, the masks' agreement with fp32
segment_anything on the same weights per route (>= 99 % of pixels for points, boxes and box+points),
and adapters (LoRA, DoRA, sam_adapter, bottleneck; merged and unmerged) on the bf16 route.
"""
import numpy as np
import pytest
import torch
from reference import build_meta_sam

from samadapt import adapters
from samadapt.sam_core import SamPredictor, build_sam, load_sam
from samadapt.sam_core.fast import cpu as cpu_route
from samadapt.sam_core.fast import fast_attention_enabled
from samadapt.sam_core.fast.attention import FastSamAttention

sa = pytest.importorskip("segment_anything")

BF16_CPU = {"capability": "AVX512", "avx512_bf16": True, "amx_bf16": True, "arm_bf16": False}
FP32_CPU = {"capability": "AVX2", "avx512_bf16": False, "amx_bf16": False, "arm_bf16": False}
AGREEMENT = 0.99  # the stated bound: share of mask pixels equal to fp32 segment_anything's


def _seen_in_encoder(sam):
    """Hooks recording the dtype of the first block's qkv output and the attention class that ran."""
    seen = {}
    attn = sam.image_encoder.blocks[0].attn
    # (the hooks return None: a returned value would replace the module's input or output)
    hooks = [attn.qkv.register_forward_hook(lambda m, a, out: seen.setdefault("dtype", out.dtype) and None),
             attn.register_forward_pre_hook(lambda m, a: seen.setdefault("attention", type(m)) and None)]
    return seen, hooks


@pytest.mark.parametrize("features,expect", [(BF16_CPU, "bf16"), (FP32_CPU, "fp32")], ids=["bf16-cpu", "no-bf16-cpu"])
def test_route_follows_the_cpu_capability(monkeypatch, features, expect):
    monkeypatch.delenv(cpu_route.ENV_PRECISION, raising=False)
    monkeypatch.setattr(cpu_route, "cpu_features", lambda: dict(features))
    sam = build_sam("tiny", image_size=512).eval()  # at 512 px `auto` takes bf16 where the CPU has it
    pred = SamPredictor(sam)
    assert pred.route.precision == expect and pred.route.attention == "factorised", pred.route
    seen, hooks = _seen_in_encoder(sam)
    pred.set_image(np.zeros((100, 140, 3), np.uint8))
    for h in hooks:
        h.remove()
    # the route chosen is the route that ran, and the model is left as built afterwards
    assert seen["dtype"] == (torch.bfloat16 if expect == "bf16" else torch.float32)
    assert seen["attention"] is FastSamAttention
    assert not fast_attention_enabled(sam)
    assert pred.features.dtype == torch.float32  # the decoder gets the model's dtype either way
    assert expect in pred.route.describe()
    # the same through the bank
    assert adapters.AdapterBank(sam).route.precision == expect


def test_route_settings(monkeypatch):
    monkeypatch.setattr(cpu_route, "cpu_features", lambda: dict(BF16_CPU))
    monkeypatch.delenv(cpu_route.ENV_PRECISION, raising=False)
    big, small = build_sam("tiny", image_size=512), build_sam("tiny")
    assert SamPredictor(big).route.precision == "bf16"
    r = SamPredictor(small).route  # 256 px: fp32 is the faster route, bf16 CPU or not
    assert r.precision == "fp32" and "256 px" in r.reason, r
    # forcing fp32: the environment, then the argument over the environment
    monkeypatch.setenv(cpu_route.ENV_PRECISION, "fp32")
    assert SamPredictor(big).route.precision == "fp32"
    assert adapters.AdapterBank(big).route.precision == "fp32"
    assert SamPredictor(big, precision="auto").route.precision == "bf16"
    assert SamPredictor(small, precision="bf16").route.precision == "bf16"
    assert SamPredictor(big, fast=False).route.precision == "as built"
    monkeypatch.setenv(cpu_route.ENV_PRECISION, "half")
    with pytest.raises(ValueError, match="SAMADAPT_PRECISION='half' is not a precision.*fp32"):
        SamPredictor(big)
    with pytest.raises(ValueError, match="precision='fp16' is not a precision"):
        adapters.AdapterBank(big, precision="fp16")


def test_route_keeps_a_models_own_fast_attention():
    from samadapt.sam_core.fast import enable_fast_attention

    sam = build_sam("tiny")
    enable_fast_attention(sam, kernel="sdpa")
    SamPredictor(sam, precision="bf16").set_image(np.zeros((40, 50, 3), np.uint8))
    assert fast_attention_enabled(sam)  # switched by its owner: not switched back


def test_detection_reads_this_machine():
    f = cpu_route.cpu_features()
    flags = cpu_route._cpuinfo_flags()
    if flags:  # Linux: torch's probes and the kernel's flags agree on this machine
        assert f["avx512_bf16"] == ("avx512_bf16" in flags)
        assert f["amx_bf16"] == ("amx_bf16" in flags)
    assert cpu_route.native_bf16(f) == bool(f["avx512_bf16"] or f["amx_bf16"] or f["arm_bf16"])


# ----------------------------------------------------------------------------- agreement with segment_anything
PROMPTS = {
    "point": dict(point_coords=np.array([[150.0, 100.0]]), point_labels=np.array([1])),
    "points": dict(point_coords=np.array([[150.0, 100.0], [60.0, 250.0], [350.0, 40.0]]),
                   point_labels=np.array([1, 0, 1])),
    "box": dict(box=np.array([40.0, 30.0, 300.0, 220.0])),
    "box+points": dict(box=np.array([40.0, 30.0, 300.0, 220.0]),
                       point_coords=np.array([[120.0, 100.0], [280.0, 200.0]]), point_labels=np.array([1, 0])),
}


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4: h // 2, w // 3: w // 2] = (240, 30, 30)
    return img


def _agreement(arch, image_size, precision, image, scale=1.0):
    """{prompt: worst pixel agreement over multimask and single-mask outputs}, and the embedding's
    relative error, of our predictor on `precision` against fp32 segment_anything on the same weights.
    """
    ref = build_meta_sam(arch, image_size)
    ours = load_sam(ref.state_dict())
    p1, p2 = SamPredictor(ours, precision=precision), sa.SamPredictor(ref)
    assert p1.route.precision == precision
    p1.set_image(image)
    p2.set_image(image)
    e1, e2 = p1.get_image_embedding(), p2.get_image_embedding()
    rel = float((e1 - e2).norm() / e2.norm())
    worst = {}
    for name, kw in PROMPTS.items():
        kw = {k: (v * scale if k in ("point_coords", "box") else v) for k, v in kw.items()}
        for mm in (True, False):
            m1, m2 = p1.predict(multimask_output=mm, **kw)[0], p2.predict(multimask_output=mm, **kw)[0]
            assert m1.shape == m2.shape
            # precondition: a mask with both classes present (an all-empty pair would agree trivially)
            assert 0.02 < m2.mean() < 0.98, (name, m2.mean())
            worst[name] = min(worst.get(name, 1.0), float((m1 == m2).mean()))
    return worst, rel


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_agreement_tiny(precision):
    worst, rel = _agreement("tiny", 256, precision, _image(300, 400))
    print(f"tiny 256 px {precision}: embedding rel. error {rel:.4f}; worst pixel agreement "
          + ", ".join(f"{k} {v:.4f}" for k, v in worst.items()))
    assert all(v >= AGREEMENT for v in worst.values()), worst
    if precision == "fp32":  # exact route: only float rounding
        assert rel < 1e-5 and all(v >= 0.9999 for v in worst.values()), (rel, worst)
    else:  # a real bf16 encoder ran (not fp32 under another name)
        assert 1e-4 < rel < 0.03, rel


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_agreement_vit_b(precision):
    worst, rel = _agreement("vit_b", 1024, precision, _image(600, 800, seed=1), scale=2.0)
    print(f"vit_b 1024 px {precision}: embedding rel. error {rel:.4f}; worst pixel agreement "
          + ", ".join(f"{k} {v:.4f}" for k, v in worst.items()))
    assert all(v >= AGREEMENT for v in worst.values()), worst
    if precision == "bf16":
        assert 1e-4 < rel < 0.03, rel


# ----------------------------------------------------------------------------- adapters on the bf16 route
ADAPTER_CASES = {
    "lora": [adapters.config("lora", r=4, targets=["qkv", "proj"])],
    "dora": [adapters.config("lora", r=4, use_dora=True, targets=["qkv"])],
    "sam_adapter": [adapters.config("sam_adapter")],
    "bottleneck": [adapters.config("bottleneck")],
    # merged: the LoRA is folded into the core, the other kinds stay modules
    "all-kinds": [adapters.config("sam_adapter"), adapters.config("bottleneck"), adapters.config("lora", r=4)],
}
ADAPTER_MATRIX = [pytest.param(c, False, id=f"{c}-unmerged") for c in ADAPTER_CASES] + [
    pytest.param(c, True, id=f"{c}-merged") for c in ("lora", "dora", "all-kinds")]


@pytest.mark.parametrize("case,merged", ADAPTER_MATRIX)
def test_adapters_on_the_bf16_route(case, merged):
    torch.manual_seed(0)
    sam = build_sam("tiny").eval()
    image = _image(200, 260, seed=2)
    plain = SamPredictor(sam, precision="fp32")
    plain.set_image(image)
    plain_emb = plain.get_image_embedding().clone()
    adapters.attach(sam, ADAPTER_CASES[case], name="a")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a stand-in for training: a freshly attached adapter changes nothing
        for p in adapters.adapter_parameters(sam, "a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    if merged:
        fp = sam.fingerprint
        adapters.merge(sam, "a")
        assert sam.fingerprint != fp  # the LoRA is in the core's weights now
    p32, p16 = SamPredictor(sam, precision="fp32"), SamPredictor(sam, precision="bf16")
    p32.set_image(image)
    p16.set_image(image)
    e32, e16 = p32.get_image_embedding(), p16.get_image_embedding()
    effect = float((e32 - plain_emb).norm() / plain_emb.norm())
    err = float((e16 - e32).norm() / e32.norm())
    # precondition: the adapter changes the embedding far more than bf16 rounding does
    assert effect > 5 * err, (effect, err)
    assert err < 0.03, err
    for kw in PROMPTS.values():
        m32, m16 = p32.predict(multimask_output=False, **kw)[0], p16.predict(multimask_output=False, **kw)[0]
        assert (m32 == m16).mean() >= AGREEMENT, (kw, (m32 == m16).mean())
