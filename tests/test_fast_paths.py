"""The fast paths of sam_core.fast compute the same functions as the plain ones.

* factorised rel-pos attention == timm's SAM attention (fp32 vs an fp64 run of timm's own path,
  bf16, gradients, windowed / global / non-square / interpolated tables, batch > 1, peft LoRA);
* postprocess_masks_fast == Sam.postprocess_masks (up- and down-scaling);
* fast_decode == Sam.decode (points, boxes, mask prompts, batches, the per-image cache).
No timing here: see benchmarks/.
"""
import copy
import types
from dataclasses import replace

import pytest
import torch
from timm.models.vision_transformer_sam import Attention as TimmAttention

from samadapt.sam_core import ARCHS, Sam, build_sam
from samadapt.sam_core.fast import (
    DecoderImageCache,
    FastSamAttention,
    cache_dense_pe,
    composed_postprocess_matrices,
    enable_fast_attention,
    fast_attention_enabled,
    fast_decode,
    interp_matrix,
    postprocess_masks_fast,
    prepare_image_embedding,
)

FP32_ATOL = 1e-5  # fast fp32 vs timm's path run in fp64
GRAD_ATOL = 1e-4  # fast vs plain gradients, fp32
BF16_RTOL = 2e-2  # ||fast_bf16 - ref_fp64|| / ||ref_fp64||


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # small ops on a shared 2-core box: one thread is faster and steadier; restored afterwards
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _attention(dim=96, heads=3, input_size=(8, 8), seed=0):
    torch.manual_seed(seed)
    attn = TimmAttention(dim, num_heads=heads, use_rel_pos=True, input_size=input_size)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "rel_pos" in name else 0.1))
    return attn.eval()


def _fast_copy(module, **kw):
    fast = copy.deepcopy(module)
    assert enable_fast_attention(fast, **kw) >= 1
    return fast


def _plain_fp64(module, x):
    ref = copy.deepcopy(module).double()
    enable_fast_attention(ref, enabled=False)
    with torch.no_grad():
        return ref(x.double())


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tiny_encoder_sam(image_size=160, seed=0):
    torch.manual_seed(seed)
    sam = build_sam("tiny", image_size=image_size)
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    return sam


# ----------------------------------------------------------------------------- attention
# (grid h, w; table made for; label): windowed square, global non-square, a table of another
# size (timm interpolates it), a 1 x n strip
GRIDS = [
    ((8, 8), (8, 8), "window"),
    ((6, 10), (6, 10), "global non-square"),
    ((6, 10), (7, 7), "interpolated table"),
    ((1, 5), (1, 5), "strip"),
]


