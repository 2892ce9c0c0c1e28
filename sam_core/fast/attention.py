"""The image encoder's attention without the N x N relative-position bias (same function).

timm's SAM `Attention` builds a (B*heads, N, N) decomposed rel-pos bias and hands 3-D q/k/v plus
that bias to `scaled_dot_product_attention`, so fused GPU kernels refuse it and a 64 x 64 global
block holds a B x heads x 4096 x 4096 tensor. The bias factorises:

    logits[i, j] = scale * q_i . k_j + q_i . Rh[row(i), row(j)] + q_i . Rw[col(i), col(j)]
                 = [scale * q_i | rel_h_i | rel_w_i] . [k_j | onehot(row(j)) | onehot(col(j))]

with rel_h = einsum(q, Rh) (N x kh) and rel_w = einsum(q, Rw) (N x kw). So appending rel_h/rel_w
to the scaled queries and one-hot row/column codes to the keys gives plain attention (no mask,
scale 1) with a head dim of head_dim + kh + kw, which flash / memory-efficient kernels accept.
No N x N tensor is built, everything runs in the input's dtype, autograd works, parameters and
module names are unchanged (a LoRA wrapper may wrap `attn.qkv` / `attn.proj` before or after).
The price is a wider q/k (head_dim + h + w: 64 -> 192 for a 64 x 64 global block), so a second
exact route keeps the head dim: `kernel="triton"`, samadapt's fused kernel
(`sam_core.fast.relpos_triton`: the bias added per key tile, forward and backward fused; the
fastest training route on an H100, benchmarks/RESULTS.md).

Opt-in: `SAMADAPT_FAST_ATTENTION=1` in the environment makes `enable_fast_attention_default()`
return True (for the builder to consult); nothing changes unless a caller enables a path.
"""
import os
import threading
from typing import Dict, Optional, Tuple

import torch
from timm.models.vision_transformer_sam import Attention as TimmSamAttention
from torch import nn
from torch.nn import functional as F

__all__ = [
    "KERNELS",
    "FastSamAttention",
    "enable_fast_attention",
    "enable_fast_attention_default",
    "fast_attention_enabled",
    "fast_sam_attention",
    "triton_sam_attention",
]

KERNELS = ("sdpa", "triton")  # the routes `enable_fast_attention` takes for `kernel` / `window_kernel`


def enable_fast_attention_default() -> bool:
    """The tiny opt-in the builder consults.

    Returns:
        True when the environment variable `SAMADAPT_FAST_ATTENTION` is 1/true/yes/on.
    """
    return os.environ.get("SAMADAPT_FAST_ATTENTION", "").strip().lower() in ("1", "true", "yes", "on")


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
    entries the oldest is dropped).
    """
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
    """Timm's `get_rel_pos` index (q_size x k_size, long) on `device`, cached."""
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
    first: it also checks that q's N tokens are the h x w grid.
    """
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
        q: B x heads x N x d queries (N = h * w, row-major), any float dtype (the compute dtype).
        k: keys, as `q`.
        v: values, as `q`.
        rel_pos_h: timm's row table ((2h-1) x d, or another length: interpolated as timm does).
        rel_pos_w: timm's column table ((2w-1) x d, or another length).
        hw: (h, w) of the token grid.
        dropout_p: attention dropout probability (training only).
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
    (`sam_core.fast.relpos_triton`): head dim unchanged, the bias added per key tile (one rel_h
    column, one rel_w tile), nothing N x N built, forward and backward fused; a custom op, so
    `torch.compile` keeps it in its graph. CUDA (or TRITON_INTERPRET=1).

    Args:
        q: B x heads x N x d queries (N = h * w, row-major), fp16/bf16/fp32.
        k: keys, as `q`.
        v: values, as `q`.
        rel_pos_h: timm's row table, as in `fast_sam_attention`.
        rel_pos_w: timm's column table, as in `fast_sam_attention`.
        hw: (h, w) of the token grid.
        scale: the logit scale applied to q . k.

    Returns:
        B x heads x N x d, in q's dtype (no dropout on this route).
    """
    from .relpos_triton import relpos_attention

    # the row term key row first: the kernel reads one key row's terms for a query block in one run
    rel_h_t, rel_w = _decomposed_terms(q, rel_pos_h, rel_pos_w, hw, rows_first=True)
    return relpos_attention(q, k, v, rel_h_t, rel_w, hw[1], scale)


def _use_triton(q: torch.Tensor, w: int, dropout_p: float) -> bool:
    if dropout_p:
        return False
    from .relpos_triton import triton_route_ok

    return triton_route_ok(q, w)


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
        # called as a module: a LoRA wrapper may replace it
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B x heads x N x d each
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.use_rel_pos and self._fast_kernel == "triton" and _use_triton(q, W, dropout_p):
            x = triton_sam_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (H, W), self.scale)
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
    `FastSamAttention`, a subclass), so state dicts, fingerprints and LoRA wrappers on `attn.qkv` /
    `attn.proj` are unaffected, before or after.

    Args:
        sam_or_encoder: a `Sam` (its `image_encoder` is used) or the timm encoder itself.
        enabled: False restores timm's own forward.
        pad_v: see `fast_sam_attention` (None: pad v on CPU only).
        kernel: the route of the global-attention blocks: `"sdpa"` (the factorised bias as extra
            q/k columns, any SDPA backend) or `"triton"` (samadapt's fused kernel,
            `sam_core.fast.relpos_triton`; CUDA). Off CUDA, with dropout, or where the kernel does
            not apply, a call takes the SDPA route.
        window_kernel: the same for the windowed blocks (None: as `kernel`).

    Returns:
        The number of attention modules switched.

    Raises:
        ValueError: `kernel` or `window_kernel` is not one of `KERNELS`.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> from samadapt.sam_core.fast import enable_fast_attention
        >>> sam = build_sam("tiny")
        >>> enable_fast_attention(sam)
        4
    """
    window_kernel = kernel if window_kernel is None else window_kernel
    for name, val in (("kernel", kernel), ("window_kernel", window_kernel)):
        if val not in KERNELS:
            raise ValueError(f"{name}={val!r} is not a fast attention route; use one of {list(KERNELS)}")
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
    """Whether `enable_fast_attention` switched this encoder.

    Args:
        sam_or_encoder: a `Sam` (its `image_encoder` is used) or the timm encoder itself.

    Returns:
        True when every SAM attention module of the encoder takes the factorised path.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> from samadapt.sam_core.fast import enable_fast_attention, fast_attention_enabled
        >>> sam = build_sam("tiny")
        >>> fast_attention_enabled(sam), enable_fast_attention(sam), fast_attention_enabled(sam)
        (False, 4, True)
    """
    mods = [m for m in _encoder_of(sam_or_encoder).modules() if isinstance(m, TimmSamAttention)]
    return bool(mods) and all(type(m) is FastSamAttention for m in mods)


