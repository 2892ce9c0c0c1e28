"""Loading SAM checkpoints (sam_core/checkpoint.py): parity with transformers' `SamModel`, strict
errors, format detection, the core fingerprint and input-size resizing.

Notes on transformers' SAM (read from transformers/models/sam/modeling_sam.py):
* `get_image_embeddings` takes already normalised, padded pixels: we feed it `sam.preprocess(x)`.
* Prompts are 4-D/3-D there: points (B, point_batch, N, 2), labels (B, point_batch, N), boxes
  (B, n_boxes, 4); outputs are (B, point_batch, C, 64, 64). A lone point set is padded with one
  (0, 0) point of label -1 exactly as Meta does (only when no box is given), so no input changes
  are needed; the extra label -10 (HF's own "ignore" padding) is never used here.
* The one documented numeric difference: HF's two-way-transformer LayerNorms use
  `mask_decoder_config.layer_norm_eps` (default 1e-6, also in the converted facebook/sam-vit-*
  configs) where Meta (and we) use nn.LayerNorm's 1e-5. With HF defaults the decoder outputs differ
  by ~2e-5 (inside 1e-4); with layer_norm_eps=1e-5 they agree to float rounding.
* HF initialises the shared Fourier matrix with std = vision hidden_size // 2 (48 here; Meta: 1);
  our randomisation draws it with std 1 like real checkpoints.
"""
import math
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from reference import build_meta_sam
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed_nhwc
from torch.nn import functional as F

from samadapt.sam_core import ARCHS, CheckpointError, build_sam, load_sam
from samadapt.sam_core.checkpoint import hf_to_samadapt, meta_to_samadapt

TOL = 1e-4
TINY = ARCHS["tiny"]