@pytest.mark.parametrize("hw,table,label", GRIDS, ids=[g[2] for g in GRIDS])
@pytest.mark.parametrize("pad_v", [None, False, True])
def test_attention_fp32_matches_fp64_reference(hw, table, label, pad_v):
    attn = _attention(input_size=table)
    fast = _fast_copy(attn, pad_v=pad_v)
    x = torch.randn(3, *hw, 96)  # batch > 1
    ref = _plain_fp64(attn, x)
    with torch.no_grad():
        out = fast(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (out.double() - ref).abs().max().item() <= FP32_ATOL


@pytest.mark.parametrize("hw,table", [((8, 8), (8, 8)), ((6, 10), (6, 10))])
def test_attention_bf16(hw, table):
    attn = _attention(input_size=table, seed=1)
    x = torch.randn(2, *hw, 96)
    ref = _plain_fp64(attn, x)
    fast = _fast_copy(attn).to(torch.bfloat16)
    plain = copy.deepcopy(attn).to(torch.bfloat16)
    with torch.no_grad():
        out = fast(x.to(torch.bfloat16))
        out_plain = plain(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16  # computed in the input's dtype
    err, err_plain = _rel_err(out, ref), _rel_err(out_plain, ref)
    assert err <= BF16_RTOL, (err, err_plain)
    assert err <= 2 * err_plain + 1e-3, (err, err_plain)  # no worse than timm's own bf16 path


def test_attention_builds_no_n_by_n_tensor_in_bf16(monkeypatch):
    """The fast path never asks SDPA for a mask and never promotes to fp32."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.dim(), q.dtype, kw.get("attn_mask"), a))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    fast = _fast_copy(_attention(input_size=(6, 10))).to(torch.bfloat16)
    with torch.no_grad():
        fast(torch.randn(2, 6, 10, 96, dtype=torch.bfloat16))
    assert seen and all(d == 4 and dt == torch.bfloat16 and m is None and not a for d, dt, m, a in seen)


@pytest.mark.parametrize("hw,table", [((8, 8), (8, 8)), ((6, 10), (6, 10)), ((6, 10), (7, 7))])
def test_attention_gradients(hw, table):
    attn = _attention(input_size=table, seed=2)
    fast = _fast_copy(attn)
    x = torch.randn(2, *hw, 96)
    w = torch.randn(2, *hw, 96)
    grads = []
    for m in (attn, fast):
        xi = x.clone().requires_grad_(True)
        (m(xi) * w).sum().backward()
        grads.append((xi.grad, m.qkv.weight.grad, m.rel_pos_h.grad, m.rel_pos_w.grad, m.proj.weight.grad))
    for g_plain, g_fast in zip(*grads):
        assert (g_plain - g_fast).abs().max().item() <= GRAD_ATOL


def test_encoder_windowed_global_padded_batch():
    """A whole tiny encoder at 160 px: a 10 x 10 grid, 8 x 8 windows padded to 16 x 16, global blocks."""
    sam = _tiny_encoder_sam(160)
    enc = sam.image_encoder
    assert enc.blocks[0].window_size == 8 and enc.blocks[1].window_size == 0
    x = torch.randn(2, 3, 160, 160)
    ref = copy.deepcopy(enc).double()
    with torch.no_grad():
        r = ref.forward_features(x.double())
    fast = copy.deepcopy(enc)
    assert enable_fast_attention(fast) == 4 and fast_attention_enabled(fast)
    with torch.no_grad():
        out = fast.forward_features(x)
    assert (out.double() - r).abs().max().item() <= FP32_ATOL


def test_encoder_gradients_and_names():
    sam = _tiny_encoder_sam(160, seed=3)
    keys = list(sam.state_dict())
    fp = sam.fingerprint
    plain, fast = sam.image_encoder, copy.deepcopy(sam.image_encoder)
    enable_fast_attention(fast)
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in plain.named_modules()]
    x = torch.randn(2, 3, 160, 160)
    g = []
    for enc in (plain, fast):
        xi = x.clone().requires_grad_(True)
        enc.forward_features(xi).square().mean().backward()
        g.append((xi.grad, enc.blocks[1].attn.qkv.weight.grad, enc.blocks[0].attn.qkv.weight.grad))
    for a, b in zip(*g):
        assert (a - b).abs().max().item() <= GRAD_ATOL
    # on a Sam: the core's names and fingerprint are unchanged, and it switches back
    assert enable_fast_attention(sam) == 4
    assert list(sam.state_dict()) == keys and sam.fingerprint == fp
    assert all(type(m) is FastSamAttention for m in sam.image_encoder.modules() if isinstance(m, TimmAttention))
    assert enable_fast_attention(sam, enabled=False) == 4
    assert not any(type(m) is FastSamAttention for m in sam.modules())


@pytest.mark.parametrize("order", ["lora_then_fast", "fast_then_lora"])
def test_peft_lora_on_qkv(order):
    peft = pytest.importorskip("peft")
    from peft import LoraConfig, inject_adapter_in_model

    sam = _tiny_encoder_sam(160, seed=4)

    def with_lora(enc):
        torch.manual_seed(5)  # the same lora_A init for both
        enc = inject_adapter_in_model(LoraConfig(r=4, target_modules=["qkv"]), enc)
        with torch.no_grad():
            for name, p in enc.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # B starts at zero: make the adapter matter
        return enc

    plain = with_lora(copy.deepcopy(sam.image_encoder))
    if order == "lora_then_fast":
        fast = copy.deepcopy(plain)
        enable_fast_attention(fast)
    else:
        fast = copy.deepcopy(sam.image_encoder)
        enable_fast_attention(fast)
        fast = with_lora(fast)
    assert isinstance(fast.blocks[0].attn.qkv, peft.tuners.lora.LoraLayer)
    assert type(fast.blocks[0].attn) is FastSamAttention
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 160, 160)
    outs, grads = [], []
    for enc in (plain, fast):
        out = enc.forward_features(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in enc.named_parameters() if "lora_" in n})
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(plain.blocks)
    for n in grads[0]:
        assert grads[1][n] is not None and (grads[0][n] - grads[1][n]).abs().max().item() <= GRAD_ATOL
    assert not any(p.grad is not None for n, p in fast.named_parameters() if "lora_" not in n)


# ----------------------------------------------------------------------------- routes per block
def test_kernel_per_block_switch_back_and_bad_names():
    """kernel / window_kernel reach the right blocks (off CUDA the Triton route falls back to SDPA:
    the plain function still); switching back drops the route, names and state unchanged; route
    names that are not routes (the removed "flex" among them) are refused."""
    sam = _tiny_encoder_sam(160, seed=8)
    enc = sam.image_encoder
    windowed = [blk.window_size > 0 for blk in enc.blocks]
    mixed = copy.deepcopy(enc)
    assert enable_fast_attention(mixed, kernel="triton", window_kernel="sdpa") == 4
    assert [b.attn._fast_kernel for b in mixed.blocks] == ["sdpa" if w else "triton" for w in windowed]
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        r = copy.deepcopy(enc).double().forward_features(x.double())
        assert (mixed.forward_features(x).double() - r).abs().max().item() <= FP32_ATOL
    assert enable_fast_attention(mixed, enabled=False) == 4
    assert "_fast_kernel" not in vars(mixed.blocks[0].attn) and list(mixed.state_dict()) == list(enc.state_dict())
    for bad in (dict(kernel="flash"), dict(window_kernel="xformers"), dict(kernel="flex"), dict(window_kernel="flex")):
        with pytest.raises(ValueError, match="is not a fast attention route"):
            enable_fast_attention(copy.deepcopy(enc), **bad)


def test_cached_index_tensors_made_under_inference_mode_serve_autograd_later():
    """The rel-pos index and key-code caches are filled outside inference mode, so an encoder
    first run under torch.inference_mode (a predictor) can train afterwards in the same process."""
    from samadapt.sam_core.fast import attention as fa

    fa._REL_INDEX_CACHE.clear()
    fa._KEY_CODE_CACHE.clear()
    attn = _attention(input_size=(5, 7), seed=9)
    fast = _fast_copy(attn)
    x = torch.randn(2, 5, 7, 96)
    with torch.inference_mode():
        fast(x)
    assert fa._REL_INDEX_CACHE and fa._KEY_CODE_CACHE
    assert not any(t.is_inference() for t in list(fa._REL_INDEX_CACHE.values()) + list(fa._KEY_CODE_CACHE.values()))
    xi = x.clone().requires_grad_(True)
    fast(xi).square().mean().backward()
    assert fast.rel_pos_h.grad is not None and xi.grad is not None


# ----------------------------------------------------------------------------- postprocess
def _reference_postprocess(masks, image_size, input_size, original_size):
    return Sam.postprocess_masks(types.SimpleNamespace(image_size=image_size), masks, input_size, original_size)


def _logits(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(shape, generator=g), 9, 1, 4)
    return 20 * smooth + 0.5 * torch.randn(shape, generator=g)


POST_CASES = [
    (1024, (768, 1024), (768, 1024)),    # the usual 4:3 photo at its own size
    (1024, (768, 1024), (1536, 2048)),   # upscaling
    (1024, (1024, 683), (300, 200)),     # downscaling, portrait
    (1024, (683, 1024), (1000, 1499)),   # odd sizes
    (256, (192, 256), (300, 400)),       # a smaller encoder input
    (256, (256, 256), (64, 64)),         # strong downscaling
]


@pytest.mark.parametrize("image_size,input_size,original_size", POST_CASES)
def test_postprocess_fast_equals_sam(image_size, input_size, original_size):
    low = _logits((2, 3, image_size // 4, image_size // 4), seed=image_size + original_size[0])
    ref = _reference_postprocess(low, image_size, input_size, original_size)
    out = postprocess_masks_fast(low, image_size, input_size, original_size)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out - ref).abs().max().item() <= 1e-4
    assert ((out > 0) == (ref > 0)).float().mean().item() >= 0.9999


def test_postprocess_matrices_and_dtypes():
    # the 1-D maps are PyTorch's exactly (weights and source-index rule)
    for n_in, n_out in [(256, 1024), (683, 200), (1024, 4000), (7, 3)]:
        basis = torch.eye(n_in).reshape(n_in, 1, n_in, 1)
        a = torch.nn.functional.interpolate(basis, (n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].t()
        assert torch.equal(a.double(), interp_matrix(n_in, n_out))
    a_h, a_w = composed_postprocess_matrices((64, 64), 256, (192, 256), (300, 400), index_dtype=torch.float64)
    assert a_h.shape == (300, 64) and a_w.shape == (400, 64)
    low = _logits((1, 1, 64, 64), seed=9)
    ref = _reference_postprocess(low.double(), 256, (192, 256), (300, 400))
    assert (postprocess_masks_fast(low.double(), 256, (192, 256), (300, 400)) - ref).abs().max() <= 1e-10
    assert (a_h @ low[0, 0].double() @ a_w.t() - ref[0, 0]).abs().max() <= 1e-10
    out16 = postprocess_masks_fast(low.bfloat16(), 256, (192, 256), (300, 400))
    assert out16.dtype == torch.bfloat16 and out16.shape == (1, 1, 300, 400)
    with pytest.raises(ValueError):
        postprocess_masks_fast(low, 256, (300, 256), (300, 400))  # input larger than the encoder input


# ----------------------------------------------------------------------------- decoder
def _decoder_sam(vit_b_decoder: bool, seed=0):
    """A Sam whose prompt encoder and decoder have random weights (LayerNorms too)."""
    spec = ARCHS["tiny"]
    if vit_b_decoder:  # vit_b's decoder and 64 x 64 grid; a one-block encoder (never run)
        spec = replace(spec, prompt_embed_dim=256, decoder_mlp_dim=2048, decoder_heads=8,
                       iou_head_hidden_dim=256, image_size=1024, depth=1, global_attn_indexes=(0,))
    sam = build_sam("tiny", spec=spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(sam.prompt_encoder.named_parameters()) + list(sam.mask_decoder.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "output_upscaling.1" in name:
                p.copy_((1.0 + 0.3 * noise) if name.endswith("weight") else 0.3 * noise)
            else:
                p.add_(0.05 * noise)
    return sam.eval()


def _prompts(size, b=1):
    g = torch.Generator().manual_seed(size)
    pts = torch.rand(b, 2, 2, generator=g) * size
    return {
        "point": dict(point_coords=pts[:, :1], point_labels=torch.ones(b, 1, dtype=torch.int)),
        "points": dict(point_coords=pts, point_labels=torch.tensor([[1, 0]] * b, dtype=torch.int)),
        "box": dict(boxes=torch.tensor([[0.1, 0.2, 0.6, 0.9]] * b) * size),
        "box+point": dict(boxes=torch.tensor([[0.1, 0.2, 0.6, 0.9]] * b) * size,
                          point_coords=pts[:, :1], point_labels=torch.ones(b, 1, dtype=torch.int)),
    }


def _close(a, b, atol=1e-4):
    return all((x - y).abs().max().item() <= atol for x, y in zip(a, b))


@pytest.mark.parametrize("vit_b_decoder", [False, True], ids=["tiny", "vit_b-decoder"])
def test_fast_decode_equals_decode(vit_b_decoder):
    sam = _decoder_sam(vit_b_decoder)
    c, (h, w) = sam.prompt_encoder.embed_dim, sam.embedding_size
    emb = torch.randn(1, c, h, w)
    size = sam.image_size
    cases = [(b, name, mm) for b in (1, 3) for name in _prompts(size) for mm in (False, True)]
    if vit_b_decoder:  # the full-size decoder: a few cases (the tiny one runs them all)
        cases = [(1, "point", False), (1, "point", True), (3, "box+point", True), (1, "points", True)]
    with torch.no_grad():
        for b, name, mm in cases:
            kw = _prompts(size, b)[name]
            ref = sam.decode(emb, multimask_output=mm, **kw)
            out = fast_decode(sam, emb, multimask_output=mm, **kw)
            assert out[0].shape == ref[0].shape and _close(out, ref), (name, b, mm)
        # a mask prompt (the previous low-res logits) and one embedding per prompt
        mask_in = torch.randn(2, 1, 4 * h, 4 * w)
        kw = dict(_prompts(size, 2)["point"], mask_inputs=mask_in)
        assert _close(fast_decode(sam, emb, **kw), sam.decode(emb, **kw))
        embs = torch.randn(2, c, h, w)
        kw = _prompts(size, 2)["points"]
        assert _close(
            fast_decode(sam, embs, multimask_output=True, **kw), sam.decode(embs, multimask_output=True, **kw)
        )
        # no prompt at all
        assert _close(fast_decode(sam, emb), sam.decode(emb))


def test_fast_decode_cache_and_helpers():
    sam = _decoder_sam(True, seed=1)
    emb = torch.randn(1, 256, 64, 64)
    kw = _prompts(1024)["point"]
    with torch.no_grad():
        ref = sam.decode(emb, multimask_output=True, **kw)
        fast_sam = copy.deepcopy(sam)
        pe = cache_dense_pe(fast_sam)
        assert pe.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(pe, sam.prompt_encoder.get_dense_pe())
        assert fast_sam.prompt_encoder.get_dense_pe() is pe  # served from the cache
        cache = DecoderImageCache()
        emb_cl = prepare_image_embedding(emb)
        for _ in range(2):  # fill, then reuse
            assert _close(fast_decode(fast_sam, emb_cl, multimask_output=True, cache=cache, **kw), ref)
        # the cache follows an in-place change of the embedding ...
        emb_cl.mul_(0.5)
        assert _close(fast_decode(fast_sam, emb_cl, multimask_output=True, cache=cache, **kw),
                      sam.decode(emb * 0.5, multimask_output=True, **kw))
        # ... and of a weight it read
        fast_sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(1.5)
        sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(1.5)
        assert _close(fast_decode(fast_sam, emb_cl, multimask_output=True, cache=cache, **kw),
                      sam.decode(emb * 0.5, multimask_output=True, **kw))
        # a mask prompt bypasses the cache
        mask_in = torch.randn(1, 1, 256, 256)
        assert _close(fast_decode(fast_sam, emb_cl, cache=cache, mask_inputs=mask_in, **kw),
                      sam.decode(emb * 0.5, mask_inputs=mask_in, **kw))
    with torch.inference_mode():  # inference tensors carry no version counter: the content probe
        e = prepare_image_embedding(torch.randn(1, 256, 64, 64))
        cache = DecoderImageCache()
        fast_decode(fast_sam, e, cache=cache, **kw)
        e.add_(1.0)
        assert _close(fast_decode(fast_sam, e, cache=cache, **kw), sam.decode(e.clone(), **kw))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fast_decode_with_lora_wrapped_decoder(use_dora):
    """peft LoRA on the decoder's projections: the fast path forms W + B A s for the layers whose
    weights it reads (plain LoRA); DoRA takes the module path. Same function either way."""
    from peft import LoraConfig, inject_adapter_in_model

    import samadapt.adapters  # noqa: F401  (registers peft's LoRA view with the fast decoder)
    from samadapt.sam_core.fast import fast_decoder_applies

    sam = _decoder_sam(False, seed=2)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                       use_dora=use_dora), sam.mask_decoder)
    assert fast_decoder_applies(sam) is (not use_dora)
    with torch.no_grad():
        for name, p in sam.mask_decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        emb = torch.randn(1, 64, 16, 16)
        kw = _prompts(256)["points"]
        ref = sam.decode(emb, multimask_output=True, **kw)
        assert _close(fast_decode(sam, emb, multimask_output=True, **kw), ref)
        cache = DecoderImageCache()
        assert _close(fast_decode(sam, emb, multimask_output=True, cache=cache, **kw), ref)
        # a training step writes the LoRA tensors in place: the per-image cache must see it
        for name, p in sam.mask_decoder.named_parameters():
            if "lora_" in name:
                p.add_(0.05)
        ref2 = sam.decode(emb, multimask_output=True, **kw)
        assert not _close(ref2, ref)
        assert _close(fast_decode(sam, emb, multimask_output=True, cache=cache, **kw), ref2)


def test_lora_decoder_without_its_view_takes_the_slow_path():
    """sam_core alone does not know LoRA layers: with peft's view removed, a LoRA-wrapped decoder
    sends `fast_decoder_applies` to False and `fast_decode` runs `Sam.decode` (same outputs as the
    fast path with the view, and as `Sam.decode`); registering the view again restores the fast path."""
    from peft import LoraConfig, inject_adapter_in_model

    from samadapt.adapters.peft_linear_view import lora_linear_view, register
    from samadapt.sam_core.fast import fast_decoder_applies, linear_views, remove_linear_view

    sam = _decoder_sam(False, seed=6)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), sam.mask_decoder)
    emb = torch.randn(1, 64, 16, 16)
    kw = _prompts(256)["points"]
    calls = []
    real_decode = sam.decode
    with torch.no_grad():
        for name, p in sam.mask_decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        register()
        assert fast_decoder_applies(sam)
        with_view = fast_decode(sam, emb, multimask_output=True, cache=DecoderImageCache(), **kw)
        try:
            assert remove_linear_view(lora_linear_view) and lora_linear_view not in linear_views()
            assert not fast_decoder_applies(sam)
            sam.decode = lambda *a, **k: calls.append(1) or real_decode(*a, **k)  # spy: the slow path runs
            without = fast_decode(sam, emb, multimask_output=True, cache=DecoderImageCache(), **kw)
            assert calls == [1]
        finally:
            del sam.decode
            register()
        assert fast_decoder_applies(sam) and linear_views().count(lora_linear_view) == 1
        ref = sam.decode(emb, multimask_output=True, **kw)
    assert _close(without, ref) and _close(with_view, ref) and _close(with_view, without)


def test_register_linear_view_refuses_a_non_callable():
    from samadapt.sam_core.fast import register_linear_view

    with pytest.raises(TypeError, match="must be a callable"):
        register_linear_view("lora")


def test_fresh_decoder_lora_changes_no_bit_on_the_fast_path():
    """A fresh decoder-LoRA adapter (B = 0) gives the core's outputs bit for bit on the fast path
    (its weight is W + 0), so `SamPredictor` keeps the no-op guarantee of a fresh adapter."""
    from samadapt import adapters

    sam = _decoder_sam(False, seed=4)
    emb = torch.randn(1, 64, 16, 16)
    kw = _prompts(256)["points"]
    with torch.no_grad():
        before = fast_decode(sam, emb, multimask_output=True, **kw)
        adapters.attach(sam, [], name="d", decoder="lora")
        after = fast_decode(sam, emb, multimask_output=True, **kw)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


PREDICTOR_PROMPTS = [
    dict(point_coords=[[100.0, 70.0]], point_labels=[1], multimask_output=True),
    dict(point_coords=[[100.0, 70.0], [20.0, 130.0]], point_labels=[1, 0], multimask_output=False),
    dict(box=[50.0, 30.0, 160.0, 110.0], multimask_output=False),
    dict(point_coords=[[100.0, 70.0]], point_labels=[1], box=[50.0, 30.0, 160.0, 110.0], multimask_output=True),
]


@pytest.mark.parametrize("decoder", ["core", "full", "lora"])
def test_predictor_fast_equals_plain(decoder):
    """`SamPredictor` (fast by default) against `SamPredictor(fast=False)` (`Sam.decode` +
    `Sam.postprocess_masks`): same masks, logits and scores within fp32 rounding, for point, box,
    mask prompts, batched prompts, under the core and under adapters with their own decoder."""
    import numpy as np

    from samadapt import adapters
    from samadapt.sam_core import SamPredictor

    sam = _decoder_sam(False, seed=5)
    if decoder != "core":
        adapters.attach(sam, [], name="d", decoder=decoder)
        with torch.no_grad():
            for p in adapters.adapter_parameters(sam, "d"):
                p.add_(0.05 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    fast, plain = SamPredictor(sam), SamPredictor(sam, fast=False)
    fast.set_image(image)
    plain.set_image(image)
    for kw in PREDICTOR_PROMPTS:
        kw = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in kw.items()}
        (m1, s1, l1), (m2, s2, l2) = fast.predict(**kw), plain.predict(**kw)
        assert m1.shape == m2.shape == (3 if kw["multimask_output"] else 1, 150, 200)
        assert (m1 == m2).mean() >= 0.9999 and np.abs(l1 - l2).max() <= 1e-4 and np.abs(s1 - s2).max() <= 1e-4
        # the previous logits as a mask prompt
        (m1, _, l1), (m2, _, l2) = fast.predict(mask_input=l1[:1], **kw), plain.predict(mask_input=l2[:1], **kw)
        assert (m1 == m2).mean() >= 0.9999 and np.abs(l1 - l2).max() <= 1e-4
        lg1 = fast.predict(return_logits=True, **kw)[0]
        lg2 = plain.predict(return_logits=True, **kw)[0]
        assert np.abs(lg1 - lg2).max() <= 1e-4
    # batched prompts through predict_torch
    pts = torch.tensor([[[40.0, 60.0]], [[150.0, 100.0]], [[90.0, 20.0]]])
    lbl = torch.ones(3, 1, dtype=torch.int)
    coords = torch.as_tensor(fast.transform.apply_coords(pts.numpy(), fast.original_size), dtype=torch.float)
    a = fast.predict_torch(coords, lbl, multimask_output=True, return_logits=True)
    b = plain.predict_torch(coords, lbl, multimask_output=True, return_logits=True)
    assert all((x - y).abs().max().item() <= 1e-4 for x, y in zip(a, b))


def test_fast_decode_runs_the_decoder_in_use():
    """An adapter with its own decoder copy (decoder="full") puts that copy in use: the fast path
    must read it, not the core's decoder, and its per-image cache must follow the switch."""
    from samadapt import adapters

    sam = _decoder_sam(False, seed=3)
    adapters.attach(sam, [], name="dec", decoder="full")
    with torch.no_grad():
        for p in adapters.adapter_parameters(sam, "dec"):
            p.add_(0.05 * torch.randn_like(p))
        emb = torch.randn(1, 64, 16, 16)
        kw = _prompts(256)["points"]
        cache = DecoderImageCache()
        for name in ("dec", None, "dec"):
            adapters.activate(sam, name)
            ref = sam.decode(emb, multimask_output=True, **kw)
            assert _close(fast_decode(sam, emb, multimask_output=True, cache=cache, **kw), ref), name
        adapters.activate(sam, None)
        plain = sam.decode(emb, multimask_output=True, **kw)
        adapters.activate(sam, "dec")
        assert not _close(sam.decode(emb, multimask_output=True, **kw), plain)  # the copy does differ


def test_fast_decode_respects_hooks():
    """A forward hook on a module whose forward the fast path bypasses: the module path runs."""
    sam = _decoder_sam(False, seed=4)
    emb = torch.randn(1, 64, 16, 16)
    kw = _prompts(256)["point"]
    calls = []
    handle = sam.mask_decoder.output_upscaling.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = fast_decode(sam, emb, multimask_output=True, **kw)
    handle.remove()
    assert calls == [1]
    with torch.no_grad():
        assert _close(out, fast_decode(sam, emb, multimask_output=True, **kw))


def test_fast_decode_gradients():
    sam = _decoder_sam(False, seed=3)
    emb = torch.randn(1, 64, 16, 16)
    kw = _prompts(256)["point"]
    grads = []
    for fn in (sam.decode, lambda *a, **k: fast_decode(sam, *a, **k)):
        sam.zero_grad()
        e = emb.clone().requires_grad_(True)
        masks, iou = fn(e, multimask_output=True, **kw)
        (masks.square().mean() + iou.sum()).backward()
        # None: a parameter the path does not use (the key bias cancels in the softmax; the
        # single-mask head is unused with multimask output) - its gradient is zero
        grads.append([e.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                 for p in sam.mask_decoder.parameters()])
    assert sum(bool(g.any()) for g in grads[1]) > 20
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= GRAD_ATOL
