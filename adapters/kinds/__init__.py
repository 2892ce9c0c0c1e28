"""The built-in adapter kinds, one file each; importing this package registers them.

`lora` (LoRA/DoRA through peft's layers), `sam_adapter` (explicit visual prompting), `bottleneck`,
`classes` (a K-class semantic head beside the prompts, `classes.py`), and the decoder policies `full`
and `lora` (`decoder.py`; `frozen` is no decoder part). A new kind
is one file calling `register_kind` once, or a third-party module behind the entry-point group
`samadapt.adapter_kinds`.

Example:
    >>> from samadapt import adapters
    >>> sorted(adapters.kinds.BUILTIN)
    ['bottleneck', 'classes', 'lora', 'sam_adapter']
"""
from . import bottleneck, classes, decoder, lora, sam_adapter  # noqa: F401  (each registers its kind)
from .decoder import DECODER_POLICIES  # noqa: F401

BUILTIN = ("bottleneck", "classes", "lora", "sam_adapter")  # the encoder kinds shipped here
