"""The model a recipe trains: the frozen SAM core it names, and the adapters attached to it.

What other modules import: `TINY_CORE` (the committed pretrained tiny core), `load_base` (the CLI's
`--base` or that tiny core), `build_core` (the core a recipe names), `adapt_core` (the recipe's
adapters, precision, attention route and compilation on that core), `set_encoder_attention` and
`TrainStep` (the whole training forward as one module call).
"""
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from samadapt import adapters
from samadapt.sam_core import build_sam, load_sam
from samadapt.sam_core.checkpoint import CheckpointError

from .data.prompts import append_correction_clicks
from .errors import UserError

WEIGHTS_DIR = Path(__file__).parent / "weights"
TINY_CORE = WEIGHTS_DIR / "tiny_generic.safetensors"


def load_base(base: Optional[str] = None, image_size: Optional[int] = None) -> nn.Module:
    """Load a SAM checkpoint, or the committed pretrained tiny core when none is given (the CLI default).

    Args:
        base: a checkpoint path (Meta `.pth`, `.safetensors`, a Hugging Face SamModel folder), or None.
        image_size: the encoder's input side (None: the checkpoint's own).

    Returns:
        The frozen core.

    Raises:
        CheckpointError: no `base` was given and the tiny core is missing.

    Example:
        >>> from samadapt.recipes.model import load_base
        >>> load_base().arch
        'tiny'
    """
    if base:
        return load_sam(base, image_size=image_size)
    if not TINY_CORE.is_file():
        raise CheckpointError(f"no --base given and the pretrained tiny core {TINY_CORE} is missing; pass --base CKPT")
    return load_sam(TINY_CORE, image_size=image_size)


class RandomBaseError(UserError, ValueError):
    """A full-size core would be built with random weights and `allow_random_base` was not given."""


def build_core(cfg: Dict[str, Any], base: Optional[str] = None, allow_random_base: bool = False) -> nn.Module:
    """Build the frozen core a validated recipe names (`--base` overrides `base.checkpoint`).

    Args:
        cfg: a validated recipe (`samadapt.recipes.config.load_recipe`).
        base: the CLI's `--base` checkpoint, or None.
        allow_random_base: build a full-size core (`vit_b`/`vit_l`/`vit_h`) with random weights when no
            checkpoint is given; without it that is a `RandomBaseError` (adapting noise is never what
            was meant). The tiny core may always be random (`base.pretrained_tiny=false`: tests).

    Returns:
        The core: loaded from the checkpoint, the pretrained tiny core, or randomly initialised.

    Raises:
        CheckpointError: the checkpoint holds another arch than the recipe's, or the tiny core is missing.
        RandomBaseError: a full-size core without a checkpoint and without `allow_random_base`.

    Example:
        >>> from samadapt.recipes.config import load_recipe
        >>> build_core(load_recipe("demo", ["base.pretrained_tiny=false", "base.image_size=64"])).image_size
        64
    """
    b = cfg["base"]
    ckpt = base or b["checkpoint"]
    if ckpt:
        sam = load_sam(ckpt, arch=b["arch"] if base is None and b["checkpoint"] is None else None,
                       image_size=b["image_size"])
        if b["arch"] and sam.arch != b["arch"] and not base:
            raise CheckpointError(f"{ckpt} holds a {sam.arch} model but the recipe says base.arch={b['arch']}")
        if base and b["arch"] and sam.arch != b["arch"]:
            raise CheckpointError(
                f"{ckpt} holds a {sam.arch} model but the recipe is for {b['arch']}; pass a {b['arch']} checkpoint "
                f"or --set base.arch={sam.arch}"
            )
        return sam
    if b["arch"] == "tiny" and b["pretrained_tiny"]:
        if not TINY_CORE.is_file():
            raise CheckpointError(
                f"the pretrained tiny core {TINY_CORE} is missing; reinstall samadapt or set "
                "base.pretrained_tiny=false")
        return load_sam(TINY_CORE, image_size=b["image_size"])
    if b["arch"] != "tiny" and not allow_random_base:
        raise RandomBaseError(
            f"recipe {cfg.get('name')!r} uses a {b['arch']} core and no checkpoint was given, so its weights would "
            f"be random; pass --base CKPT (e.g. Meta's sam_{b['arch']}_*.pth), --set base.arch=tiny, or "
            "--allow-random-base to train on random weights on purpose")
    return build_sam(b["arch"], image_size=b["image_size"])