# ---------------------------------------------------------------------------- helpers
def _image(h=256, w=200, seed=3):
    """0..255 float pixels, 1 x 3 x h x w (non-square: preprocess pads it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h, w, generator=g) * 255
    x[..., h // 4: h // 2, w // 3: w // 2] = torch.tensor([240.0, 30.0, 30.0])[:, None, None]
    return x


@torch.no_grad()
def _randomize_all_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter gets a seeded random value of a sane scale (zero-initialised position tables
    included), so that outputs are O(1) and every weight matters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        n = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_(1 + 0.1 * n if name.endswith("weight") else 0.1 * n)
        elif "positional_embedding" in name or "positional_encoding" in name:
            p.copy_(n)
        elif "rel_pos" in name or "pos_embed" in name:
            p.copy_(0.5 * n)
        elif p.ndim >= 2 and not name.endswith(("token.weight", "tokens.weight", "embed.weight")) \
                and ".point_embed." not in name:
            p.copy_(n / math.sqrt(p[0].numel()))  # linear / conv weights: unit fan-in scale
        elif p.ndim >= 2:
            p.copy_(n)  # embeddings (tokens, point codes): unit scale
        else:
            p.copy_(0.1 * n)  # biases
    return model


def _hf_config(layer_norm_eps=None):
    from transformers import SamConfig

    decoder = dict(
        hidden_size=TINY.prompt_embed_dim,
        mlp_dim=TINY.decoder_mlp_dim,
        num_hidden_layers=TINY.decoder_depth,
        num_attention_heads=TINY.decoder_heads,
        iou_head_hidden_dim=TINY.iou_head_hidden_dim,
    )
    if layer_norm_eps is not None:
        decoder["layer_norm_eps"] = layer_norm_eps
    return SamConfig(
        vision_config=dict(
            hidden_size=TINY.embed_dim, num_hidden_layers=TINY.depth, num_attention_heads=TINY.num_heads,
            global_attn_indexes=list(TINY.global_attn_indexes), window_size=TINY.window_size,
            image_size=TINY.image_size, output_channels=TINY.prompt_embed_dim, mlp_dim=4 * TINY.embed_dim,
            num_pos_feats=TINY.prompt_embed_dim // 2,  # the shared Fourier matrix is 2 x C/2
        ),
        prompt_encoder_config=dict(hidden_size=TINY.prompt_embed_dim, image_size=TINY.image_size,
                                   mask_input_channels=TINY.mask_in_chans),
        mask_decoder_config=decoder,
    )


def _hf_sam(layer_norm_eps=None, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.SamModel(_hf_config(layer_norm_eps)).eval()
    assert model.config.prompt_encoder_config.image_embedding_size == 16
    return _randomize_all_(model, seed)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _print(capsys, *args):
    with capsys.disabled():
        print("\n   ", *args, end="")


PROMPTS = {  # (point coords N x 2 | None, labels N | None, box 4 | None) in the 256-px input frame
    "point": (torch.tensor([[150.0, 90.0]]), torch.tensor([1]), None),
    "points": (torch.tensor([[150.0, 90.0], [40.0, 170.0], [190.0, 20.0]]), torch.tensor([1, 0, 1]), None),
    "box": (None, None, torch.tensor([30.0, 20.0, 180.0, 160.0])),
    "box+points": (
        torch.tensor([[100.0, 80.0], [150.0, 150.0]]),
        torch.tensor([1, 0]),
        torch.tensor([30.0, 20.0, 180.0, 160.0]),
    ),
}


@torch.no_grad()
def _ours_outputs(sam, x=None):
    """Embedding and decoder outputs for every prompt (and a mask prompt) on one image."""
    x = _image() if x is None else x
    emb = sam.encode_image(sam.preprocess(x))
    out = {"embedding": emb}
    for name, (pts, labels, box) in PROMPTS.items():
        for mm in (True, False):
            out[name, mm] = sam.decode(
                emb,
                None if pts is None else pts[None],
                None if labels is None else labels[None],
                None if box is None else box[None],
                None,
                mm,
            )
    out["mask"] = sam.decode(emb, PROMPTS["point"][0][None], PROMPTS["point"][1][None], None,
                             out["point", False][0], True)
    return out


# ---------------------------------------------------------------------------- 1. transformers parity
@pytest.fixture(scope="module", params=[None, 1e-5], ids=["hf-default-eps", "meta-eps"])
def hf_pair(request, tmp_path_factory):
    """A random transformers SamModel saved with save_pretrained, and its folder."""
    model = _hf_sam(request.param, seed=1)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return model, folder, request.param


def test_hf_parity(hf_pair, capsys):
    model, folder, eps = hf_pair
    assert (folder / "model.safetensors").exists()
    sam = load_sam(folder)
    sam_file = load_sam(folder / "model.safetensors")
    assert sam.arch == sam_file.arch == "tiny" and sam.source_format == sam_file.source_format == "hf"
    assert sam.fingerprint == sam_file.fingerprint

    px = sam.preprocess(_image())  # HF wants normalised, padded pixels
    with torch.no_grad():
        e_hf = model.get_image_embeddings(px)
        e_ours = sam.encode_image(px)
        e_file = sam_file.encode_image(px)
    assert e_ours.abs().max() > 1  # O(1) outputs: the tolerance means something
    diffs = {"embedding": _max_diff(e_hf, e_ours)}
    assert _max_diff(e_ours, e_file) == 0
    assert diffs["embedding"] <= TOL

    emb = e_ours
    with torch.no_grad():
        for name, (pts, labels, box) in PROMPTS.items():
            for mm in (True, False):
                o = model(image_embeddings=emb,
                          input_points=None if pts is None else pts[None, None],
                          input_labels=None if labels is None else labels[None, None],
                          input_boxes=None if box is None else box[None, None],
                          multimask_output=mm)
                low, iou = sam.decode(
                    emb,
                    None if pts is None else pts[None],
                    None if labels is None else labels[None],
                    None if box is None else box[None],
                    None,
                    mm,
                )
                assert low.shape == (1, 3 if mm else 1, 64, 64)
                assert low.abs().max() > 0.1
                diffs[f"{name}/mm={mm} logits"] = _max_diff(o.pred_masks[:, 0], low)
                diffs[f"{name}/mm={mm} iou"] = _max_diff(o.iou_scores[:, 0], iou)
        # a mask prompt (previous low-res logits), and two point prompts batched on one image
        prev = sam.decode(emb, PROMPTS["point"][0][None], PROMPTS["point"][1][None], None, None, False)[0]
        o = model(image_embeddings=emb, input_points=PROMPTS["point"][0][None, None],
                  input_labels=PROMPTS["point"][1][None, None], input_masks=prev, multimask_output=True)
        low, iou = sam.decode(emb, PROMPTS["point"][0][None], PROMPTS["point"][1][None], None, prev, True)
        diffs["mask logits"], diffs["mask iou"] = (
            _max_diff(o.pred_masks[:, 0], low),
            _max_diff(o.iou_scores[:, 0], iou),
        )
        two = torch.tensor([[[60.0, 50.0]], [[170.0, 200.0]]])  # 2 prompts x 1 point
        o = model(image_embeddings=emb, input_points=two[None], input_labels=torch.ones(1, 2, 1, dtype=torch.long),
                  multimask_output=True)
        low, iou = sam.decode(emb, two, torch.ones(2, 1, dtype=torch.long), None, None, True)
        diffs["2 prompts logits"], diffs["2 prompts iou"] = (
            _max_diff(o.pred_masks[0], low),
            _max_diff(o.iou_scores[0], iou),
        )
    worst = max(diffs.values())
    _print(capsys, f"HF parity (layer_norm_eps={eps or 'HF default 1e-6'}): max |diff| {worst:.2e}, "
                   f"embedding {diffs['embedding']:.2e}")
    assert worst <= TOL, diffs
    if eps == 1e-5:  # with Meta's LayerNorm eps the only differences left are float rounding
        assert worst <= 1e-6, diffs


def test_hf_key_mapping_covers_every_weight(hf_pair):
    """Every HF tensor maps to one of ours (the tied Fourier copy is checked and dropped)."""
    model, _, _ = hf_pair
    converted = hf_to_samadapt(model.state_dict())
    assert sorted(converted) == sorted(build_sam("tiny").state_dict())


# ---------------------------------------------------------------------------- checkpoints on disk
@pytest.fixture(scope="module")
def meta_sd():
    return {k: v.contiguous() for k, v in build_meta_sam("tiny").state_dict().items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, meta_sd):
    """The same (Meta reference) weights in every supported format."""
    d = tmp_path_factory.mktemp("ckpts")
    paths = {"meta.pth": d / "sam_tiny.pth", "meta.safetensors": d / "sam_tiny.safetensors",
             "nested.pth": d / "nested.pth", "ours.pth": d / "ours.pth", "ours.safetensors": d / "ours.safetensors"}
    torch.save(meta_sd, paths["meta.pth"])
    save_file(meta_sd, str(paths["meta.safetensors"]))
    torch.save({"model": meta_sd, "epoch": 3, "note": "trainer output"}, paths["nested.pth"])
    ours = load_sam(paths["meta.pth"]).state_dict()
    torch.save(ours, paths["ours.pth"])
    save_file({k: v.contiguous() for k, v in ours.items()}, str(paths["ours.safetensors"]))
    try:
        hf = _hf_sam(seed=5)
    except pytest.skip.Exception:
        return paths
    # fill the HF model with the Meta weights through its own state-dict views
    views = hf_to_samadapt(hf.state_dict())
    target = meta_to_samadapt(meta_sd)
    assert sorted(views) == sorted(target)
    with torch.no_grad():
        for k, t in views.items():
            t.copy_(target[k])
    hf.save_pretrained(d / "hf")
    paths["hf folder"] = d / "hf"
    paths["hf file"] = d / "hf" / "model.safetensors"
    return paths


@pytest.fixture(scope="module")
def reference(ckpts):
    sam = load_sam(ckpts["meta.pth"])
    return sam, sam.fingerprint, _ours_outputs(sam)


# ---------------------------------------------------------------------------- 2. strict loading
def _expect_error(source, *needles, **kw):
    with pytest.raises(CheckpointError) as info:
        load_sam(source, **kw)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    return msg


def test_missing_key(meta_sd, tmp_path):
    for key in ("mask_decoder.transformer.layers.1.norm2.bias", "image_encoder.blocks.2.mlp.lin1.bias"):
        sd = {k: v for k, v in meta_sd.items() if k != key}
        torch.save(sd, tmp_path / "m.pth")
        msg = _expect_error(tmp_path / "m.pth", "missing", key)  # named as the file spells it (lin1, not fc1)
        assert "fc1" not in msg


def test_unexpected_key(meta_sd, tmp_path):
    sd = dict(meta_sd, **{"image_encoder.blocks.0.attn.extra_scale": torch.ones(3)})
    torch.save(sd, tmp_path / "u.pth")
    _expect_error(tmp_path / "u.pth", "unexpected", "image_encoder.blocks.0.attn.extra_scale")


def test_wrong_shape(meta_sd, tmp_path):
    key = "image_encoder.blocks.1.mlp.lin2.weight"
    sd = dict(meta_sd, **{key: torch.zeros(96, 383)})
    torch.save(sd, tmp_path / "s.pth")
    _expect_error(tmp_path / "s.pth", key, "(96, 383)", "(96, 384)")
    sd = dict(meta_sd, **{"mask_decoder.output_upscaling.0.bias": torch.zeros(17)})
    _expect_error(sd, "mask_decoder.output_upscaling.0.bias", "(17,)", "(16,)")


def test_hf_checkpoint_errors_name_hf_keys(tmp_path):
    from safetensors.torch import load_file

    model = _hf_sam(seed=2)
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    gone = "mask_decoder.upscale_conv1.bias"
    save_file({k: v for k, v in sd.items() if k != gone}, str(tmp_path / "model.safetensors"))
    _expect_error(tmp_path, "missing", gone)
    save_file(dict(sd, **{"mask_decoder.extra.weight": torch.ones(2)}), str(tmp_path / "model.safetensors"))
    _expect_error(tmp_path, "unexpected", "mask_decoder.extra.weight")
    save_file(
        dict(sd, **{"vision_encoder.neck.conv2.weight": torch.zeros(64, 64, 1, 1)}),
        str(tmp_path / "model.safetensors"),
    )
    _expect_error(tmp_path, "vision_encoder.neck.conv2.weight", "(64, 64, 1, 1)", "(64, 64, 3, 3)")


@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_files(ckpts, tmp_path, fraction):
    for name, needle in (
        ("meta.pth", "not a readable PyTorch checkpoint"),
        ("meta.safetensors", "not a readable .safetensors"),
    ):
        data = ckpts[name].read_bytes()
        cut = tmp_path / ckpts[name].name
        cut.write_bytes(data[: int(len(data) * fraction)])
        _expect_error(cut, str(cut), needle)


def test_files_that_are_not_checkpoints(tmp_path):
    noise = os.urandom(4096)
    for name in ("noise.pth", "noise.bin", "noise.safetensors", "noise", "notes.txt"):
        p = tmp_path / name
        if name == "notes.txt":
            p.write_text("these are not the weights you are looking for\n" * 20)
        else:
            p.write_bytes(noise)
        msg = _expect_error(p, str(p))
        assert "not a" in msg and "weights_only=False" not in msg, msg
    (tmp_path / "empty.pth").write_bytes(b"")
    _expect_error(tmp_path / "empty.pth", "empty file")


def _spring(flag):
    Path(flag).touch()


class _Trap:
    """Unpickling this would call `_spring` (run code): it must never happen."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (_spring, (self.flag,))


