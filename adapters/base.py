"""Shared adapter lifecycle: the kind registry, per-model adapter state, attach / activate /
detach / merge / unmerge, and the canonical (name-free) tensor names used by the file format.

Every injected layer reads the active adapter from one list object shared by the whole model
(peft's LoRA layers included, whose `_active_adapter` is pointed at it), so `activate` is a
constant-time switch whatever the number of adapted layers.
"""
import copy
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

DECODER_POLICIES = ("frozen", "full", "lora")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}\Z")


class AdapterError(ValueError):
    """A user-facing adapter problem (bad name, unknown kind, nothing matched, ...)."""


class IncompatibleAdapterError(AdapterError):
    """The adapter file was made for another base model (arch, image size or weights)."""


# ---------------------------------------------------------------------------- registry
@dataclass
class KindSpec:
    """What the lifecycle needs from one adapter kind (one file in `adapters/`)."""

    name: str
    config_cls: Type
    inject: Callable  # (sam, config, adapter_name, state) -> list of nn.Module created (for bookkeeping)
    remove: Callable  # (sam, adapter_name, state) -> None
    state_dict: Callable  # (sam, adapter_name) -> {canonical name: tensor}
    load_state_dict: Callable  # (sam, adapter_name, {canonical name: tensor}) -> None (strict)
    mergeable: bool = False


KINDS: Dict[str, KindSpec] = {}


def register_kind(spec: KindSpec) -> KindSpec:
    """Enrol an adapter kind; each kind file calls this once at import."""
    KINDS[spec.name] = spec
    return spec


def config(kind: str, **kwargs) -> Any:
    """The `Config` dataclass of a registered kind, filled with `kwargs`.

    Example:
        >>> import adapters
        >>> adapters.config("lora", r=4, targets=["qkv"]).r
        4
    """
    if kind not in KINDS:
        raise AdapterError(f"unknown adapter kind {kind!r}; registered kinds: {sorted(KINDS)}")
    cls = KINDS[kind].config_cls
    valid = {f.name for f in fields(cls)}
    bad = sorted(set(kwargs) - valid)
    if bad:
        raise AdapterError(f"{kind} config has no setting(s) {bad}; valid: {sorted(valid)}")
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    d = asdict(cfg)
    d["kind"] = cfg.kind
    return d


def config_from_dict(d: Dict[str, Any]) -> Any:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind is None:
        raise AdapterError(f"adapter config entry lacks 'kind': {d}")
    return config(kind, **d)


# ---------------------------------------------------------------------------- per-model state
class AdapterSlot(nn.ModuleDict):
    """Holds one kind's modules at one place in the model, keyed by adapter name. Canonical
    tensor names drop the key, so a file loads under any name."""


@dataclass
class AdapterInfo:
    name: str
    configs: List[Any]
    decoder: str = "frozen"
    decoder_r: int = 4


@dataclass
class AdapterState:
    active: List[str] = field(default_factory=list)  # shared with every adapted layer
    adapters: Dict[str, AdapterInfo] = field(default_factory=dict)
    merged: Optional[str] = None
    merge_stash: Dict[str, torch.Tensor] = field(default_factory=dict)


def state_of(sam: nn.Module, create: bool = True) -> Optional[AdapterState]:
    st = sam.__dict__.get("_adapter_state")
    if st is None and create:
        st = AdapterState()
        sam.__dict__["_adapter_state"] = st
    return st


def _check_sam(sam: nn.Module) -> None:
    # `fingerprint` is looked up on the class: hasattr on the instance would hash every core weight
    if not hasattr(sam, "image_encoder") or not hasattr(sam, "mask_decoder") or not hasattr(type(sam), "fingerprint"):
        raise AdapterError(f"expected a sam_core.Sam model, got {type(sam).__name__}; build one with sam_core.build_sam or load_sam")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise AdapterError(
            f"adapter name {name!r} is not allowed; use 1-64 letters, digits, '_' or '-', starting with a letter"
        )
    if hasattr(nn.ModuleDict(), name):  # adapters are keyed by name in ModuleDicts (ours and peft's)
        raise AdapterError(f"adapter name {name!r} is not allowed: it clashes with a torch.nn.Module attribute; pick another")


