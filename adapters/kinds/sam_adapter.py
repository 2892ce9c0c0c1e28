"""SAM-Adapter: explicit visual prompting (EVP). Two task-specific features -- the image's
high-frequency component (FFT with the low frequencies masked out) and the frozen patch
embedding -- are mapped to a narrow width, summed, passed through a per-block MLP and a shared
up-projection, and the result is added to the tokens entering each encoder block.
"""
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch
from torch import nn

from ..base import AdapterError, AdapterSlot, Injected, KindSpec, block_indices, module_tensors, register_kind
from ..mixed import add_rows
from ..parts import MAX_WIDTH, remove_from_slot


@dataclass
class SamAdapterConfig:
    """Explicit visual prompting for every (or chosen) encoder block.

    Args:
        scale_factor: bottleneck width = `embed_dim // scale_factor` (paper: 32).
        width: explicit bottleneck width (overrides `scale_factor`).
        freq_ratio: area fraction of low frequencies masked out of the FFT, in [0, 1).
        blocks: blocks receiving a prompt (None: all).
        handcrafted: use the high-frequency image feature.
        embedding: use the patch-embedding feature.

    Raises:
        AdapterError: a setting out of range, or both features off.

    Example:
        >>> from samadapt import adapters
        >>> adapters.config("sam_adapter", scale_factor=32, freq_ratio=0.25).freq_ratio
        0.25
    """

    kind: ClassVar[str] = "sam_adapter"
    scale_factor: int = field(
        default=32, metadata={"help": "bottleneck width = embed_dim // scale_factor (paper: 32)"})
    width: Optional[int] = field(default=None, metadata={"help": "explicit bottleneck width (overrides scale_factor)"})
    freq_ratio: float = field(
        default=0.25, metadata={"help": "area fraction of low frequencies masked out of the FFT"})
    blocks: Optional[List[int]] = field(default=None, metadata={"help": "blocks receiving a prompt (None: all)"})
    handcrafted: bool = field(default=True, metadata={"help": "use the high-frequency image feature"})
    embedding: bool = field(default=True, metadata={"help": "use the patch-embedding feature"})

    def __post_init__(self):
        if not 0.0 <= self.freq_ratio < 1.0:
            raise AdapterError(f"sam_adapter freq_ratio={self.freq_ratio} must be in [0, 1), e.g. 0.25")
        if not (self.handcrafted or self.embedding):
            raise AdapterError("sam_adapter needs handcrafted=True or embedding=True (both off leaves no input)")
        if isinstance(self.scale_factor, bool) or not isinstance(self.scale_factor, int) or self.scale_factor < 1:
            raise AdapterError(f"sam_adapter scale_factor={self.scale_factor!r} must be a positive integer")
        w = self.width
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WIDTH):
            raise AdapterError(f"sam_adapter width={w!r} must be an integer from 1 to {MAX_WIDTH}")
        if self.blocks is not None:
            self.blocks = [int(b) for b in self.blocks]


def high_frequency(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """|IFFT(FFT(x) with a centred square of `ratio` of the spectrum's area zeroed)|, per channel."""
    h, w = x.shape[-2:]
    spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    half = int((h * w * ratio) ** 0.5 // 2)
    keep = torch.ones(h, w, device=x.device)
    keep[h // 2 - half: h // 2 + half, w // 2 - half: w // 2 + half] = 0
    spec = spec * keep
    out = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1)), norm="forward").real
    return out.abs()