def test_pickle_with_objects_is_refused_unread(meta_sd, tmp_path):
    flag = tmp_path / "code_ran"
    cases = {
        "object.pth": lambda p: torch.save({"model": meta_sd, "hook": _Trap(flag)}, p),
        "object_as_weight.pth": lambda p: torch.save(dict(meta_sd, **{"image_encoder.pos_embed": _Trap(flag)}), p),
        "plain.pkl": lambda p: p.write_bytes(pickle.dumps({"w": _Trap(flag)}, protocol=2)),
    }
    for name, write in cases.items():
        p = tmp_path / name
        write(p)
        msg = _expect_error(p, str(p))
        assert not flag.exists(), f"{name}: unpickling ran code"
        assert "weights_only=False" not in msg
        if name.endswith(".pth"):  # names what was refused
            assert "non-tensor object" in msg and "_spring" in msg, msg
    # a pickle of plain Python values (no tensors at all) is refused as holding no state dict
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta_only.pth")
    _expect_error(tmp_path / "meta_only.pth", "no state dict of tensors")


def test_unrelated_state_dicts(tmp_path):
    import timm

    for name, model in (("vit.pth", timm.create_model("vit_tiny_patch16_224", pretrained=False)),
                        ("linear.pth", torch.nn.Linear(3, 4))):
        torch.save(model.state_dict(), tmp_path / name)
        _expect_error(tmp_path / name, "not a SAM checkpoint")
    _expect_error(torch.nn.Linear(3, 4).state_dict(), "not a SAM checkpoint")