def block_indices(blocks: Optional[Sequence[int]], n_blocks: int, kind: str) -> List[int]:
    """The encoder blocks a kind adapts (None: all), checked against the encoder's depth."""
    idx = list(range(n_blocks)) if blocks is None else list(blocks)
    bad = [i for i in idx if not 0 <= i < n_blocks]
    if bad or not idx:
        raise AdapterError(f"{kind} blocks {bad or idx} out of range; this encoder has blocks 0..{n_blocks - 1}")
    return idx


def _slots(sam: nn.Module) -> Iterable[Tuple[str, AdapterSlot]]:
    for path, mod in sam.named_modules():
        if isinstance(mod, AdapterSlot):
            yield path, mod


def slot_state_dict(sam: nn.Module, name: str, prefix_filter: str = "") -> Dict[str, torch.Tensor]:
    """Canonical tensors of one adapter held in `AdapterSlot`s whose path starts with `prefix_filter`."""
    out = {}
    for path, slot in _slots(sam):
        if name in slot and path.startswith(prefix_filter):
            for p, t in slot[name].state_dict().items():
                out[f"{path}.{p}"] = t
    return out


def load_slot_state_dict(sam: nn.Module, name: str, sd: Dict[str, torch.Tensor], prefix_filter: str = "") -> None:
    own = slot_state_dict(sam, name, prefix_filter)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise AdapterError(
            f"adapter tensors do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, shape {wrong[:5]}"
        )
    for path, slot in _slots(sam):
        if name in slot and path.startswith(prefix_filter):
            sub = {p[len(path) + 1:]: t for p, t in sd.items() if p.startswith(path + ".")}
            slot[name].load_state_dict(sub, strict=True)


