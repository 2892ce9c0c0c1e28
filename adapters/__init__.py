"""Adapter kinds for a frozen SAM core, their lifecycle, the adapter file format and the runtime bank.

Example:
    >>> from samadapt import adapters
    >>> from samadapt.sam_core import build_sam
    >>> sam = build_sam("tiny")
    >>> adapters.attach(sam, adapters.config("lora", r=4, targets=["qkv"]), name="cod", decoder="frozen")
    >>> adapters.activate(sam, None)   # the plain frozen core
"""
# built-in kinds enrol themselves on import (one file per kind); plugins are read on first lookup
from . import kinds  # noqa: E402,F401
from .bank import AdapterBank  # noqa: E402
from .base import (  # noqa: E402
    AdapterSlot,
    IncompatibleAdapterError,
    Injected,
    activate,
    active,
    adapter_parameters,
    attach,
    attached,
    block_indices,
    detach,
    info,
    is_valid_name,
    merge,
    module_tensors,
    set_trainable,
    trainable_summary,
    unmerge,
)
from .io import FORMAT, AdapterFormatError, adapter_state_dict, inspect, load, save  # noqa: E402
from .kinds import DECODER_POLICIES  # noqa: E402
from .kinds.classes import has_class_head, semantic_logits  # noqa: E402
from .mixed import RowRoute, route  # noqa: E402
from .parts import remove_from_slot  # noqa: E402
from .registry import (
    DECODER_KINDS,
    ENTRY_POINT_GROUP,
    KINDS,
    AdapterError,
    KindSpec,
    config,
    load_plugins,
    register_kind,
    unregister_kind,
)

__all__ = [
    "is_valid_name",
    "config", "attach", "activate", "active", "attached", "detach", "merge", "unmerge", "trainable_summary",
    "set_trainable", "adapter_parameters", "info", "save", "load", "inspect", "adapter_state_dict", "AdapterBank",
    "semantic_logits", "has_class_head",
    "AdapterError", "AdapterFormatError", "IncompatibleAdapterError", "KINDS", "KindSpec", "register_kind",
    "DECODER_POLICIES", "DECODER_KINDS", "FORMAT", "ENTRY_POINT_GROUP", "load_plugins", "unregister_kind",
    # what a third-party kind builds on
    "Injected", "AdapterSlot", "block_indices", "module_tensors", "remove_from_slot",
    # mixed-adapter encoder batches
    "route", "RowRoute",
]

from .peft_linear_view import register as _register_linear_view  # noqa: E402

_register_linear_view()  # the fast decoder then reads plain peft LoRA layers by their weights