def test_nonexistent_paths(tmp_path):
    _expect_error(tmp_path / "nope.pth", "no such file", "nope.pth")
    _expect_error(str(tmp_path / "no_dir" / "sam.safetensors"), "no such file")
    (tmp_path / "empty_dir").mkdir()
    _expect_error(tmp_path / "empty_dir", "model.safetensors")


def test_wrong_arch_named(ckpts):
    _expect_error(ckpts["meta.pth"], "tiny", "vit_b", arch="vit_b")
    assert load_sam(ckpts["meta.pth"], arch="tiny").arch == "tiny"


# ---------------------------------------------------------------------------- 3. format detection
FORMATS = {"meta.pth": "meta", "meta.safetensors": "meta", "nested.pth": "meta", "ours.pth": "samadapt",
           "ours.safetensors": "samadapt", "hf folder": "hf", "hf file": "hf"}


@pytest.mark.parametrize("name", list(FORMATS))
def test_formats_load_identically(ckpts, reference, name):
    if name not in ckpts:
        pytest.skip("transformers not installed")
    ref_sam, ref_fp, ref_out = reference
    sam = load_sam(ckpts[name])
    assert sam.arch == "tiny" and sam.image_size == 256 and sam.source_format == FORMATS[name]
    assert sam.fingerprint == ref_fp
    out = _ours_outputs(sam)
    for k, v in ref_out.items():
        if isinstance(v, tuple):
            assert torch.equal(out[k][0], v[0]) and torch.equal(out[k][1], v[1]), k
        else:
            assert torch.equal(out[k], v), k


