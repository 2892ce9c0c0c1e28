"""One encoder pass for a batch whose items name different adapters (`adapters.mixed`).

Shown on the tiny core (its blocks 0 and 2 are windowed: 4 windows per image) and on vit_b dims
(windows padded, 256 px): every kind (LoRA, DoRA, sam_adapter, bottleneck, combined) with every
decoder policy in one mixed batch, items without an adapter among them, equals per-item runs
within 1e-5 (fp32); the bank's `predict_batch` runs one encoder pass for it and answers as
one-by-one requests do; bad uses are refused with one clear error.
"""
import numpy as np
import pytest
import torch

from samadapt import adapters
from samadapt.adapters import AdapterBank, AdapterError
from samadapt.sam_core import SamPredictor, build_sam

TOL = 1e-5

SETUPS = {  # adapter name -> (configs, decoder policy)
    "lo": (lambda: [adapters.config("lora", r=4, targets=["qkv", "proj", "mlp.fc1", "mlp.fc2"])], "lora"),
    "do": (lambda: [adapters.config("lora", r=2, use_dora=True, targets=["qkv", "proj"])], "frozen"),
    "ev": (lambda: [adapters.config("sam_adapter")], "full"),
    "bo": (lambda: [adapters.config("bottleneck", blocks=[0, 2])], "frozen"),
    "co": (lambda: [adapters.config("sam_adapter"), adapters.config("lora"), adapters.config("bottleneck")], "full"),
}


