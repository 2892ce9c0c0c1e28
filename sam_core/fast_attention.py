"""Fast paths that compute the same functions as the plain ones, with less time and memory.

* `enable_fast_attention(sam_or_encoder)`: the image encoder's attention without the N x N
  relative-position bias. timm's SAM `Attention` builds a (B*heads, N, N) decomposed rel-pos bias
  and hands 3-D q/k/v plus that bias to `scaled_dot_product_attention`, so fused GPU kernels refuse
  it and a 64 x 64 global block holds a B x heads x 4096 x 4096 tensor. The bias factorises:

      logits[i, j] = scale * q_i . k_j + q_i . Rh[row(i), row(j)] + q_i . Rw[col(i), col(j)]
                   = [scale * q_i | rel_h_i | rel_w_i] . [k_j | onehot(row(j)) | onehot(col(j))]

  with rel_h = einsum(q, Rh) (N x kh) and rel_w = einsum(q, Rw) (N x kw). So appending rel_h/rel_w
  to the scaled queries and one-hot row/column codes to the keys gives plain attention (no mask,
  scale 1) with a head dim of head_dim + kh + kw, which flash / memory-efficient kernels accept.
  No N x N tensor is built, everything runs in the input's dtype, autograd works, parameters and
  module names are unchanged (peft LoRA may wrap `attn.qkv` / `attn.proj` before or after).
  The price is a wider q/k (head_dim + h + w: 64 -> 192 for a 64 x 64 global block), so two
  more exact routes keep the head dim: `kernel="triton"`, samadapt's fused kernel
  (`sam_core.relpos_attention`: the bias added per key tile, forward and backward fused; the
  fastest training route on an H100, benchmarks/RESULTS.md), and `kernel="flex"`, PyTorch's
  FlexAttention with `score + rel_h[q, row(k)] + rel_w[q, col(k)]` per score (measured 10x
  slower than the factorised route on an H100; kept for newer PyTorch versions to try).

* `postprocess_masks_fast(low_res, image_size, input_size, original_size)`: SAM's
  `postprocess_masks` (bilinear 4x upsample to image_size, crop, bilinear resize to the original
  size) is separable and linear, so per axis the two 1-D maps compose into one matrix:
  `A_h @ low_res @ A_w^T`. The matrices are cached and applied block-banded (the zero blocks of
  each matrix are skipped), which computes the same product.

* `fast_decode(sam, embedding, ...)`: the same function as `Sam.decode` in a cheaper order (the
  prompt tokens meet the image tokens through rank heads x tokens products instead of full
  projections; upscaling as matmuls in token layout), with a per-image `DecoderImageCache` for the
  prompt-independent first layer. `cache_dense_pe(sam)` and `prepare_image_embedding` (channels-last)
  are its small helpers. Decoders whose layers were wrapped (adapters) take `Sam.decode`.

Opt-in: `SAMADAPT_FAST_ATTENTION=1` in the environment makes `enable_fast_attention_default()`
return True (for the builder to consult); nothing changes unless a caller enables a path.
"""
import os
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from timm.models.vision_transformer_sam import Attention as TimmSamAttention

__all__ = [
    "FastSamAttention",
    "enable_fast_attention",
    "enable_fast_attention_default",
    "fast_attention_enabled",
    "fast_sam_attention",
    "flex_sam_attention",
    "triton_sam_attention",
    "flex_available",
    "postprocess_masks_fast",
    "interp_matrix",
    "composed_postprocess_matrices",
    "cache_dense_pe",
    "prepare_image_embedding",
    "fast_decode",
    "DecoderImageCache",
]


def enable_fast_attention_default() -> bool:
    """The tiny opt-in: True when SAMADAPT_FAST_ATTENTION is set to 1/true/yes/on."""
    return os.environ.get("SAMADAPT_FAST_ATTENTION", "").strip().lower() in ("1", "true", "yes", "on")


