# why: over 500 lines: the reordered decoder, its per-image cache and the linear-view seam are one tested unit
"""`fast_decode`: the same function as `Sam.decode`, evaluated in a cheaper order.

The prompt tokens meet the image tokens through rank heads x tokens products instead of full
projections, and the upscaling runs as matmuls in token layout, with a per-image
`DecoderImageCache` for the prompt-independent first layer. `cache_dense_pe(sam)` and
`prepare_image_embedding` (channels-last) are its small helpers.

The reassociated decoder reads the projections' weights directly, through a `LinearView`: plain
`nn.Linear` is built in; a package that wraps linear layers (a LoRA kind) teaches the decoder its
layers with `register_linear_view`. A decoder with a layer no view accepts, hooks, or changed
layers takes `Sam.decode` as is.
"""
import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..common import LayerNorm2d
from ..mask_decoder import MaskDecoder
from ..transformer import Attention as DecoderAttention
from ..transformer import TwoWayAttentionBlock, TwoWayTransformer

__all__ = [
    "LinearView",
    "register_linear_view",
    "remove_linear_view",
    "linear_views",
    "cache_dense_pe",
    "prepare_image_embedding",
    "fast_decoder_applies",
    "fast_decode",
    "DecoderImageCache",
]


# ============================================================================ linear views
class LinearView(NamedTuple):
    """How the fast decoder reads one linear layer: `module(x) == x @ W.T + b`.

    Attributes:
        weight_bias: a callable returning (W, b) for the layer's current state (b may be None
            when `has_bias` is False).
        tensors: a callable returning the tensors `weight_bias` reads (the per-image cache stamps
            them, so an in-place change of any of them refills it).
        has_bias: whether the layer adds a bias (the fast decoder needs one on each projection).
    """

    weight_bias: Callable[[], Tuple[torch.Tensor, Optional[torch.Tensor]]]
    tensors: Callable[[], List[torch.Tensor]]
    has_bias: bool = True


LinearViewFn = Callable[[nn.Module], Optional[LinearView]]
_VIEWS_LOCK = threading.Lock()
_LINEAR_VIEWS: Tuple[LinearViewFn, ...] = ()  # replaced, never mutated: readers need no lock


def _nn_linear_view(m: nn.Module) -> Optional[LinearView]:
    if type(m) is not nn.Linear:
        return None
    return LinearView(lambda: (m.weight, m.bias), lambda: [m.weight, m.bias], m.bias is not None)


def register_linear_view(view: LinearViewFn) -> LinearViewFn:
    """Teach the fast decoder a kind of linear layer (a wrapper such as a LoRA layer).

    `view(module)` returns a `LinearView` for a module it understands and None otherwise; plain
    `nn.Linear` is built in and asked first, then the registered views in order. A module no view
    accepts sends `fast_decoder_applies` to False (the exact module path). Registering the same
    view twice keeps one entry.

    Args:
        view: a callable `view(module) -> Optional[LinearView]`.

    Returns:
        `view` (so this also works as a decorator).

    Raises:
        TypeError: `view` is not callable.

    Example:
        >>> from torch import nn
        >>> from samadapt.sam_core.fast import LinearView, register_linear_view, remove_linear_view
        >>> class Scaled(nn.Linear):  # a layer whose output is x W^T + b with W = 2 * weight
        ...     def forward(self, x):
        ...         return nn.functional.linear(x, 2 * self.weight, self.bias)
        >>> def scaled_view(m):
        ...     if type(m) is not Scaled:
        ...         return None
        ...     return LinearView(lambda: (2 * m.weight, m.bias), lambda: [m.weight, m.bias])
        >>> register_linear_view(scaled_view) is scaled_view
        True
        >>> remove_linear_view(scaled_view)
        True
    """
    global _LINEAR_VIEWS
    if not callable(view):
        raise TypeError(f"a linear view must be a callable view(module) -> LinearView | None; got {view!r}")
    with _VIEWS_LOCK:
        if view not in _LINEAR_VIEWS:
            _LINEAR_VIEWS = _LINEAR_VIEWS + (view,)
    return view