def test_state_dict_sources(meta_sd, reference):
    _, ref_fp, _ = reference
    assert load_sam(meta_sd).fingerprint == ref_fp
    assert load_sam({"state_dict": meta_sd}).fingerprint == ref_fp
    assert load_sam({"model": meta_to_samadapt(meta_sd)}).fingerprint == ref_fp


def test_fp16_file_loads_into_fp32_core(meta_sd, tmp_path):
    save_file({k: v.half() for k, v in meta_sd.items()}, str(tmp_path / "half.safetensors"))
    sam = load_sam(tmp_path / "half.safetensors")
    assert sam.dtype == torch.float32
    rounded = load_sam({k: v.half().float() for k, v in meta_sd.items()})
    assert sam.fingerprint == rounded.fingerprint


# ---------------------------------------------------------------------------- 4. fingerprint
def test_fingerprint_pth_equals_safetensors(ckpts):
    assert load_sam(ckpts["meta.pth"]).fingerprint == load_sam(ckpts["meta.safetensors"]).fingerprint
    fp = load_sam(ckpts["meta.pth"]).fingerprint
    assert len(fp) == 32 and int(fp, 16) >= 0


@torch.no_grad()
def test_fingerprint_sees_any_single_change(ckpts):
    sam = load_sam(ckpts["meta.pth"])
    base = sam.fingerprint
    core = sam.core_state_dict()
    picks = [
        ("image_encoder.pos_embed", 0),
        ("image_encoder.blocks.3.attn.qkv.weight", -1),
        ("image_encoder.blocks.1.attn.rel_pos_w", 7),
        ("image_encoder.neck.1.weight", 5),
        ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", 3),  # a buffer, not a parameter
        ("prompt_encoder.not_a_point_embed.weight", 0),
        ("mask_decoder.iou_prediction_head.layers.2.bias", -1),
    ]
    seen = {base}
    for key, idx in picks:
        flat = core[key].view(-1)
        old = flat[idx].clone()
        flat[idx] = torch.nextafter(old, torch.tensor(math.inf))  # the next float32 up
        assert flat[idx] != old
        fp = sam.fingerprint
        assert fp not in seen, key
        seen.add(fp)
        flat[idx] = old
        assert sam.fingerprint == base, key