# ============================================================================ attention
_CACHE_LOCK = threading.Lock()
_REL_INDEX_CACHE: Dict[Tuple, torch.Tensor] = {}
_KEY_CODE_CACHE: Dict[Tuple, torch.Tensor] = {}


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def _memo(cache: Dict, key: Tuple, build, max_size: Optional[int] = None):
    """`cache[key]`, made by `build()` on a miss and stored under the lock (past `max_size`
    entries the oldest is dropped)."""
    val = cache.get(key)
    if val is None:
        with torch.inference_mode(False):  # a plain tensor: usable by later autograd calls too
            val = build()
        with _CACHE_LOCK:
            if max_size is not None and len(cache) >= max_size:
                cache.pop(next(iter(cache)))
            cache[key] = val
    return val


def _rel_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """timm's `get_rel_pos` index (q_size x k_size, long) on `device`, cached."""
    def build():
        q_coords = torch.arange(q_size, dtype=torch.float32, device=device)[:, None] * max(k_size / q_size, 1.0)
        k_coords = torch.arange(k_size, dtype=torch.float32, device=device)[None, :] * max(q_size / k_size, 1.0)
        return ((q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)).long()

    return build() if _compiling() else _memo(_REL_INDEX_CACHE, (q_size, k_size, str(device)), build)


def _rel_pos_table(rel_pos: torch.Tensor, q_size: int, k_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The same (q_size, k_size, C) table as timm's `get_rel_pos`, in `dtype`."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        # the same interpolation timm applies when the table was made for another size
        rel_pos = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        ).reshape(-1, max_rel_dist).permute(1, 0)
    return rel_pos.to(dtype)[_rel_index(q_size, k_size, rel_pos.device)]


def _decomposed_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: Tuple[int, int],
                      rows_first: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's per-query bias terms in q's dtype: rel_h (B x heads x N x h; with `rows_first`,
    B x heads x h x N: the key row first) and rel_w (B x heads x N x w). Every route calls it
    first: it also checks that q's N tokens are the h x w grid."""
    h, w = hw
    B, nh, N, d = q.shape
    if N != h * w:
        raise ValueError(f"{N} tokens for an {h} x {w} grid")
    rq = q.reshape(B, nh, h, w, d)
    Rh = _rel_pos_table(rel_pos_h, h, h, q.dtype)  # (h, h, d): query row x key row
    Rw = _rel_pos_table(rel_pos_w, w, w, q.dtype)
    if rows_first:
        rel_h = torch.einsum("bnhwc,hkc->bnkhw", rq, Rh).reshape(B, nh, h, N)
    else:
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, Rh).reshape(B, nh, N, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, Rw).reshape(B, nh, N, w)
    return rel_h, rel_w


