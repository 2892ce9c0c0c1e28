"""Reference models from PyPI (test dependencies only), built with the same numbers as ours."""
from functools import partial

import torch

from samadapt.sam_core import ARCHS


def build_meta_sam(arch: str, image_size: int = None, seed: int = 0):
    """segment_anything's Sam with random weights (non-zero position tables) for an arch of ours."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    spec = ARCHS[arch]
    image_size = image_size or spec.image_size
    grid = image_size // 16
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth, embed_dim=spec.embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=spec.num_heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(spec.global_attn_indexes),
            window_size=spec.window_size, out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size), mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=spec.prompt_embed_dim,
                                          mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_heads),
            transformer_dim=spec.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
    )
    randomize_(sam)
    return sam.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Give every parameter (zero-initialised tables and norms too) a random value, so that parity
    tests exercise every weight. LayerNorm weights stay near 1 to keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        if p.ndim == 1 and ("norm" in name or name.endswith(".weight") and "neck.1" in name or "neck.3" in name):
            p.copy_(1.0 + noise if name.endswith("weight") else noise)
        elif "rel_pos" in name or "pos_embed" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        else:
            p.add_(noise)
    return model
