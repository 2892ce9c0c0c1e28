"""Fast paths that compute the same functions as the plain ones, with less time and memory.

* `attention`: the image encoder's attention without the N x N relative-position bias
  (`enable_fast_attention`: the factorised bias through SDPA, or the fused Triton kernel of
  `relpos_triton`).
* `decoder`: `fast_decode`, `Sam.decode` in a cheaper order, with a per-image `DecoderImageCache`
  and the `LinearView` seam through which wrapped linear layers (LoRA) stay on the fast path.
* `postprocess`: `postprocess_masks_fast`, SAM's mask post-processing as two cached matrix products.
* `cpu`: the encoder's route on a CPU (`choose_route`, `encoder_route`): bf16 autocast where the CPU
  has native bf16 matrix units, else fp32, both with the factorised attention.

Example:
    >>> from samadapt.sam_core import build_sam
    >>> from samadapt.sam_core.fast import enable_fast_attention, fast_attention_enabled
    >>> sam = build_sam("tiny")
    >>> enable_fast_attention(sam), fast_attention_enabled(sam)
    (4, True)
"""
from .attention import (
    KERNELS,
    FastSamAttention,
    enable_fast_attention,
    enable_fast_attention_default,
    fast_attention_enabled,
    fast_sam_attention,
    triton_sam_attention,
)
from .cpu import (
    ENV_PRECISION,
    MIN_BF16_IMAGE_SIZE,
    PRECISIONS,
    EncoderRoute,
    choose_route,
    cpu_features,
    encoder_batch,
    encoder_route,
    native_bf16,
    resolve_precision,
)
from .decoder import (
    DecoderImageCache,
    LinearView,
    cache_dense_pe,
    fast_decode,
    fast_decoder_applies,
    linear_views,
    prepare_image_embedding,
    register_linear_view,
    remove_linear_view,
)
from .postprocess import composed_postprocess_matrices, interp_matrix, postprocess_masks_fast

__all__ = [
    "KERNELS", "FastSamAttention", "enable_fast_attention", "enable_fast_attention_default", "fast_attention_enabled",
    "fast_sam_attention", "triton_sam_attention",
    "DecoderImageCache", "LinearView", "cache_dense_pe", "fast_decode", "fast_decoder_applies", "linear_views",
    "prepare_image_embedding", "register_linear_view", "remove_linear_view",
    "ENV_PRECISION", "MIN_BF16_IMAGE_SIZE", "PRECISIONS", "EncoderRoute", "choose_route", "cpu_features",
    "encoder_batch", "encoder_route", "native_bf16", "resolve_precision",
    "composed_postprocess_matrices", "interp_matrix", "postprocess_masks_fast",
]