def _key_codes(h: int, w: int, pad: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h*w, h + w + pad): one-hot row code then one-hot column code of each key, then zeros."""
    def build():
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        codes = torch.zeros(h * w, h + w + pad, device=device, dtype=dtype)
        n = torch.arange(h * w, device=device)
        codes[n, rows] = 1
        codes[n, h + cols] = 1
        return codes

    return build() if _compiling() else _memo(_KEY_CODE_CACHE, (h, w, pad, str(device), dtype), build)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def fast_sam_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: Tuple[int, int],
    scale: float,
    dropout_p: float = 0.0,
    pad_v: Optional[bool] = None,
    multiple: int = 8,
) -> torch.Tensor:
    """softmax(scale q k^T + decomposed rel-pos bias) v without building the bias.

    Args:
        q, k, v: B x heads x N x d (N = h * w, row-major), any float dtype (the compute dtype).
        rel_pos_h, rel_pos_w: timm's tables ((2h-1) x d and (2w-1) x d, or another length:
            interpolated as timm does).
        hw: (h, w) of the token grid.
        scale: the logit scale applied to q . k (head_dim ** -0.5).
        pad_v: also zero-pad v to the extended head dim (the CPU fused kernel and CUDA flash
            attention want q, k and v of one width); None: on CPU only.
        multiple: q/k (and v when padded) widths are zero-padded to a multiple of this.
    Returns:
        B x heads x N x d, in q's dtype.
    """
    h, w = hw
    B, nh, N, d = q.shape
    dt = q.dtype
    rel_h, rel_w = _decomposed_terms(q, rel_pos_h, rel_pos_w, hw)
    width = d + h + w
    if pad_v is None:
        pad_v = q.device.type == "cpu"
    full = _round_up(max(width, d), multiple)
    pad = full - width
    parts = [q * scale, rel_h, rel_w]
    if pad:
        parts.append(q.new_zeros(B, nh, N, pad))
    q2 = torch.cat(parts, dim=-1)
    codes = _key_codes(h, w, pad, q.device, dt)
    k2 = torch.cat([k, codes.expand(B, nh, N, h + w + pad)], dim=-1)
    if pad_v and v.shape[-1] != full:
        out = F.scaled_dot_product_attention(q2, k2, F.pad(v, (0, full - d)), dropout_p=dropout_p, scale=1.0)
        return out[..., :d]
    if v.shape[-1] % multiple:
        dv = _round_up(d, multiple)
        out = F.scaled_dot_product_attention(q2, k2, F.pad(v, (0, dv - d)), dropout_p=dropout_p, scale=1.0)
        return out[..., :d]
    return F.scaled_dot_product_attention(q2, k2, v, dropout_p=dropout_p, scale=1.0)


_FLEX_COMPILED = None
KERNELS = ("sdpa", "triton", "flex")


def _flex_fn(device_type: str):
    """FlexAttention to call: a once-compiled one on CUDA, and PyTorch's eager reference
    elsewhere (it builds the scores: a check, not a fast path)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        with _CACHE_LOCK:
            if _FLEX_COMPILED is None:
                _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def flex_available() -> bool:
    """True when this torch has FlexAttention (torch.nn.attention.flex_attention)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - older torch
        return False
    return True


def flex_sam_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: Tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """The same function as `fast_sam_attention`, through FlexAttention: the decomposed bias is
    added to each score inside the kernel (`rel_h[q, k // w] + rel_w[q, k % w]`), so q, k and v
    keep their head dim and no N x N tensor is built. Gradients reach q (through rel_h / rel_w),
    k, v and the tables. FlexAttention's backward runs on CUDA only; eager calls off CUDA use its
    reference implementation.

    Args, returns: as `fast_sam_attention` (no dropout).
    """
    rel_h, rel_w = _decomposed_terms(q, rel_pos_h, rel_pos_w, hw)
    w = hw[1]
    if _compiling():  # a graph break: the once-compiled kernel runs as in eager use
        return _flex_separate(q, k, v, rel_h, rel_w, w, scale)
    return _flex_core(q, k, v, rel_h, rel_w, w, scale)


def _flex_core(q, k, v, rel_h, rel_w, w: int, scale: float) -> torch.Tensor:
    def score_mod(score, b, head, q_idx, kv_idx):
        return score + rel_h[b, head, q_idx, kv_idx // w] + rel_w[b, head, q_idx, kv_idx % w]

    return _flex_fn(q.device.type)(q, k, v, score_mod=score_mod, scale=scale)


# under an outer torch.compile: a graph break, then the once-compiled FlexAttention kernel
_flex_separate = torch.compiler.disable(_flex_core, recursive=False)


def triton_sam_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: Tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """The same function as `fast_sam_attention`, through samadapt's fused Triton kernel
    (`sam_core.relpos_attention`): head dim unchanged, the bias added per key tile (one rel_h
    column, one rel_w tile), nothing N x N built, forward and backward fused; a custom op, so
    `torch.compile` keeps it in its graph. CUDA (or TRITON_INTERPRET=1).

    Args, returns: as `fast_sam_attention` (no dropout).
    """
    from .relpos_attention import relpos_attention

    # the row term key row first: the kernel reads one key row's terms for a query block in one run
    rel_h_t, rel_w = _decomposed_terms(q, rel_pos_h, rel_pos_w, hw, rows_first=True)
    return relpos_attention(q, k, v, rel_h_t, rel_w, hw[1], scale)


def _use_triton(q: torch.Tensor, w: int, dropout_p: float) -> bool:
    if dropout_p:
        return False
    from .relpos_attention import triton_route_ok

    return triton_route_ok(q, w)


def _use_flex(q: torch.Tensor, dropout_p: float) -> bool:
    # FlexAttention has no dropout; off CUDA it is a reference (no backward, no compiled CPU
    # kernel for this bias): there, training and compiled calls take the SDPA route
    if dropout_p:
        return False
    if q.device.type == "cuda":
        return True
    return not _compiling() and not (torch.is_grad_enabled() and q.requires_grad)


class FastSamAttention(TimmSamAttention):
    """timm's SAM `Attention` with the factorised rel-pos path; the same parameters and names.

    Modules become this class in place (`enable_fast_attention`), never by construction.
    """

    _fast_pad_v: Optional[bool] = None
    _fast_kernel: str = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_rel_pos and self.rope is not None:
            return TimmSamAttention.forward(self, x)  # rotary variant: not SAM; keep timm's path
        B, H, W, _ = x.shape
        N = H * W
        x = x.reshape(B, N, -1)
        # called as a module: peft LoRA may wrap it
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B x heads x N x d each
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.use_rel_pos and self._fast_kernel == "triton" and _use_triton(q, W, dropout_p):
            x = triton_sam_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (H, W), self.scale)
        elif self.use_rel_pos and self._fast_kernel == "flex" and _use_flex(q, dropout_p):
            x = flex_sam_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (H, W), self.scale)
        elif self.use_rel_pos:
            x = fast_sam_attention(
                q, k, v, self.rel_pos_h, self.rel_pos_w, (H, W), self.scale, dropout_p, self._fast_pad_v
            )
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(B, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x.view(B, H, W, -1)


def _encoder_of(sam_or_encoder: nn.Module) -> nn.Module:
    return getattr(sam_or_encoder, "image_encoder", sam_or_encoder)


def enable_fast_attention(
    sam_or_encoder: nn.Module,
    enabled: bool = True,
    pad_v: Optional[bool] = None,
    kernel: str = "sdpa",
    window_kernel: Optional[str] = None,
) -> int:
    """Switch every timm SAM `Attention` of the image encoder to the factorised path (or back).

    The modules keep their parameters, buffers, names and hooks (only their class changes, to
    `FastSamAttention`, a subclass), so state dicts, fingerprints and peft LoRA on `attn.qkv` /
    `attn.proj` are unaffected, before or after.

    Args:
        sam_or_encoder: a `Sam` (its `image_encoder` is used) or the timm encoder itself.
        enabled: False restores timm's own forward.
        pad_v: see `fast_sam_attention` (None: pad v on CPU only).
        kernel: the route of the global-attention blocks: `"sdpa"` (the factorised bias as extra
            q/k columns, any SDPA backend), `"triton"` (samadapt's fused kernel,
            `sam_core.relpos_attention`; CUDA) or `"flex"` (FlexAttention, the bias added per
            score; CUDA). Off CUDA, with dropout, or where a kernel does not apply, a call takes
            the SDPA route.
        window_kernel: the same for the windowed blocks (None: as `kernel`).
    Returns:
        the number of attention modules switched.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> from samadapt.sam_core.fast_attention import enable_fast_attention
        >>> sam = build_sam("tiny")
        >>> enable_fast_attention(sam)
        4
    """
    window_kernel = kernel if window_kernel is None else window_kernel
    for name, val in (("kernel", kernel), ("window_kernel", window_kernel)):
        if val not in KERNELS:
            raise ValueError(f"{name}={val!r} is not a fast attention route; use one of {list(KERNELS)}")
    if "flex" in (kernel, window_kernel) and enabled and not flex_available():
        raise ValueError("kernel='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); use kernel='sdpa'")
    encoder = _encoder_of(sam_or_encoder)
    windowed = {id(blk.attn) for blk in encoder.modules()
                if getattr(blk, "window_size", 0) and isinstance(getattr(blk, "attn", None), TimmSamAttention)}
    n = 0
    for mod in encoder.modules():
        if enabled and type(mod) is TimmSamAttention:
            mod.__class__ = FastSamAttention
        elif not enabled and type(mod) is FastSamAttention:
            mod.__class__ = TimmSamAttention
            mod.__dict__.pop("_fast_pad_v", None)
            mod.__dict__.pop("_fast_kernel", None)
            n += 1
            continue
        if enabled and type(mod) is FastSamAttention:
            mod._fast_pad_v = pad_v
            mod._fast_kernel = window_kernel if id(mod) in windowed else kernel
            n += 1
    return n


def fast_attention_enabled(sam_or_encoder: nn.Module) -> bool:
    """True when every SAM attention module of the encoder takes the factorised path."""
    mods = [m for m in _encoder_of(sam_or_encoder).modules() if isinstance(m, TimmSamAttention)]
    return bool(mods) and all(type(m) is FastSamAttention for m in mods)


# ============================================================================ postprocess
def interp_matrix(n_in: int, n_out: int, index_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n_out, n_in) float64: the 1-D map of `F.interpolate(mode="bilinear", align_corners=False)`
    along one axis (no antialias), with PyTorch's source-index rule evaluated as its kernels do for
    data of `index_dtype` (float32 for float32/bf16/fp16 data: a float32 scale and one fused
    multiply-add), so the weights are bit-identical to the ones `F.interpolate` uses."""
    if index_dtype == torch.float64:
        scale = torch.tensor(n_in / n_out, dtype=torch.float64)
        src = scale * (torch.arange(n_out, dtype=torch.float64) + 0.5) - 0.5
    else:
        scale = (torch.tensor(float(n_in), dtype=torch.float32) / float(n_out)).double()
        src = (scale * (torch.arange(n_out, dtype=torch.float64) + 0.5) - 0.5).float()  # fma, one rounding
    src = src.clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    l1 = (src - i0.to(src.dtype)).clamp(0.0, 1.0)
    l0 = 1.0 - l1
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    a.index_put_((rows, i0), l0.double(), accumulate=True)
    a.index_put_((rows, i1), l1.double(), accumulate=True)
    return a