def perturb(sam, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.adapter_parameters(sam, name):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def windowed_blocks(sam):
    return [i for i, b in enumerate(sam.image_encoder.blocks) if b.window_size > 0]


@pytest.fixture(scope="module")
def core():
    torch.manual_seed(0)
    sam = build_sam("tiny").eval()
    for i, (name, (cfgs, policy)) in enumerate(SETUPS.items()):
        adapters.attach(sam, cfgs(), name=name, decoder=policy)
        perturb(sam, name, 100 + i)
    adapters.activate(sam, None)
    return sam


def one_by_one(sam, x, owners):
    out = []
    for i, name in enumerate(owners):
        adapters.activate(sam, name)
        out.append(sam.encode_image(x[i: i + 1]))
    adapters.activate(sam, None)
    return torch.cat(out)


@pytest.mark.parametrize("owners", [
    ["lo", "do", "ev", "bo", "co", None],  # every kind once, the plain core among them
    ["co", None, "lo", "co", "lo", None, "ev"],  # an adapter's items apart (index rows, not one slice)
    ["do", "do"],  # one adapter: the routed pass equals the ordinary one
])
def test_mixed_pass_equals_per_item_runs(core, owners):
    assert windowed_blocks(core) == [0, 2]  # the routing is tested through windowed blocks
    g = torch.Generator().manual_seed(len(owners))
    x = torch.randn(len(owners), 3, core.image_size, core.image_size, generator=g)
    with torch.no_grad():
        want = one_by_one(core, x, owners)
        with adapters.route(core, owners) as r:
            assert adapters.active(core) is None and r.names() == list(dict.fromkeys(o for o in owners if o))
            got = core.encode_image(x)
        plain = core.encode_image(x)
    assert adapters.active(core) is None  # restored
    assert (got - want).abs().max().item() <= TOL
    # the adapters do change their rows (else equality would prove nothing), the plain rows are the core's
    for i, name in enumerate(owners):
        diff = (want[i] - plain[i]).abs().max().item()
        assert diff > 1e-2 if name is not None else diff <= TOL, (i, name, diff)


def test_mixed_pass_on_vit_b_dims_with_padded_windows():
    torch.manual_seed(1)
    sam = build_sam("vit_b", image_size=256).eval()  # 16 x 16 tokens in 14 x 14 windows: padded to 28, 4 windows
    assert windowed_blocks(sam) and sam.image_encoder.blocks[0].window_size == 14
    adapters.attach(sam, [adapters.config("lora", r=4, targets=["qkv", "proj"])], name="l")
    adapters.attach(sam, [adapters.config("bottleneck", blocks=[0, 1, 2])], name="b")
    adapters.attach(sam, [adapters.config("lora", use_dora=True, r=2, blocks=[0, 2, 4]),
                          adapters.config("sam_adapter", blocks=[0, 1])], name="d")
    for i, n in enumerate("lbd"):
        perturb(sam, n, i)
    owners = ["b", None, "l", "d"]
    x = torch.randn(len(owners), 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = one_by_one(sam, x, owners)
        with adapters.route(sam, owners):
            got = sam.encode_image(x)
    assert (got - want).abs().max().item() <= TOL
    assert (want[0] - want[1]).abs().max().item() > 1e-3


def test_route_refusals(core):
    with pytest.raises(AdapterError, match="no adapter named 'nope' is attached"):
        with adapters.route(core, ["lo", "nope"]):
            pass
    with adapters.route(core, ["lo"]):
        with pytest.raises(AdapterError, match="already running"):
            with adapters.route(core, ["do"]):
                pass
    assert adapters.mixed.current(core) is None
    sam = build_sam("tiny")
    adapters.attach(sam, adapters.config("lora"), name="m")
    adapters.merge(sam, "m")
    with pytest.raises(AdapterError, match="unmerge"):
        with adapters.route(sam, ["m", None]):
            pass
    r = adapters.RowRoute(["a", None])
    with pytest.raises(AdapterError, match="not a multiple of the batch"):
        r.rows("a", 3)


# ----------------------------------------------------------------------------- the bank
IMAGES = [np.random.default_rng(i).integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8) for i in range(4)]
PROMPTS = [dict(box=np.array([10.0, 12.0, 90.0, 80.0])),
           dict(point_coords=np.array([[60.0, 40.0], [5.0, 5.0]]), point_labels=np.array([1, 0]),
                multimask_output=False),
           dict()]


def bank_items():
    names = list(SETUPS) + [None]
    return [dict(PROMPTS[k % len(PROMPTS)], image=IMAGES[k % len(IMAGES)], adapter=names[k % len(names)])
            for k in range(12)]


def test_bank_predict_batch_is_one_encoder_pass_equal_to_one_by_one(core, tmp_path):
    for name in SETUPS:
        adapters.save(core, tmp_path / f"{name}.safetensors", name=name)
    items = bank_items()
    results = {}
    for mode in ("mixed", "grouped", "single"):
        sam = build_sam("tiny").eval()
        sam.load_state_dict(core.core_state_dict())
        passes = []
        sam.image_encoder.patch_embed.register_forward_hook(lambda m, a, out, seen=passes: seen.append(out.shape[0]))
        results[mode] = AdapterBank(sam, tmp_path, capacity=8).predict_batch(items, mode=mode)
        distinct = len({(id(it["image"]), it["adapter"]) for it in items})
        assert sum(passes) == distinct  # each (image, adapter) encoded once
        assert len(passes) == {"mixed": 1, "grouped": len(SETUPS) + 1, "single": distinct}[mode], (mode, passes)
    # one by one through a predictor per adapter, as a lone request runs
    for k, it in enumerate(items):
        ref = build_sam("tiny").eval()
        ref.load_state_dict(core.core_state_dict())
        if it["adapter"] is not None:
            adapters.load(ref, tmp_path / f"{it['adapter']}.safetensors")
        pred = SamPredictor(ref)
        pred.set_image(it["image"])
        want = pred.predict(**{p: v for p, v in it.items() if p not in ("image", "adapter")})
        for mode, got in results.items():
            m, s, low = got[k]
            assert m.shape == want[0].shape and (m == want[0]).mean() >= 0.999, (mode, k)
            assert np.abs(s - want[1]).max() <= 1e-4 and np.abs(low - want[2]).max() <= 1e-4, (mode, k)


def test_bank_batch_over_capacity_runs_in_parts(core, tmp_path):
    for name in ("lo", "do", "ev"):
        adapters.save(core, tmp_path / f"{name}.safetensors", name=name)
    sam = build_sam("tiny").eval()
    sam.load_state_dict(core.core_state_dict())
    passes = []
    sam.image_encoder.patch_embed.register_forward_hook(lambda m, a, out: passes.append(out.shape[0]))
    bank = AdapterBank(sam, tmp_path, capacity=2)
    items = [dict(image=IMAGES[k % 2], adapter=n, box=[5, 5, 50, 50]) for k, n in enumerate(("lo", "do", "ev", None))]
    got = bank.predict_batch(items)
    assert passes == [3, 1]  # lo, do and the plain core in one pass; then ev, once the bank has room
    assert len(bank.resident()) <= 2 and bank.stats["evictions"] == 1
    ref = build_sam("tiny").eval()
    ref.load_state_dict(core.core_state_dict())
    for g, want in zip(got, AdapterBank(ref, tmp_path, capacity=4).predict_batch(items, mode="single")):
        assert np.abs(g[2] - want[2]).max() <= 1e-4 and np.abs(g[1] - want[1]).max() <= 1e-4
    with pytest.raises(AdapterError, match="mode="):
        bank.predict_batch(items[:1], mode="fast")


def test_peft_mixed_batches_cannot_route_windowed_blocks(core):
    """Why the routing is ours: peft's `adapter_names=` takes one name per row, but a windowed block's
    `qkv` sees batch x windows rows, so a per-image list does not fit it."""
    layer = core.image_encoder.blocks[0].attn.qkv  # block 0 is windowed: 4 windows per image
    seen = []
    h = core.image_encoder.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    with torch.no_grad():
        core.encode_image(torch.zeros(2, 3, core.image_size, core.image_size))
    h.remove()
    assert seen == [8]  # 2 images -> 8 rows
    x = torch.randn(8, 64, core.image_encoder.embed_dim)
    with pytest.raises(ValueError, match="adapter_names"):
        layer(x, adapter_names=["lo", "do"])  # one name per image, as a caller of the model knows them