def remove_linear_view(view: LinearViewFn) -> bool:
    """Forget a view added by `register_linear_view` (its layers then take the module path).

    Args:
        view: the callable that was registered.

    Returns:
        True when it was registered, False when it was not.

    Example:
        >>> from samadapt.sam_core.fast import remove_linear_view
        >>> remove_linear_view(lambda m: None)
        False
    """
    global _LINEAR_VIEWS
    with _VIEWS_LOCK:
        if view not in _LINEAR_VIEWS:
            return False
        _LINEAR_VIEWS = tuple(v for v in _LINEAR_VIEWS if v is not view)
    return True


def linear_views() -> Tuple[LinearViewFn, ...]:
    """The registered views, in the order they are asked (the built-in `nn.Linear` view not included).

    Returns:
        A tuple of the callables passed to `register_linear_view`.

    Example:
        >>> from samadapt.sam_core.fast import linear_views
        >>> isinstance(linear_views(), tuple)
        True
    """
    return _LINEAR_VIEWS


def _linear_view(m: nn.Module) -> Optional[LinearView]:
    """The first view that accepts `m` (plain `nn.Linear` first), or None."""
    view = _nn_linear_view(m)
    if view is not None:
        return view
    for fn in _LINEAR_VIEWS:
        view = fn(m)
        if view is not None:
            return view
    return None