def _composed_axis(n_low: int, image_size: int, n_input: int, n_orig: int, index_dtype: torch.dtype) -> torch.Tensor:
    """(n_orig, n_low) float64: upsample n_low -> image_size, keep the first n_input, resize to n_orig."""
    if not 0 < n_input <= image_size:
        raise ValueError(f"input size {n_input} must lie in 1..image_size={image_size}")
    up = interp_matrix(n_low, image_size, index_dtype)[:n_input]
    return interp_matrix(n_input, n_orig, index_dtype) @ up


class _BandedMap:
    """A (n_out, n_in) matrix stored as row blocks of `block` rows, each with the narrow column
    window holding its non-zeros; applying it equals the dense product. Dense when the band is wide."""

    def __init__(self, a: torch.Tensor, device: torch.device, dtype: torch.dtype, block: int = 32) -> None:
        n_out, n_in = a.shape
        self.n_out, self.n_in = n_out, n_in
        self.dense = a.to(device=device, dtype=dtype).contiguous()
        nz = a != 0
        any_nz = nz.any(dim=1)
        first = torch.where(any_nz, nz.float().argmax(dim=1), torch.zeros_like(any_nz, dtype=torch.long))
        last = torch.where(any_nz, n_in - 1 - nz.flip(1).float().argmax(dim=1), torch.zeros_like(first))
        nblocks = -(-n_out // block)
        starts, width = [], 1
        for b in range(nblocks):
            r0, r1 = b * block, min(n_out, (b + 1) * block)
            lo, hi = int(first[r0:r1].min()), int(last[r0:r1].max()) + 1
            starts.append(lo)
            width = max(width, hi - lo)
        self.banded = width * 2 <= n_in and nblocks > 1
        if not self.banded:
            return
        starts = [min(s, n_in - width) for s in starts]
        padded = torch.zeros(nblocks * block, n_in, dtype=a.dtype)
        padded[:n_out] = a
        cols = torch.tensor(starts)[:, None] + torch.arange(width)[None, :]  # (nblocks, width)
        blocks = torch.gather(padded.view(nblocks, block, n_in), 2, cols[:, None, :].expand(nblocks, block, width))
        self.nblocks, self.block, self.width = nblocks, block, width
        self.blocks = blocks.to(device=device, dtype=dtype).contiguous()  # (nblocks, block, width)
        self.blocks_t = self.blocks.transpose(1, 2).contiguous()  # (nblocks, width, block)
        self.cols = cols.reshape(-1).to(device)

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """A @ x over the second-last axis: (..., n_in, m) -> (..., n_out, m)."""
        if not self.banded:
            return torch.matmul(self.dense, x)
        lead, m = x.shape[:-2], x.shape[-1]
        xb = x.index_select(-2, self.cols).reshape(*lead, self.nblocks, self.width, m)
        y = torch.matmul(self.blocks, xb)  # (..., nblocks, block, m)
        return y.reshape(*lead, self.nblocks * self.block, m)[..., : self.n_out, :]

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x @ A^T over the last axis: (..., m, n_in) -> (..., m, n_out)."""
        if not self.banded:
            return torch.matmul(x, self.dense.t())
        lead, m = x.shape[:-2], x.shape[-2]
        xb = x.index_select(-1, self.cols).reshape(*lead, m, self.nblocks, self.width).transpose(-3, -2)
        y = torch.matmul(xb, self.blocks_t)  # (..., nblocks, m, block)
        y = y.transpose(-3, -2).reshape(*lead, m, self.nblocks * self.block)
        return y[..., : self.n_out]


_POST_CACHE: Dict[Tuple, Tuple[_BandedMap, _BandedMap]] = {}
_POST_CACHE_MAX = 64


def _as_hw(size: Sequence[int], what: str) -> Tuple[int, int]:
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{what} must be (h, w) of positive ints, got {size}")
    return size


def composed_postprocess_matrices(
    low_hw: Tuple[int, int],
    image_size: int,
    input_size: Sequence[int],
    original_size: Sequence[int],
    index_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A_h, A_w) in float64: `postprocess_masks(x) == A_h @ x @ A_w^T` for x of spatial size low_hw."""
    ih, iw = _as_hw(input_size, "input_size")
    oh, ow = _as_hw(original_size, "original_size")
    return (
        _composed_axis(int(low_hw[0]), int(image_size), ih, oh, index_dtype),
        _composed_axis(int(low_hw[1]), int(image_size), iw, ow, index_dtype),
    )


def _post_maps(low_hw, image_size, input_size, original_size, device, dtype) -> Tuple[_BandedMap, _BandedMap]:
    def build():
        index_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        a_h, a_w = composed_postprocess_matrices(low_hw, image_size, input_size, original_size, index_dtype)
        return _BandedMap(a_h, device, dtype), _BandedMap(a_w, device, dtype)

    key = (tuple(low_hw), int(image_size), tuple(input_size), tuple(original_size), str(device), dtype)
    return _memo(_POST_CACHE, key, build, _POST_CACHE_MAX)


def postprocess_masks_fast(
    low_res: torch.Tensor,
    image_size: int,
    input_size: Sequence[int],
    original_size: Sequence[int],
) -> torch.Tensor:
    """The same function as `Sam.postprocess_masks`, as `A_h @ low_res @ A_w^T`.

    Args:
        low_res: (..., h, w) low-resolution mask logits (B x C x 4h' x 4w' from the decoder);
            float dtypes are kept, others computed in float32.
        image_size: the padded square encoder input side (`sam.image_size`).
        input_size: (h, w) of the resized image inside the padded input.
        original_size: (h, w) to return.
    Returns:
        (..., original_h, original_w) logits.

    Example:
        >>> import torch
        >>> from samadapt.sam_core.fast_attention import postprocess_masks_fast
        >>> postprocess_masks_fast(torch.zeros(1, 3, 64, 64), 256, (192, 256), (300, 400)).shape
        torch.Size([1, 3, 300, 400])
    """
    if low_res.ndim < 2:
        raise ValueError(f"low_res must be (..., h, w), got shape {tuple(low_res.shape)}")
    x = low_res if low_res.is_floating_point() else low_res.float()
    a_h, a_w = _post_maps(
        tuple(x.shape[-2:]), image_size, tuple(int(s) for s in input_size),
        tuple(int(s) for s in original_size), x.device, x.dtype,
    )
    # (A_h @ (x @ A_w^T)): the last pass writes the large output in place, with no transposed copy
    return a_h.left(a_w.right(x.contiguous()))


# ============================================================================ prompt -> mask helpers
def cache_dense_pe(sam: nn.Module, channels_last: bool = True) -> torch.Tensor:
    """Compute the prompt encoder's dense positional encoding once and serve it from a cache.

    `get_dense_pe()` depends only on fixed buffers and the embedding grid, but recomputes a
    h x w x C sin/cos grid on every call. This replaces it (on this instance only) by a cached
    tensor, recomputed when the buffer's device/dtype or the grid changes. Returns the tensor.
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
    """A channels-last copy of a B x C x h x w embedding: the decoder's image tokens
    (`flatten(2).transpose(1, 2)`) are then contiguous rows and its linear layers skip a copy."""
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


def _lora_linear_ok(m: nn.Module) -> bool:
    """A peft LoRA `Linear` whose output is `x W_eff^T + b` for a weight we can form: plain LoRA
    (no DoRA or other variant, no LoRA bias, no active dropout) on an `nn.Linear`."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # peft is a dependency; a decoder without it has no LoRA layers anyway
        return False
    if type(m) is not LoraLinear or type(m.get_base_layer()) is not nn.Linear or m.fan_in_fan_out:
        return False
    if m.disable_adapters and m.merged:  # peft would unmerge in forward
        return False
    if m.merged or m.disable_adapters:
        return True
    for a in m.active_adapters:
        if a not in m.lora_A:
            continue
        if m.use_dora.get(a) or a in m.lora_variant or m.lora_bias.get(a):
            return False
        drop = m.lora_dropout[a]
        if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and (not drop.training or drop.p == 0))):
            return False
    return True


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or _lora_linear_ok(m)


