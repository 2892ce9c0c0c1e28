"""Adapter kinds for a frozen SAM core, their lifecycle, the adapter file format and the runtime bank.

Example:
    >>> from samadapt import adapters
    >>> from samadapt.sam_core import build_sam
    >>> sam = build_sam("tiny")
    >>> adapters.attach(sam, adapters.config("lora", r=4, targets=["qkv"]), name="cod", decoder="frozen")
    >>> adapters.activate(sam, None)   # the plain frozen core
"""
from .base import (
    DECODER_POLICIES, KINDS, AdapterError, IncompatibleAdapterError, KindSpec, activate, active, adapter_parameters,
    attach, attached, config, detach, info, merge, register_kind, set_trainable, trainable_summary, unmerge,
)
# kinds enrol themselves on import: one file per kind
from . import lora, sam_adapter, bottleneck  # noqa: E402,F401
from .io import FORMAT, AdapterFormatError, adapter_state_dict, inspect, load, save  # noqa: E402
from .bank import AdapterBank  # noqa: E402

__all__ = [
    "config", "attach", "activate", "active", "attached", "detach", "merge", "unmerge", "trainable_summary",
    "set_trainable", "adapter_parameters", "info", "save", "load", "inspect", "adapter_state_dict", "AdapterBank",
    "AdapterError", "AdapterFormatError", "IncompatibleAdapterError", "KINDS", "KindSpec", "register_kind",
    "DECODER_POLICIES", "FORMAT",
]

from .peft_linear_view import register as _register_linear_view  # noqa: E402
_register_linear_view()  # the fast decoder then reads plain peft LoRA layers by their weights
