"""Decoder policies, chosen with `attach(..., decoder=...)`: `frozen` (no decoder part: the core's
decoder, untouched), `full` (a trainable copy of the mask decoder, put in use with the public
`Sam.use_decoder` when its adapter is activated) and `lora` (LoRA on the decoder's attention
projections, through the same peft layers as the encoder's `lora` kind).

Both are registered kinds with `part="decoder"`; the lifecycle in `base` treats them like any other.

Example:
    >>> from samadapt import adapters
    >>> from samadapt.sam_core import build_sam
    >>> sam = build_sam("tiny")
    >>> adapters.attach(sam, [], name="d", decoder="full")
    >>> sam.active_mask_decoder is sam.mask_decoder
    False
    >>> adapters.activate(sam, None); sam.active_mask_decoder is sam.mask_decoder
    True
"""
import copy
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from torch import nn

from ..base import AdapterError, AdapterSlot, Injected, KindSpec, module_tensors, register_kind
from ..parts import MAX_WIDTH
from .lora import add_lora, peft_config, remove_lora

# the built-in policies (public API); `adapters.DECODER_KINDS` also lists third-party ones
DECODER_POLICIES = ("frozen", "full", "lora")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
SLOT = "adapter_decoders"  # the `Sam` submodule holding the full copies, keyed by adapter name


@dataclass
class FullDecoderConfig:
    """`decoder="full"`: the adapter carries its own trainable copy of the whole mask decoder.

    Example:
        >>> FullDecoderConfig().kind
        'full'
    """

    kind: ClassVar[str] = "full"


@dataclass
class DecoderLoraConfig:
    """`decoder="lora"`: LoRA on the mask decoder's attention projections (q, k, v, out).

    Args:
        r: LoRA rank (`attach`'s `decoder_r`); alpha equals `r`.

    Raises:
        AdapterError: `r` is not a positive integer.

    Example:
        >>> DecoderLoraConfig(r=8).r
        8
    """

    kind: ClassVar[str] = "lora"
    r: int = field(default=4, metadata={"help": "rank of the decoder LoRA (attach's decoder_r); alpha = r"})

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= MAX_WIDTH:
            raise AdapterError(f"decoder_r={self.r!r} must be an integer from 1 to {MAX_WIDTH}, e.g. 4")


# ---------------------------------------------------------------------------- full
def plain_copy(decoder: nn.Module) -> nn.Module:
    """A copy of the frozen decoder without peft wrappers (other adapters' decoder LoRA, or the
    empty wrappers left after detaching it): the copy holds the core decoder's layers only.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    dec = copy.deepcopy(decoder)
    for path, mod in list(dec.named_modules()):
        if isinstance(mod, BaseTunerLayer):
            parent, _, attr = path.rpartition(".")
            setattr(dec.get_submodule(parent) if parent else dec, attr, mod.get_base_layer())
    return dec


def inject_full(sam: nn.Module, cfg: FullDecoderConfig, name: str, state, init: bool = True) -> Injected:
    """Register a plain copy of the mask decoder as `sam.adapter_decoders[name]`."""
    if SLOT not in sam._modules:
        sam.add_module(SLOT, AdapterSlot())
    dec = plain_copy(sam.mask_decoder)
    getattr(sam, SLOT)[name] = dec
    return Injected(tensors=module_tensors("mask_decoder.", dec))


def remove_full(sam: nn.Module, name: str, state, handle=None) -> None:
    """Drop adapter `name`'s decoder copy (and stop using it if it is in use)."""
    slot = sam._modules.get(SLOT)
    if slot is not None and name in slot:
        if sam.active_mask_decoder is slot[name]:
            sam.use_decoder(None)
        del slot[name]


def use_full(sam: nn.Module, name: Optional[str]) -> None:
    """On activation: run the adapter's decoder copy if it has one, else the core's decoder."""
    slot = sam._modules.get(SLOT)
    sam.use_decoder(slot[name] if slot is not None and name is not None and name in slot else None)


def owns_full(key: str) -> bool:
    """A full copy's tensors are the mask decoder's own names (no LoRA tensor among them)."""
    return key.startswith("mask_decoder.") and ".lora_" not in key


# ---------------------------------------------------------------------------- lora
def decoder_targets(sam: nn.Module) -> List[str]:
    """Module paths of the mask decoder's attention projections (q, k, v, out) in model order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, wrapped = [], []
    for path, mod in sam.mask_decoder.transformer.named_modules():
        if any(path.startswith(w + ".") for w in wrapped):  # inside a LoRA layer: its own A/B/base modules
            continue
        if isinstance(mod, BaseTunerLayer):
            wrapped.append(path)
        if path.rpartition(".")[2] in PROJECTIONS and isinstance(mod, (nn.Linear, BaseTunerLayer)):
            out.append(f"mask_decoder.transformer.{path}")
    return out


def inject_lora(sam: nn.Module, cfg: DecoderLoraConfig, name: str, state, init: bool = True) -> Injected:
    """LoRA `name` (rank `cfg.r`, alpha `cfg.r`) on every attention projection of the decoder."""
    return add_lora(sam, decoder_targets(sam), name, peft_config(cfg.r, cfg.r, init=init))


def remove_lora_part(sam: nn.Module, name: str, state, handle) -> None:
    """Undo `inject_lora`."""
    remove_lora(sam, name, handle)


def owns_lora(key: str) -> bool:
    """The decoder LoRA's tensors: peft's LoRA names under `mask_decoder.`."""
    return key.startswith("mask_decoder.") and ".lora_" in key


FULL = register_kind(KindSpec("full", FullDecoderConfig, inject_full, remove_full, part="decoder", owns=owns_full,
                              label="decoder_full", on_activate=use_full))
LORA = register_kind(KindSpec("lora", DecoderLoraConfig, inject_lora, remove_lora_part, mergeable=True,
                              part="decoder", owns=owns_lora, label="decoder_lora"))