def _linear_wb(m: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) with `m(x) == x @ weight.T + bias` for a layer `_plain_linear` accepts: a
    LoRA layer's weight is its base weight plus each active, unmerged adapter's B A scaling (a fresh
    adapter's B is zero, so the weight is the base weight, bit for bit)."""
    if type(m) is nn.Linear:
        return m.weight, m.bias
    base = m.get_base_layer()
    w = base.weight
    if not (m.merged or m.disable_adapters):
        for a in m.active_adapters:
            if a in m.lora_A:
                w = w + m.get_delta_weight(a).to(w.dtype)
    return w, base.bias


def _linear_tensors(m: nn.Module) -> list:
    """The tensors `_linear_wb(m)` reads (for cache stamps)."""
    if type(m) is nn.Linear:
        return [m.weight, m.bias]
    base = m.get_base_layer()
    out = [base.weight, base.bias]
    for a in m.active_adapters:
        if a in m.lora_A:
            out += [m.lora_A[a].weight, m.lora_B[a].weight]
    return out


def fast_decoder_applies(sam: nn.Module) -> bool:
    """True when `fast_decode` takes its own path for `sam`'s decoder in use (else it runs `sam.decode`).

    The reassociated decoder reads weights directly: only for the core layout, with plain peft LoRA
    at most on its projections (DoRA, hooks, other activations, ... take the module path)."""
    from .common import LayerNorm2d
    from .mask_decoder import MaskDecoder
    from .transformer import Attention as DecoderAttention
    from .transformer import TwoWayAttentionBlock, TwoWayTransformer

    md = getattr(sam, "active_mask_decoder", None)
    tr = getattr(md, "transformer", None)
    if type(md) is not MaskDecoder or type(tr) is not TwoWayTransformer or getattr(sam, "prompt_encoder", None) is None:
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
        if not all(_plain_linear(getattr(a, n)) and getattr(a, n).bias is not None
                   for n in ("q_proj", "k_proj", "v_proj", "out_proj")):
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
    """masks = hyper @ output_upscaling(keys as b x C x h x w), without leaving the token layout.

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
        """The products for this 1 x C x h x w embedding and the no-mask dense prompt `dense`."""
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
    layout. A decoder whose layers were wrapped (adapters) or changed takes `sam.decode` as is.
    Pair with `prepare_image_embedding` (channels-last) and `cache_dense_pe(sam)`; pass a
    `DecoderImageCache` kept per image to reuse the prompt-independent products (used with one
    embedding and no mask prompt; ignored otherwise).
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