def adapter_parameters(sam: nn.Module, name: str) -> List[nn.Parameter]:
    """Every parameter owned by adapter `name` (all kinds, and its decoder copy or decoder LoRA)."""
    params = []
    for _, slot in _slots(sam):
        if name in slot:
            params.extend(slot[name].parameters())
    for mod in sam.modules():
        for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
            d = getattr(mod, attr, None)
            if isinstance(d, nn.ModuleDict) and name in d:
                params.extend(d[name].parameters())
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def link_peft_layers(sam: nn.Module, state: AdapterState) -> None:
    """Point every peft layer's active-adapter list at the shared one."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for mod in sam.modules():
        if isinstance(mod, BaseTunerLayer):
            mod._active_adapter = state.active
            mod._disable_adapters = False


# ---------------------------------------------------------------------------- lifecycle
def _set_decoder_in_use(sam: nn.Module, name: Optional[str]) -> None:
    decoders = getattr(sam, "adapter_decoders", None)
    dec = decoders[name] if decoders is not None and name is not None and name in decoders else None
    sam.__dict__["decoder_in_use"] = dec


def attach(
    sam: nn.Module,
    configs: Union[Any, Sequence[Any]],
    name: str,
    decoder: str = "frozen",
    decoder_r: int = 4,
    activate: bool = True,
) -> None:
    """Inject adapter `name` (one config or several kinds combined) into a frozen SAM.

    The core stays frozen (requires_grad False); the new adapter's parameters (and, with
    `decoder="full"`, a trainable copy of the mask decoder, or with `decoder="lora"`, LoRA on the
    decoder's attention projections) become trainable. A fresh adapter changes no output.

    Args:
        sam: a `sam_core.Sam`.
        configs: a kind's Config (see `adapters.config`) or a list of them.
        name: adapter name (letters, digits, `_`, `-`).
        decoder: `frozen`, `full` or `lora`.
        decoder_r: LoRA rank for `decoder="lora"`.
        activate: make it the active adapter.

    Example:
        >>> import adapters
        >>> from sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("lora", r=4, targets=["qkv"]), name="cod")
        >>> adapters.trainable_summary(sam)["trainable"] > 0
        True
    """
    _check_sam(sam)
    _check_name(name)
    state = state_of(sam)
    if name in state.adapters:
        raise AdapterError(f"an adapter named {name!r} is already attached; detach it first or pick another name")
    if state.merged is not None:
        raise AdapterError(f"adapter {state.merged!r} is merged into the core; call adapters.unmerge(sam) first")
    if decoder not in DECODER_POLICIES:
        raise AdapterError(f"decoder policy {decoder!r} is not one of {DECODER_POLICIES}")
    configs = list(configs) if isinstance(configs, (list, tuple)) else [configs]
    if not configs and decoder == "frozen":
        raise AdapterError("nothing to attach: give at least one adapter config or a decoder policy other than 'frozen'")
    kinds = [getattr(c, "kind", None) for c in configs]
    for c, k in zip(configs, kinds):
        if k not in KINDS or not isinstance(c, KINDS[k].config_cls):
            raise AdapterError(f"{c!r} is not an adapter config; make one with adapters.config(kind, ...)")
    if len(set(kinds)) != len(kinds):
        raise AdapterError(f"kind listed twice in {kinds}; combine different kinds only")
    flags = [(p, p.requires_grad) for p in sam.parameters()]
    for p in sam.parameters():
        p.requires_grad_(False)
    info = AdapterInfo(name=name, configs=configs, decoder=decoder, decoder_r=decoder_r)
    try:
        for c in configs:
            KINDS[c.kind].inject(sam, c, name, state)
        if decoder == "full":
            if "adapter_decoders" not in sam._modules:
                sam.adapter_decoders = AdapterSlot()
            dec = _plain_copy(sam.mask_decoder)
            sam.adapter_decoders[name] = dec
        elif decoder == "lora":
            from .lora import inject_decoder_lora

            inject_decoder_lora(sam, name, decoder_r)
    except Exception:
        state.adapters[name] = info
        _remove(sam, name, state)
        for p, flag in flags:  # a failed attach leaves requires_grad as it found it
            p.requires_grad_(flag)
        raise
    state.adapters[name] = info
    link_peft_layers(sam, state)
    set_trainable(sam, name)
    if activate:
        globals()["activate"](sam, name)
    else:
        globals()["activate"](sam, state.active[0] if state.active else None)


def _plain_copy(decoder: nn.Module) -> nn.Module:
    """A copy of the frozen decoder without peft wrappers (other adapters' decoder LoRA, or the
    empty wrappers left after detaching it): the copy holds the core decoder's layers only."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    dec = copy.deepcopy(decoder)
    for path, mod in list(dec.named_modules()):
        if isinstance(mod, BaseTunerLayer):
            parent, _, attr = path.rpartition(".")
            setattr(dec.get_submodule(parent) if parent else dec, attr, mod.get_base_layer())
    return dec


def set_trainable(sam: nn.Module, name: Optional[str]) -> None:
    """Make exactly adapter `name`'s parameters trainable (None: nothing trainable)."""
    for p in sam.parameters():
        p.requires_grad_(False)
    if name is not None:
        for p in adapter_parameters(sam, name):
            p.requires_grad_(True)


def activate(sam: nn.Module, name: Optional[str]) -> None:
    """Switch the model to adapter `name`, or to the plain frozen core with None. Constant time.

    Example:
        >>> import adapters
        >>> from sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("bottleneck"), name="a")
        >>> adapters.activate(sam, None); adapters.active(sam) is None
        True
    """
    state = state_of(sam)
    if name is not None and name not in state.adapters:
        raise AdapterError(f"no adapter named {name!r} is attached; attached: {sorted(state.adapters)}")
    if state.merged is not None and name != state.merged:
        raise AdapterError(f"adapter {state.merged!r} is merged into the core; call adapters.unmerge(sam) before switching")
    state.active[:] = [name] if name is not None else []
    _set_decoder_in_use(sam, name)
    sam.generation += 1


