"""A third-party adapter kind, outside the samadapt package: a learnable per-channel scale and shift
on chosen encoder blocks' outputs, `x * (1 + gamma) + beta`, zero-initialised (a fresh one is a no-op).

It uses only samadapt's public API and registers itself on import; tests/test_adapter_kinds_plugin.py
installs it through the `samadapt.adapter_kinds` entry point.
"""
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch
from torch import nn

from samadapt import adapters


@dataclass
class ScaleConfig:
    """Per-channel scale/shift on the outputs of `blocks` (None: all)."""

    kind: ClassVar[str] = "scale"
    blocks: Optional[List[int]] = field(default=None, metadata={"help": "encoder block indices (None: all)"})

    def __post_init__(self):
        if self.blocks is not None:
            self.blocks = [int(b) for b in self.blocks]


class ScaleShift(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.gamma.to(x.dtype)) + self.beta.to(x.dtype)


def _hook(slot, state):
    def hook(module, args, output):
        for name in state.active:
            if name in slot:
                return slot[name](output)
        return output
    return hook


def inject(sam, cfg, name, state, init=True):
    blocks = sam.image_encoder.blocks
    idx = adapters.block_indices(cfg.blocks, len(blocks), "scale")
    tensors = {}
    for i in idx:
        blk = blocks[i]
        if "samadapt_scale" not in blk._modules:
            slot = adapters.AdapterSlot()
            blk.add_module("samadapt_scale", slot)
            slot.add_hooks(blk.register_forward_hook(_hook(slot, state)))
        mod = ScaleShift(sam.image_encoder.embed_dim).to(blk.norm1.weight.device)
        blk.samadapt_scale[name] = mod
        tensors.update(adapters.module_tensors(f"image_encoder.blocks.{i}.samadapt_scale.", mod))
    return adapters.Injected(tensors=tensors, handle=idx)


def remove(sam, name, state, handle):
    for i in handle:
        adapters.remove_from_slot(sam.image_encoder.blocks[i], "samadapt_scale", name)


SPEC = adapters.register_kind(adapters.KindSpec("scale", ScaleConfig, inject, remove))