class PromptGenerator(nn.Module):
    """One adapter's prompt generator: feature maps, a small MLP per prompted block, a shared
    zero-initialised up-projection.
    """

    def __init__(self, dim: int, width: int, patch: int, n_blocks: int, cfg: SamAdapterConfig) -> None:
        super().__init__()
        self.freq_ratio = cfg.freq_ratio
        self.patch = patch
        self.handcrafted = nn.Conv2d(3, width, kernel_size=patch, stride=patch) if cfg.handcrafted else None
        self.embedding = nn.Linear(dim, width) if cfg.embedding else None
        self.block_mlps = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(n_blocks))
        self.shared_mlp = nn.Linear(width, dim)
        # zero up-projection: a fresh adapter adds exactly nothing
        nn.init.zeros_(self.shared_mlp.weight)
        nn.init.zeros_(self.shared_mlp.bias)

    def features(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """image: B x 3 x S x S (normalised encoder input); tokens: B x h x w x C patch embedding."""
        f = 0
        dtype = self.shared_mlp.weight.dtype
        if self.handcrafted is not None:
            hf = high_frequency(image, self.freq_ratio).to(dtype)
            f = f + self.handcrafted(hf).permute(0, 2, 3, 1)
        if self.embedding is not None:
            f = f + self.embedding(tokens.to(dtype))
        return f

    def prompt(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        """The prompt added to the tokens entering the `i`-th prompted block."""
        return self.shared_mlp(self.block_mlps[i](feats))


class _Context:
    """Per-forward scratch: the features computed at the patch embedding, read by block hooks."""

    def __init__(self):
        self.image = None
        self.feats = {}


def inject(sam: nn.Module, cfg: SamAdapterConfig, name: str, state, init: bool = True) -> Injected:
    """A prompt generator named `name` (the kind's `inject`); the hooks are installed once per encoder."""
    enc = sam.image_encoder
    n = len(enc.blocks)
    idx = block_indices(cfg.blocks, n, "sam_adapter")
    dim = enc.embed_dim
    width = cfg.width or max(1, dim // cfg.scale_factor)
    patch = enc.patch_embed.proj.kernel_size[0]
    if "samadapt_sam_adapter" not in enc._modules:
        enc.samadapt_sam_adapter = AdapterSlot()
        ctx = _Context()  # shared by the hooks' closures only

        def on_patch_embed_input(module, args):
            ctx.image = args[0]
            ctx.feats = {}

        def on_patch_embed_output(module, args, output):
            if state.route is not None:  # a mixed batch: each generator's features from its own items
                for nm in state.route.names():
                    if nm in enc.samadapt_sam_adapter:
                        rows = state.route.rows(nm, output.shape[0])
                        ctx.feats[nm] = enc.samadapt_sam_adapter[nm].features(ctx.image[rows], output[rows])
                ctx.image = None
                return None
            for nm in state.active:
                if nm in enc.samadapt_sam_adapter:
                    ctx.feats[nm] = enc.samadapt_sam_adapter[nm].features(ctx.image, output)
            ctx.image = None
            return None

        def block_hook(i):
            def pre(module, args):
                if state.route is not None:
                    x, slot = args[0], enc.samadapt_sam_adapter
                    for nm in state.route.names():
                        if nm in slot and nm in ctx.feats and i in slot[nm].block_index:
                            gen = slot[nm]
                            x = add_rows(x, state.route.rows(nm, x.shape[0]), gen.prompt(gen.block_index[i],
                                                                                            ctx.feats[nm]))
                    return (x,) + tuple(args[1:])
                for nm in state.active:
                    slot = enc.samadapt_sam_adapter
                    if nm in slot and nm in ctx.feats and i in slot[nm].block_index:
                        x = args[0]
                        gen = slot[nm]
                        return (x + gen.prompt(gen.block_index[i], ctx.feats[nm]).to(x.dtype),) + tuple(args[1:])
                return None
            return pre

        enc.samadapt_sam_adapter.add_hooks(
            enc.patch_embed.register_forward_pre_hook(on_patch_embed_input),
            enc.patch_embed.register_forward_hook(on_patch_embed_output),
            *[blk.register_forward_pre_hook(block_hook(i)) for i, blk in enumerate(enc.blocks)],
        )
    gen = PromptGenerator(dim, width, patch, len(idx), cfg).to(enc.patch_embed.proj.weight.device)
    gen.block_index = {b: j for j, b in enumerate(idx)}
    enc.samadapt_sam_adapter[name] = gen
    return Injected(tensors=module_tensors("image_encoder.samadapt_sam_adapter.", gen))


def remove(sam: nn.Module, name: str, state, handle=None) -> None:
    """Undo `inject`; the last generator out takes the slot and its hooks with it."""
    remove_from_slot(sam.image_encoder, "samadapt_sam_adapter", name)


register_kind(KindSpec("sam_adapter", SamAdapterConfig, inject, remove))
