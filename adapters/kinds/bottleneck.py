"""Bottleneck adapters (AdaptFormer / Medical-SAM-Adapter style): down -> GELU -> up, placed
sequentially after each block's attention (residual) and/or parallel to its MLP (scaled).
"""
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch
from torch import nn

from ..base import AdapterError, AdapterSlot, Injected, KindSpec, block_indices, module_tensors, register_kind
from ..mixed import add_rows
from ..parts import MAX_WIDTH, remove_from_slot

POSITIONS = ("attn", "mlp")


@dataclass
class BottleneckConfig:
    """Down-GELU-up adapters inside encoder blocks.

    `attn`: x_attn <- x_attn + up(gelu(down(x_attn))) on the attention output (sequential).
    `mlp`: block output gains `scale * up(gelu(down(h)))` where h is the MLP's input (parallel).

    Args:
        width: bottleneck width (default: `embed_dim // 4`, Med-SA's 0.25 ratio).
        positions: `attn` (sequential) and/or `mlp` (parallel).
        scale: scale of the parallel MLP adapter.
        blocks: encoder block indices (None: all).

    Raises:
        AdapterError: an unknown position or a non-positive width.

    Example:
        >>> from samadapt import adapters
        >>> adapters.config("bottleneck", width=32, positions=["mlp"], scale=0.1).width
        32
    """

    kind: ClassVar[str] = "bottleneck"
    width: Optional[int] = field(
        default=None, metadata={"help": "bottleneck width (default: embed_dim // 4 like Med-SA's 0.25 ratio)"})
    positions: List[str] = field(
        default_factory=lambda: ["attn", "mlp"], metadata={"help": "'attn' (sequential), 'mlp' (parallel)"})
    scale: float = field(default=0.5, metadata={"help": "scale of the parallel MLP adapter"})
    blocks: Optional[List[int]] = field(default=None, metadata={"help": "encoder block indices (None: all)"})

    def __post_init__(self):
        self.positions = list(self.positions)
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise AdapterError(f"bottleneck positions {bad or self.positions} not valid; "
                               f"choose from {list(POSITIONS)}")
        w = self.width
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WIDTH):
            raise AdapterError(f"bottleneck width={w!r} must be an integer from 1 to {MAX_WIDTH}")
        if self.blocks is not None:
            self.blocks = [int(b) for b in self.blocks]


class Bottleneck(nn.Module):
    """down -> GELU -> up, with `up` zero-initialised so a fresh adapter adds exactly zero."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = nn.GELU()
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`up(gelu(down(x)))`, computed in the adapter's dtype and returned in `x`'s."""
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


class BlockAdapters(nn.Module):
    """One adapter's bottlenecks in one block: `attn` (sequential) and/or `mlp` (parallel, scaled)."""

    def __init__(self, dim: int, width: int, positions: List[str], scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.attn = Bottleneck(dim, width) if "attn" in positions else None
        self.mlp = Bottleneck(dim, width) if "mlp" in positions else None


def _attn_hook(block, state):
    def hook(module, args, output):
        if state.route is not None:  # a mixed batch: each adapter on its rows (windowed: batch x windows)
            for name in state.route.names():
                a = block.samadapt_bottleneck[name] if name in block.samadapt_bottleneck else None
                rows = state.route.rows(name, output.shape[0]) if a is not None and a.attn is not None else None
                if rows is not None:
                    output = add_rows(output, rows, a.attn(output[rows]))
            return output
        for name in state.active:
            if name in block.samadapt_bottleneck and block.samadapt_bottleneck[name].attn is not None:
                return output + block.samadapt_bottleneck[name].attn(output)
        return output
    return hook


def _mlp_hook(block, state):
    def hook(module, args, output):
        if state.route is not None:
            for name in state.route.names():
                a = block.samadapt_bottleneck[name] if name in block.samadapt_bottleneck else None
                rows = state.route.rows(name, output.shape[0]) if a is not None and a.mlp is not None else None
                if rows is not None:
                    output = add_rows(output, rows, a.scale * a.mlp(args[0][rows]))
            return output
        for name in state.active:
            if name in block.samadapt_bottleneck and block.samadapt_bottleneck[name].mlp is not None:
                a = block.samadapt_bottleneck[name]
                return output + a.scale * a.mlp(args[0])
        return output
    return hook


def inject(sam: nn.Module, cfg: BottleneckConfig, name: str, state, init: bool = True) -> Injected:
    """Bottlenecks named `name` in the blocks `cfg` chooses (the kind's `inject`)."""
    blocks = sam.image_encoder.blocks
    idx = block_indices(cfg.blocks, len(blocks), "bottleneck")
    dim = sam.image_encoder.embed_dim
    width = cfg.width or max(1, dim // 4)
    tensors = {}
    for i in idx:
        blk = blocks[i]
        if "samadapt_bottleneck" not in blk._modules:
            blk.samadapt_bottleneck = AdapterSlot()
            # hooks are installed once per block and dispatch on the shared active list
            blk.samadapt_bottleneck.add_hooks(
                blk.attn.register_forward_hook(_attn_hook(blk, state)),
                blk.mlp.register_forward_hook(_mlp_hook(blk, state)),
            )
        ref = blk.norm1.weight
        mod = BlockAdapters(dim, width, cfg.positions, cfg.scale).to(ref.device)
        blk.samadapt_bottleneck[name] = mod
        tensors.update(module_tensors(f"image_encoder.blocks.{i}.samadapt_bottleneck.", mod))
    return Injected(tensors=tensors, handle=idx)


def remove(sam: nn.Module, name: str, state, handle) -> None:
    """Undo `inject`; a block left without bottlenecks loses its slot and hooks."""
    for i in handle:
        remove_from_slot(sam.image_encoder.blocks[i], "samadapt_bottleneck", name)


register_kind(KindSpec("bottleneck", BottleneckConfig, inject, remove))