def test_fingerprint_and_dtype():
    """What casting does: fp16/bf16 tensors are hashed as their fp32 values, other dtypes as they are.
    So a round trip through fp16 changes the fingerprint only if it changed a value, and float64
    (another dtype, another byte string) always changes it."""
    sam = build_sam("tiny")
    fp = sam.fingerprint
    sam.half().float()  # random fp32 weights are not all fp16-representable: values change
    rounded = sam.fingerprint
    assert rounded != fp
    sam.half()
    assert sam.fingerprint == rounded  # the same values, held in fp16
    sam.float()
    assert sam.fingerprint == rounded  # fp16 -> fp32 is exact: no change
    sam.to(torch.float64)
    assert sam.fingerprint != rounded  # same values, but the dtype is part of the hash
    sam.float()
    assert sam.fingerprint == rounded


def test_fingerprint_timing_vit_b(capsys):
    sam = build_sam("vit_b")
    n = sum(t.numel() for t in sam.core_state_dict().values())
    t0 = time.perf_counter()
    fp = sam.fingerprint
    dt = time.perf_counter() - t0
    _print(capsys, f"vit_b fingerprint: {n / 1e6:.1f}M values in {dt:.2f} s ({torch.get_num_threads()} threads)")
    assert sam.fingerprint == fp


@pytest.mark.slow
def test_fingerprint_timing_vit_h(capsys):
    t0 = time.perf_counter()
    sam = build_sam("vit_h")
    built = time.perf_counter() - t0
    n = sum(t.numel() for t in sam.core_state_dict().values())
    t0 = time.perf_counter()
    fp = sam.fingerprint
    dt = time.perf_counter() - t0
    _print(capsys, f"vit_h: built in {built:.1f} s; fingerprint of {n / 1e6:.0f}M values "
                   f"({n * 4 / 2**30:.2f} GiB) in {dt:.2f} s ({torch.get_num_threads()} threads)")
    assert len(fp) == 32 and sam.fingerprint == fp


# ---------------------------------------------------------------------------- 5. image-size resizing
def _global_and_windowed(sam):
    g = [sam.image_encoder.blocks[i].attn for i in TINY.global_attn_indexes]
    w = [sam.image_encoder.blocks[i].attn for i in range(TINY.depth) if i not in TINY.global_attn_indexes]
    return g, w