def _linear_wb(m: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W, b) with `m(x) == x @ W.T + b`, for a layer `fast_decoder_applies` accepted."""
    return _linear_view(m).weight_bias()


def _linear_tensors(m: nn.Module) -> list:
    """The tensors `_linear_wb(m)` reads (for cache stamps)."""
    return list(_linear_view(m).tensors())


def cache_dense_pe(sam: nn.Module, channels_last: bool = True) -> torch.Tensor:
    """Compute the prompt encoder's dense positional encoding once and serve it from a cache.

    `get_dense_pe()` depends only on fixed buffers and the embedding grid, but recomputes a
    h x w x C sin/cos grid on every call. This replaces it (on this instance only) by a cached
    tensor, recomputed when the buffer's device/dtype or the grid changes.

    Args:
        sam: a `Sam` (its `prompt_encoder` is patched).
        channels_last: keep the cached tensor channels-last (the fast decoder's layout).

    Returns:
        The dense positional encoding, 1 x C x h x w.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> from samadapt.sam_core.fast import cache_dense_pe
        >>> sam = build_sam("tiny")
        >>> cache_dense_pe(sam) is sam.prompt_encoder.get_dense_pe()
        True
    """
    pe_mod = sam.prompt_encoder
    original = type(pe_mod).get_dense_pe
    state = {}

    def cached() -> torch.Tensor:
        g = pe_mod.pe_layer.positional_encoding_gaussian_matrix
        key = (g.device, g.dtype, g.data_ptr(), g._version, tuple(pe_mod.image_embedding_size), channels_last)
        if state.get("key") != key:
            with torch.no_grad():
                pe = original(pe_mod)
            state["pe"] = pe.contiguous(memory_format=torch.channels_last) if channels_last else pe.contiguous()
            state["key"] = key
        return state["pe"]

    pe_mod.get_dense_pe = cached
    return cached()


def prepare_image_embedding(embedding: torch.Tensor) -> torch.Tensor:
    """A channels-last copy of an embedding, the fast decoder's layout.

    The decoder's image tokens (`flatten(2).transpose(1, 2)`) are then contiguous rows and its
    linear layers skip a copy.

    Args:
        embedding: B x C x h x w image embedding.

    Returns:
        The same values, channels-last (the input itself when it already is).

    Example:
        >>> import torch
        >>> from samadapt.sam_core.fast import prepare_image_embedding
        >>> prepare_image_embedding(torch.zeros(1, 8, 4, 4)).is_contiguous(memory_format=torch.channels_last)
        True
    """
    return embedding.contiguous(memory_format=torch.channels_last)


# ============================================================================ prompt -> mask decoding
#
# `fast_decode` computes `Sam.decode` with the same weights in a cheaper order. The two-way
# transformer mixes a handful of prompt tokens (T = 7 for one point) with h*w = 4096 image tokens;
# whatever passes between them has rank heads*T (56 < the attention width 128), so:
#   * token->image attention: softmax((s q W_k) x^T) (p x) W_v^T + b_v: the image tokens are never
#     projected to k/v (the key bias is constant along the keys and cancels in the softmax);
#   * image->token attention: logits = x (s W_q^T k^T) + s b_q k^T and
#     out_proj(p v) = p (v W_o^T) + b_o: no q/out projection of the image tokens either;
#   * the first layer's image side does not depend on the prompt (no mask prompt): a per-image
#     `DecoderImageCache` holds its k/v/q projections;
#   * the output upscaling runs as matmuls in token layout (each 2x2 stride-2 transposed conv is a
#     per-token linear map) and only the returned masks are formed;
#   * large intermediates are updated in place where autograd allows it (fresh large CPU tensors
#     cost page faults).


def fast_decoder_applies(sam: nn.Module) -> bool:
    """Whether `fast_decode` takes its own path for `sam`'s decoder in use (else it runs `sam.decode`).

    The reassociated decoder reads weights directly: only for the core layout, with projections
    that `nn.Linear` or a registered `LinearView` describes (a layer no view accepts, hooks, other
    activations, ... take the module path).

    Args:
        sam: a `Sam`.

    Returns:
        True when the fast path applies.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> from samadapt.sam_core.fast import fast_decoder_applies
        >>> fast_decoder_applies(build_sam("tiny"))
        True
    """
    md = getattr(sam, "active_mask_decoder", None)
    tr = getattr(md, "transformer", None)
    if type(md) is not MaskDecoder or type(tr) is not TwoWayTransformer:
        return False
    if getattr(sam, "prompt_encoder", None) is None:
        return False
    if any(type(layer) is not TwoWayAttentionBlock for layer in tr.layers):
        return False
    # hooks or patched forwards on the modules whose forward is bypassed would be skipped
    for m in md.modules():
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return False
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    attns = [tr.final_attn_token_to_image]
    for layer in tr.layers:
        attns += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
        if type(layer.norm4) is not nn.LayerNorm or not layer.norm4.elementwise_affine or layer.norm4.bias is None:
            return False
    for a in attns:
        if type(a) is not DecoderAttention:
            return False
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            view = _linear_view(getattr(a, n))
            if view is None or not view.has_bias:
                return False
    up = md.output_upscaling
    if not (isinstance(up, nn.Sequential) and len(up) == 5):
        return False
    c1, ln, g1, c2, g2 = up
    for c in (c1, c2):
        if not (type(c) is nn.ConvTranspose2d and c.kernel_size == (2, 2) and c.stride == (2, 2)
                and c.padding == (0, 0) and c.output_padding == (0, 0) and c.groups == 1
                and c.dilation == (1, 1) and c.bias is not None):
            return False
    return (type(ln) is LayerNorm2d and ln.elementwise_affine and type(g1) is nn.GELU and type(g2) is nn.GELU)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)  # b, H, n, dh


_CHUNK = 512  # image tokens per step on the image side: intermediates stay in cache, memory is reused


def _token_to_image(attn: nn.Module, q_in: torch.Tensor, keys: torch.Tensor, key_pe: torch.Tensor,
                    chunk: int = _CHUNK) -> torch.Tensor:
    """`attn(q_in, keys + key_pe, keys)` for few query tokens (b, T, C) over many image tokens.

    Per head: softmax(s q_h (W_k,h x + b_k,h)^T) (W_v,h x + b_v,h)
            = softmax((s q_h W_k,h) x^T) (p x) W_v,h^T + b_v,h
    (the key bias is constant along the keys and cancels in the softmax; softmax rows sum to 1).
    """
    H = attn.num_heads
    b, T, _ = q_in.shape
    inner = attn.q_proj.out_features
    dh = inner // H
    if H * T >= inner:  # many prompt tokens: the plain order is cheaper
        return attn(q_in, keys + key_pe, keys)
    q = _split_heads(attn.q_proj(q_in), H)  # b, H, T, dh
    wk = _linear_wb(attn.k_proj)[0].view(H, dh, -1)
    wv_, bv = _linear_wb(attn.v_proj)
    wv = wv_.view(H, dh, -1)
    g = torch.einsum("bhtd,hdc->bhtc", q * dh ** -0.5, wk).reshape(b, H * T, -1)  # b, H*T, C
    n = keys.shape[1]
    logits = g.new_empty(b, H * T, n)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        logits[:, :, s:e] = torch.matmul(g, (keys[:, s:e] + key_pe[:, s:e]).transpose(-1, -2))
    p = torch.softmax(logits, dim=-1)  # b, H*T, N
    sx = torch.matmul(p, keys).view(b, H, T, -1)  # b, H, T, C
    o = torch.einsum("bhtc,hdc->bhtd", sx, wv) + bv.view(H, 1, dh)
    return attn.out_proj(o.transpose(1, 2).reshape(b, T, inner))


def _image_to_token_update(attn: nn.Module, norm: nn.Module, keys: torch.Tensor, key_pe: torch.Tensor,
                           k_in: torch.Tensor, v_in: torch.Tensor, q_t: Optional[torch.Tensor] = None,
                           chunk: int = _CHUNK) -> torch.Tensor:
    """`norm(keys + attn(keys + key_pe, k_in, v_in))`: many image queries over few tokens (b, T, C).

    Per head: logits = (x W_q,h^T + b_q,h) s k_h^T = x (s W_q,h^T k_h^T) + s b_q,h k_h^T and
    out_proj(concat_h p_h v_h) = sum_h p_h (v_h W_o,h^T) + b_o: the image tokens are never
    projected. With `q_t` ((b|1) x H x dh x N, bias included) the image queries come projected.
    """
    H = attn.num_heads
    b, T, _ = k_in.shape
    inner = attn.q_proj.out_features
    dh = inner // H
    if q_t is None and H * T >= inner:
        return norm(attn(keys + key_pe, k_in, v_in).add_(keys))
    k = _split_heads(attn.k_proj(k_in), H) * dh ** -0.5  # b, H, T, dh (scaled)
    v = _split_heads(attn.v_proj(v_in), H)
    if q_t is None:
        wq, bq = _linear_wb(attn.q_proj)
        wq, bq = wq.view(H, dh, -1), bq.view(H, dh)
        mt = torch.einsum("hdc,bhtd->bhtc", wq, k).reshape(b, H * T, -1)  # b, H*T, C
        c0 = torch.einsum("hd,bhtd->bht", bq, k).reshape(b, H * T, 1)
    wo, bo = _linear_wb(attn.out_proj)
    wo = wo.view(-1, H, dh)  # C, H, dh
    u = torch.einsum("chd,bhtd->bhtc", wo, v).reshape(b, H * T, -1)  # b, H*T, C
    bias = bo.expand(b, 1, -1)
    n = keys.shape[1]
    out = keys.new_empty(b, n, keys.shape[2], dtype=torch.result_type(keys, u))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = keys[:, s:e]
        if q_t is None:
            logits = torch.baddbmm(c0, mt, (x + key_pe[:, s:e]).transpose(-1, -2).expand(b, -1, -1))
        else:
            logits = torch.matmul(k, q_t[..., s:e])  # b, H, T, n
        # softmax over the T tokens along a strided axis: far faster than over a last axis of length T
        p = torch.softmax(logits.view(b, H, T, e - s), dim=2).view(b, H * T, e - s)
        out[:, s:e] = norm(torch.baddbmm(bias, p.transpose(1, 2), u).add_(x))
    return out


def _attend_projected(attn: nn.Module, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attn(q_in, ., .)` with keys/values already projected ((b|1) x H x N x dh): the module's math."""
    b, T, _ = q_in.shape
    q = _split_heads(attn.q_proj(q_in), attn.num_heads)
    o = F.scaled_dot_product_attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
    return attn.out_proj(o.transpose(1, 2).reshape(b, T, -1))


def _conv_t_matrix(conv: nn.ConvTranspose2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 stride-2 transposed conv as a per-token map C_in -> (2, 2, C_out), and its bias."""
    w = conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, 4 * conv.out_channels)
    return w, conv.bias.repeat(4)


def _upscale_masks(md: nn.Module, keys: torch.Tensor, hyper: torch.Tensor, hw: Tuple[int, int],
                   chunk: int = 512) -> torch.Tensor:
    """Masks = hyper @ output_upscaling(keys as b x C x h x w), without leaving the token layout.

    Each 2x2 stride-2 transposed conv is one matmul per token (C_in -> 2*2*C_out); the
    LayerNorm2d and GELUs act per output pixel, so the pixels stay in (token, sub-pixel) order
    and are put in image order once, on the few output masks. Tokens go `chunk` at a time: the
    intermediates (16x the tokens) then stay in cache and reuse memory instead of faulting in
    fresh pages.
    """
    c1, ln, g1, c2, g2 = md.output_upscaling
    b, N, C = keys.shape
    h, w = hw
    o1, o2 = c1.out_channels, c2.out_channels
    w1, b1 = _conv_t_matrix(c1)
    w2, b2 = _conv_t_matrix(c2)
    hyper_t = hyper.transpose(1, 2)  # b, C2, M
    m = hyper.shape[1]
    masks = keys.new_empty(b, N * 16, m, dtype=torch.result_type(keys, hyper))
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        y = torch.addmm(b1, keys[:, s:e].reshape(-1, C), w1).view(-1, o1)  # (b*n*4) x C1
        # GELU in place on the fresh tensors (autograd supports aten::gelu_)
        y = torch.ops.aten.gelu_(F.layer_norm(y, (o1,), ln.weight, ln.bias, ln.eps), approximate=g1.approximate)
        y = torch.ops.aten.gelu_(torch.addmm(b2, y, w2), approximate=g2.approximate)  # (b*n*4) x (2*2*C2)
        masks[:, s * 16: e * 16] = torch.matmul(y.view(b, (e - s) * 16, o2), hyper_t)
    # token (i, j), sub-pixels (a, b') then (c, d) -> pixel (4i + 2a + c, 4j + 2b' + d)
    masks = masks.view(b, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(b, m, 4 * h, 4 * w)


def _stamp(tensors: Sequence[torch.Tensor]) -> Tuple:
    out = []
    for t in tensors:
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter: add a cheap content probe
            flat = t.detach().reshape(-1)
            version = ("probe", float(flat[:: max(1, flat.numel() // 4099)].double().sum()))
        out.append((t.data_ptr(), version, t.dtype, t.device, tuple(t.shape), t.stride()))
    return tuple(out)


class DecoderImageCache:
    """Per-image, prompt-independent products for `fast_decode` (no mask prompt, one embedding).

    With no mask prompt the decoder's image tokens start as `embedding + no_mask_embed`, so the
    first layer's token->image keys/values and image->token queries are the same for every prompt
    on the image. Keep one cache per image next to the embedding and pass it to
    `fast_decode(..., cache=...)`: it fills on first use (about one first-layer pass) and refills
    by itself when the embedding, the positional-encoding buffer or any weight it read changes
    (pointer or in-place version; inference tensors by a content probe), or `sam.generation`
    moves. Not for concurrent use from several threads.

    Example:
        >>> import torch
        >>> from samadapt.sam_core import build_sam
        >>> from samadapt.sam_core.fast import DecoderImageCache, fast_decode
        >>> sam = build_sam("tiny")
        >>> cache = DecoderImageCache()
        >>> emb = torch.zeros(1, sam.prompt_encoder.embed_dim, *sam.embedding_size)
        >>> with torch.no_grad():
        ...     masks, iou = fast_decode(sam, emb, boxes=torch.tensor([[10.0, 10.0, 100.0, 90.0]]), cache=cache)
        >>> tuple(masks.shape[:2]), tuple(iou.shape)
        ((1, 1), (1, 1))
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._key = None
        self._val: Optional[Dict[str, torch.Tensor]] = None

    @staticmethod
    def _weights(sam: nn.Module) -> list:
        layer = sam.active_mask_decoder.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        return ([sam.prompt_encoder.no_mask_embed.weight] + _linear_tensors(t2i.k_proj)
                + _linear_tensors(t2i.v_proj) + _linear_tensors(i2t.q_proj))

    def get(self, sam: nn.Module, embedding: torch.Tensor, dense: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The cached products, rebuilt when anything they were made from changed.

        Args:
            sam: the `Sam` whose decoder in use reads them.
            embedding: the 1 x C x h x w image embedding.
            dense: the no-mask dense prompt (its dtype is the compute dtype).

        Returns:
            The first layer's image tokens, positional tokens and k/v/q projections by name.
        """
        pe_mod = sam.prompt_encoder
        key = (
            getattr(sam, "generation", None), len(sam.active_mask_decoder.transformer.layers),
            tuple(pe_mod.image_embedding_size), dense.dtype,
        ) + _stamp([embedding, pe_mod.pe_layer.positional_encoding_gaussian_matrix] + self._weights(sam))
        if key != self._key:
            self._val = None
            dt = dense.dtype
            keys = (embedding.to(dt) + dense).flatten(2).transpose(1, 2).contiguous()
            key_pe = pe_mod.get_dense_pe().to(dt).flatten(2).transpose(1, 2).contiguous()
            self._val = self._build(sam, keys, key_pe)
            self._key = key
        return self._val

    @staticmethod
    def _build(sam: nn.Module, keys: torch.Tensor, key_pe: torch.Tensor) -> Dict[str, torch.Tensor]:
        tr = sam.active_mask_decoder.transformer
        L0 = tr.layers[0]
        t2i, i2t = L0.cross_attn_token_to_image, L0.cross_attn_image_to_token
        kp = keys + key_pe
        return {
            "keys0": keys,  # 1, N, C: embedding + no-mask prompt, as image tokens
            "key_pe": key_pe,
            "k0": _split_heads(t2i.k_proj(kp), t2i.num_heads).contiguous(),  # 1, H, N, dh
            "v0": _split_heads(t2i.v_proj(keys), t2i.num_heads).contiguous(),
            "q0t": _split_heads(i2t.q_proj(kp), i2t.num_heads).transpose(-1, -2).contiguous(),  # 1, H, dh, N
        }


def fast_decode(
    sam: nn.Module,
    image_embeddings: torch.Tensor,
    point_coords: Optional[torch.Tensor] = None,
    point_labels: Optional[torch.Tensor] = None,
    boxes: Optional[torch.Tensor] = None,
    mask_inputs: Optional[torch.Tensor] = None,
    multimask_output: bool = False,
    cache: Optional[DecoderImageCache] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same function as `Sam.decode`, evaluated in a cheaper order (see the section comment).

    The token-side layers are the modules themselves; the image side never leaves the token
    layout. A decoder `fast_decoder_applies` refuses (a layer no `LinearView` accepts, hooks,
    changed layers) takes `sam.decode` as is. Pair with `prepare_image_embedding` (channels-last)
    and `cache_dense_pe(sam)`.

    Args:
        sam: a `Sam`; its decoder in use (`sam.active_mask_decoder`) runs.
        image_embeddings: 1 x C x h x w (all prompts on one image) or B x C x h x w.
        point_coords: B x P x 2 point prompts in the resized-input frame.
        point_labels: B x P labels (1 foreground, 0 background, -1 padding).
        boxes: B x 4 box prompts (x0, y0, x1, y1).
        mask_inputs: B x 1 x 4h x 4w mask prompts (previous low-res logits).
        multimask_output: return the three multimask candidates instead of the single mask.
        cache: a `DecoderImageCache` kept per image to reuse the prompt-independent products
            (used with one embedding and no mask prompt; ignored otherwise).

    Returns:
        (low-res mask logits B x M x 4h x 4w, IoU predictions B x M), as `Sam.decode`.

    Example:
        >>> import torch
        >>> from samadapt.sam_core import build_sam
        >>> from samadapt.sam_core.fast import fast_decode
        >>> sam = build_sam("tiny")
        >>> emb = torch.randn(1, sam.prompt_encoder.embed_dim, *sam.embedding_size)
        >>> kw = dict(point_coords=torch.tensor([[[60.0, 40.0]]]), point_labels=torch.tensor([[1]]))
        >>> with torch.no_grad():
        ...     fast, plain = fast_decode(sam, emb, **kw), sam.decode(emb, **kw)
        >>> bool((fast[0] - plain[0]).abs().max() < 1e-4)
        True
    """
    if not fast_decoder_applies(sam):
        return sam.decode(image_embeddings, point_coords, point_labels, boxes, mask_inputs, multimask_output)
    pe_mod, md = sam.prompt_encoder, sam.active_mask_decoder
    sparse, dense, b = sam.embed_prompts(image_embeddings, point_coords, point_labels, boxes, mask_inputs)
    dt = dense.dtype
    tr = md.transformer
    _, C, h, w = image_embeddings.shape
    cached = None
    if cache is not None and mask_inputs is None and image_embeddings.shape[0] == 1 and len(tr.layers) > 0:
        cached = cache.get(sam, image_embeddings, dense)
        keys, key_pe = cached["keys0"], cached["key_pe"]
    else:
        image_pe = pe_mod.get_dense_pe().to(dt)
        src = image_embeddings.to(dt) + dense  # (1|b) x C x h x w; dense may be a broadcast view
        keys = src.flatten(2).transpose(1, 2)  # contiguous rows when channels-last
        key_pe = image_pe.flatten(2).transpose(1, 2)

    output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
    queries, query_pe = tokens, tokens

    def token_side(layer, queries):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q, q, queries)
        return layer.norm1(queries)

    for li, layer in enumerate(tr.layers):
        queries = token_side(layer, queries)
        q = queries + query_pe
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        first_cached = li == 0 and cached is not None  # the first layer's image side from the cache
        if first_cached:
            queries = layer.norm2(queries + _attend_projected(t2i, q, cached["k0"], cached["v0"]))
        else:
            queries = layer.norm2(queries + _token_to_image(t2i, q, keys, key_pe))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        keys = _image_to_token_update(i2t, layer.norm4, keys, key_pe, q, queries,
                                      q_t=cached["q0t"] if first_cached else None)
    attn_out = _token_to_image(tr.final_attn_token_to_image, queries + query_pe, keys, key_pe)
    hs = tr.norm_final_attn(queries + attn_out)

    sel = range(1, md.num_mask_tokens) if multimask_output else range(0, 1)
    hyper = torch.stack([md.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in sel], dim=1)
    if keys.shape[0] != b:
        keys = keys.expand(b, -1, -1)
    masks = _upscale_masks(md, keys, hyper, (h, w))
    iou = md.iou_prediction_head(hs[:, 0, :])
    iou = iou[:, 1:] if multimask_output else iou[:, 0:1]
    return masks, iou