def adapt_core(sam: nn.Module, cfg: Dict[str, Any], device: torch.device, mixed_precision: str) -> str:
    """Make `sam` what the recipe trains: adapters attached (or the whole core trainable), the frozen
    part in bf16 on GPU, gradient checkpointing, the attention route and compilation.

    Args:
        sam: the core from `build_core`.
        cfg: the validated recipe.
        device: where training runs (the frozen core is stored in bf16 on CUDA only).
        mixed_precision: the precision the run actually uses (`no`, `bf16`, `fp16`).

    Returns:
        The attention route taken (see `set_encoder_attention`).

    Example:
        >>> import torch
        >>> from samadapt.recipes.config import load_recipe
        >>> cfg = load_recipe("demo", ["base.pretrained_tiny=false", "base.image_size=64"])
        >>> sam = build_core(cfg)
        >>> adapt_core(sam, cfg, torch.device("cpu"), "no")
        'as built'
        >>> adapters.attached(sam)
        ['camo-demo']
    """
    t = cfg["train"]
    if t["full_core"]:
        for p in sam.parameters():
            p.requires_grad_(True)
    else:
        kinds = [adapters.config(k["kind"], **{kk: vv for kk, vv in k.items() if kk != "kind"})
                 for k in cfg["adapter"]["kinds"]]
        adapters.attach(sam, kinds, name=cfg["adapter"]["name"], decoder=cfg["adapter"]["decoder"],
                        decoder_r=cfg["adapter"]["decoder_r"])
        if device.type == "cuda" and mixed_precision == "bf16":
            # the frozen core lives in bf16; adapters keep fp32 master weights
            for p in sam.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    if t["grad_checkpointing"]:
        sam.image_encoder.set_grad_checkpointing(True)
    route = set_encoder_attention(sam, t["attention"], device, bf16=mixed_precision == "bf16")
    if t["compile"]:
        # the encoder's forward only: the decoder's prompt-dependent shapes would recompile often
        sam.image_encoder.forward_features = torch.compile(sam.image_encoder.forward_features)
    return route


def set_encoder_attention(sam: nn.Module, attention: str, device: torch.device, bf16: bool = True) -> str:
    """Route the image encoder's attention (`train.attention`); every route computes the same function
    (tests/test_fast_paths.py, tests/test_relpos_attention.py).

    * `timm`: timm's own path (an N x N bias for every global block);
    * `sdpa`: the factorised bias through fused SDPA kernels;
    * `triton`: samadapt's fused Triton kernel for the global blocks, SDPA for the windows (the
      fastest training on an H100: benchmarks/RESULTS.md); off CUDA the SDPA route;
    * `auto`: on CUDA `triton` for a bf16 core on an Ampere or newer GPU (the case measured, on
      an H100), `sdpa` otherwise; elsewhere the encoder is left as built (CPU training gains nothing).

    Args:
        sam: the core.
        attention: `auto`, `timm`, `sdpa` or `triton`.
        device: the training device.
        bf16: whether the core runs in bf16.

    Returns:
        The route taken (`as built` when `auto` leaves the encoder alone).

    Example:
        >>> import torch
        >>> from samadapt.sam_core import build_sam
        >>> set_encoder_attention(build_sam("tiny", image_size=64), "sdpa", torch.device("cpu"))
        'sdpa'
    """
    from samadapt.sam_core.fast import enable_fast_attention

    if attention == "auto":
        if device.type != "cuda":
            return "as built"
        attention = "triton" if bf16 and torch.cuda.get_device_capability(device) >= (8, 0) else "sdpa"
    if attention == "timm":
        enable_fast_attention(sam, enabled=False)
    elif attention == "sdpa":
        enable_fast_attention(sam, kernel="sdpa")
    else:
        enable_fast_attention(sam, kernel="triton", window_kernel="sdpa")
    return attention


class TrainStep(nn.Module):
    """The whole training forward (image encoding + decoding + correction rounds) as one `forward`
    call, so DDP/FSDP see one forward per backward and synchronise gradients.

    Args:
        sam: the core with its adapters.

    Example:
        >>> import torch
        >>> from samadapt.sam_core import build_sam
        >>> outs = TrainStep(build_sam("tiny", image_size=64))(torch.zeros(1, 3, 64, 64))
        >>> len(outs), tuple(outs[0][0].shape)
        (1, (1, 1, 16, 16))
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, images, point_coords=None, point_labels=None, boxes=None, gt=None,
                rounds: int = 0, multimask: bool = False, click_seed: int = 0):
        """Encode `images` once and decode `rounds + 1` times; returns a list of (low-res logits, IoU)."""
        sam = self.sam
        emb = sam.encode_image(sam.preprocess(images))
        outputs = []
        mask_input = None
        rng = np.random.default_rng(click_seed)
        for r in range(rounds + 1):
            low, iou = sam.decode(emb, point_coords, point_labels, boxes, mask_input,
                                  multimask_output=multimask and r == 0)
            outputs.append((low, iou))
            if r < rounds:
                # SAM's iterative training: a click on the previous prediction's error, previous logits as mask input
                best = low[:, :1]
                pred = F.interpolate(best.detach().float(), size=images.shape[-2:], mode="bilinear",
                                     align_corners=False) > 0
                point_coords, point_labels = append_correction_clicks(point_coords, point_labels, pred, gt > 0.5, rng)
                point_coords = point_coords.to(images.device)
                point_labels = point_labels.to(images.device)
                mask_input = best.detach()
        return outputs