def test_load_at_smaller_image_size(ckpts, meta_sd, tmp_path):
    sam = load_sam(ckpts["meta.pth"], image_size=128)
    assert sam.image_size == 128 and sam.embedding_size == (8, 8)
    assert tuple(sam.image_encoder.pos_embed.shape) == (1, 8, 8, 96)
    glob, win = _global_and_windowed(sam)
    for a in glob:
        assert a.rel_pos_h.shape == a.rel_pos_w.shape == (15, 32)
    for i, a in zip([i for i in range(TINY.depth) if i not in TINY.global_attn_indexes], win):
        assert torch.equal(a.rel_pos_h, meta_sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"])  # untouched
    # the tables are the resampled originals
    pos = resample_abs_pos_embed_nhwc(meta_sd["image_encoder.pos_embed"], [8, 8])
    assert torch.allclose(sam.image_encoder.pos_embed, pos)
    rp = meta_sd["image_encoder.blocks.3.attn.rel_pos_h"]
    assert torch.allclose(
        sam.image_encoder.blocks[3].attn.rel_pos_h, F.interpolate(rp.T[None], size=15, mode="linear")[0].T
    )

    x = _image(128, 100)
    with torch.no_grad():
        emb = sam.encode_image(sam.preprocess(x))
        assert emb.shape == (1, 64, 8, 8)
        low, iou = sam.decode(emb, torch.tensor([[[60.0, 40.0]]]), torch.tensor([[1]]), None, None, True)
        low_b, _ = sam.decode(emb, None, None, torch.tensor([[10.0, 10.0, 90.0, 100.0]]), None, False)
    assert low.shape == (1, 3, 32, 32) and low_b.shape == (1, 1, 32, 32)
    assert torch.isfinite(low).all() and torch.isfinite(iou).all() and torch.isfinite(low_b).all()
    assert low.std() > 0

    # at 128 px the grid (8) equals the window (8): windowed and global tables have the same
    # length, yet the saved model reloads (at 128, and back at 256) with the right blocks resized
    torch.save(sam.state_dict(), tmp_path / "tiny128.pth")
    again = load_sam(tmp_path / "tiny128.pth")
    assert again.arch == "tiny" and again.image_size == 128 and again.fingerprint == sam.fingerprint
    up = load_sam(tmp_path / "tiny128.pth", image_size=256)
    glob, win = _global_and_windowed(up)
    assert all(a.rel_pos_h.shape == (31, 32) for a in glob) and all(a.rel_pos_h.shape == (15, 32) for a in win)
    assert torch.equal(win[0].rel_pos_h, _global_and_windowed(sam)[1][0].rel_pos_h)


def test_build_at_512():
    sam = build_sam("vit_b", image_size=512)
    assert sam.image_size == 512 and sam.embedding_size == (32, 32)
    assert tuple(sam.image_encoder.pos_embed.shape) == (1, 32, 32, 768)
    for i in ARCHS["vit_b"].global_attn_indexes:
        assert sam.image_encoder.blocks[i].attn.rel_pos_h.shape == (63, 64)
    assert sam.image_encoder.blocks[0].attn.rel_pos_h.shape == (27, 64)


@pytest.mark.slow
def test_vit_b_checkpoint_1024_to_512(tmp_path):
    ref = build_meta_sam("vit_b")
    torch.save(ref.state_dict(), tmp_path / "sam_vit_b.pth")
    del ref
    sam = load_sam(tmp_path / "sam_vit_b.pth", arch="vit_b", image_size=512)
    assert sam.image_size == 512 and tuple(sam.image_encoder.pos_embed.shape) == (1, 32, 32, 768)
    for i in range(12):
        want = 63 if i in ARCHS["vit_b"].global_attn_indexes else 27
        assert sam.image_encoder.blocks[i].attn.rel_pos_h.shape == (want, 64)
    with torch.no_grad():
        emb = sam.encode_image(sam.preprocess(_image(512, 400)))
        low, iou = sam.decode(emb, torch.tensor([[[200.0, 150.0]]]), torch.tensor([[1]]), None, None, True)
    assert emb.shape == (1, 256, 32, 32) and low.shape == (1, 3, 128, 128)
    assert torch.isfinite(low).all() and torch.isfinite(iou).all()