def active(sam: nn.Module) -> Optional[str]:
    """The active adapter's name, or None for the plain core."""
    st = state_of(sam, create=False)
    return st.active[0] if st is not None and st.active else None


def attached(sam: nn.Module) -> List[str]:
    """Names of the attached adapters."""
    st = state_of(sam, create=False)
    return sorted(st.adapters) if st else []


def info(sam: nn.Module, name: str) -> AdapterInfo:
    st = state_of(sam)
    if name not in st.adapters:
        raise AdapterError(f"no adapter named {name!r} is attached; attached: {sorted(st.adapters)}")
    return st.adapters[name]


def _remove(sam: nn.Module, name: str, state: AdapterState) -> None:
    inf = state.adapters.get(name)
    if inf is not None:
        for c in inf.configs:
            KINDS[c.kind].remove(sam, name, state)
        if inf.decoder == "lora":
            from .lora import remove_decoder_lora

            remove_decoder_lora(sam, name)
    decoders = getattr(sam, "adapter_decoders", None)
    if decoders is not None and name in decoders:
        del decoders[name]
    state.adapters.pop(name, None)


def detach(sam: nn.Module, name: str) -> None:
    """Remove adapter `name` and its modules; the model returns to the plain core if it was active."""
    state = state_of(sam)
    info(sam, name)
    if state.merged == name:
        raise AdapterError(f"adapter {name!r} is merged; call adapters.unmerge(sam) first")
    was_active = active(sam) == name
    _remove(sam, name, state)
    link_peft_layers(sam, state)
    if was_active:
        activate(sam, None)
    sam.generation += 1


def merge(sam: nn.Module, name: str) -> None:
    """Fold adapter `name`'s LoRA into the frozen weights (zero-overhead inference); other kinds
    of the same adapter stay active as modules. `unmerge` restores the core bit for bit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = state_of(sam)
    info(sam, name)  # raises for a name that is not attached
    if state.merged is not None:
        raise AdapterError(f"adapter {state.merged!r} is already merged; unmerge first")
    activate(sam, name)
    stash = {}
    for path, mod in sam.named_modules():
        if isinstance(mod, BaseTunerLayer) and name in getattr(mod, "lora_A", {}):
            base = mod.get_base_layer()
            stash[path] = base.weight.detach().clone()
            mod.merge(safe_merge=True, adapter_names=[name])
    state.merge_stash = stash
    state.merged = name
    sam.generation += 1


def unmerge(sam: nn.Module) -> None:
    """Undo `merge`: the frozen weights are restored exactly (copied back, not subtracted)."""
    state = state_of(sam)
    if state.merged is None:
        return
    modules = dict(sam.named_modules())
    with torch.no_grad():
        for path, w in state.merge_stash.items():
            mod = modules[path]
            mod.get_base_layer().weight.copy_(w)
            mod.merged_adapters.clear()
    state.merge_stash = {}
    state.merged = None
    sam.generation += 1


def trainable_summary(sam: nn.Module) -> Dict[str, Any]:
    """Trainable vs total parameters, overall and per adapter kind.

    Returns a dict: `trainable`, `total`, `percent`, `by_kind` ({kind: trainable count}).
    """
    total = sum(p.numel() for p in sam.parameters())
    trainable = sum(p.numel() for p in sam.parameters() if p.requires_grad)
    by_kind: Dict[str, int] = {}
    for path, p in sam.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_" in path and path.startswith("mask_decoder"):
            kind = "decoder_lora"
        elif ".lora_" in path:
            kind = "lora"
        elif path.startswith("adapter_decoders"):
            kind = "decoder_full"
        else:
            m = re.search(r"samadapt_(\w+?)\.", path)
            kind = m.group(1) if m else "other"
        by_kind[kind] = by_kind.get(kind, 0) + p.numel()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1), "by_kind": by_kind}
