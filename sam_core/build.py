"""Builders: one small spec per size feeding one constructor."""
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Tuple

import timm
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

PATCH_SIZE = 16


@dataclass(frozen=True)
class SamArch:
    """The numbers that tell SAM sizes apart."""

    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]
    window_size: int = 14
    image_size: int = 1024  # native (pretraining) input size
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    mask_in_chans: int = 16
    iou_head_hidden_dim: int = 256


ARCHS: Dict[str, SamArch] = {
    "vit_b": SamArch("samvit_base_patch16", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArch("samvit_large_patch16", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArch("samvit_huge_patch16", 1280, 32, 16, (7, 15, 23, 31)),
    # a few-MB model for tests and the demo; the same code path as the real sizes
    "tiny": SamArch(
        "samvit_base_patch16", 96, 4, 3, (1, 3), window_size=8, image_size=256,
        prompt_embed_dim=64, decoder_mlp_dim=256, decoder_heads=4, mask_in_chans=16, iou_head_hidden_dim=64,
    ),
}


def _check_image_size(arch: str, image_size: int) -> int:
    if not isinstance(image_size, int) or image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(
            f"image_size={image_size!r} for {arch} is not a positive multiple of {PATCH_SIZE}; "
            f"use e.g. 1024 or 512"
        )
    return image_size


def build_sam(arch: str, image_size: Optional[int] = None, spec: Optional[SamArch] = None) -> Sam:
    """Build a randomly initialised SAM of a named size.

    Args:
        arch: one of `vit_b`, `vit_l`, `vit_h`, `tiny`.
        image_size: encoder input side; defaults to the arch's native size (1024; 256 for `tiny`).
            Smaller sizes (e.g. 512) train about 4x cheaper.
        spec: an explicit `SamArch` (advanced; overrides the table).

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> sam.image_size, sam.embedding_size
        (256, (16, 16))
    """
    if spec is None:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
        spec = ARCHS[arch]
    image_size = _check_image_size(arch, spec.image_size if image_size is None else image_size)
    grid = image_size // PATCH_SIZE
    encoder = timm.create_model(
        spec.timm_name,
        pretrained=False,
        num_classes=0,
        img_size=image_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        global_attn_indexes=list(spec.global_attn_indexes),
        window_size=spec.window_size,
        neck_chans=spec.prompt_embed_dim,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=spec.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=spec.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_embed_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_heads,
        ),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    sam = Sam(encoder, prompt_encoder, mask_decoder, image_size=image_size, arch=arch)
    sam.spec = spec
    from .fast import enable_fast_attention, enable_fast_attention_default

    if enable_fast_attention_default():
        # SAMADAPT_FAST_ATTENTION=1: factorised relative-position attention (same function, fused SDPA kernels)
        enable_fast_attention(sam)
    return sam.eval()
