"""Building blocks for adapter kinds: the slot that holds a kind's modules, block selection and the
tensor index of a module. Every kind file (ours and third-party) builds its `Injected` from these.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .registry import AdapterError


class AdapterSlot(nn.ModuleDict):
    """Holds one kind's modules at one place in the model, keyed by adapter name. Canonical
    tensor names drop the key, so a file loads under any name.

    The slot also keeps the forward hooks its kind installed for it (`add_hooks`), so the kind can
    take them out with the slot (`remove_hooks`) without storing anything on the host module.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> host, calls = nn.Linear(2, 2), []
        >>> slot = AdapterSlot()
        >>> slot.add_hooks(host.register_forward_hook(lambda m, a, out: calls.append(1)))
        >>> _ = host(torch.zeros(1, 2)); slot.remove_hooks(); _ = host(torch.zeros(1, 2)); len(calls)
        1
    """

    def __init__(self) -> None:
        super().__init__()
        # a leading underscore: adapter names start with a letter, so no key can shadow it
        self._hooks: List[Any] = []

    def add_hooks(self, *handles: Any) -> None:
        """Keep hook handles (`register_forward_hook` / `register_forward_pre_hook` results)."""
        self._hooks.extend(handles)

    def remove_hooks(self) -> None:
        """Remove every kept hook from the module it was registered on."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def remove_from_slot(host: nn.Module, attr: str, name: str) -> None:
    """Take adapter `name` out of the `AdapterSlot` at `host.<attr>`; the last one out removes the
    slot and its hooks with it (a kind's `remove` for modules kept in a slot).

    Example:
        >>> from torch import nn
        >>> host = nn.Module(); host.add_module("samadapt_x", AdapterSlot())
        >>> host.samadapt_x["a"] = nn.Linear(1, 1)
        >>> remove_from_slot(host, "samadapt_x", "a"); "samadapt_x" in host._modules
        False
    """
    slot = host._modules.get(attr)
    if slot is not None and name in slot:
        del slot[name]
        if len(slot) == 0:
            slot.remove_hooks()
            delattr(host, attr)


MAX_WIDTH = 1024  # the largest rank / bottleneck width a Config accepts: wider than SAM's decoder (256) and
# near vit_h's width (1280); a file asking for more would allocate gigabytes before its tensors are checked


def block_indices(blocks: Optional[Sequence[int]], n_blocks: int, kind: str) -> List[int]:
    """The encoder blocks a kind adapts (None: all), checked against the encoder's depth."""
    idx = list(range(n_blocks)) if blocks is None else list(blocks)
    bad = [i for i in idx if not 0 <= i < n_blocks]
    if bad or not idx:
        raise AdapterError(f"{kind} blocks {bad or idx} out of range; this encoder has blocks 0..{n_blocks - 1}")
    return idx


def module_tensors(prefix: str, module: nn.Module) -> Dict[str, Tuple[nn.Module, str]]:
    """The index entries of a module that belongs to one adapter: every parameter and persistent
    buffer under `prefix` + its path in `module` (the names its `state_dict` would give).
    """
    out: Dict[str, Tuple[nn.Module, str]] = {}
    for path, mod in module.named_modules():
        base = f"{prefix}{path}." if path else prefix
        for attr, p in mod._parameters.items():
            if p is not None:
                out[base + attr] = (mod, attr)
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                out[base + attr] = (mod, attr)
    return out
