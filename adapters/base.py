"""Shared adapter lifecycle: per-model adapter state, attach / activate / detach / merge / unmerge,
and the canonical (name-free) tensor names used by the file format.

The lifecycle knows no kind by name: it asks the registry (`adapters.registry`) for each kind's
`KindSpec`, decoder policies included. Every injected layer reads the active adapter from one list
object shared by the whole model (peft's LoRA layers are handed it through `set_adapter`), so
`activate` is a constant-time switch whatever the number of adapted layers.
"""
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .parts import AdapterSlot, block_indices, module_tensors  # noqa: E402,F401  (re-exported for kinds)
from .registry import (  # noqa: F401  (re-exported: kinds and users import these from base)
    KINDS,
    AdapterError,
    Injected,
    KindSpec,
    config,
    decoder_config,
    decoder_spec,
    register_kind,
)

STATE_KEY = "samadapt.adapters"  # where the adapter state lives in `Sam.extensions`
_PROBE = nn.ModuleDict()  # adapter names must not shadow its attributes
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}\Z")


class IncompatibleAdapterError(AdapterError):
    """The adapter file was made for another base model (arch, image size or weights)."""


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """A kind's Config as the JSON-able dict stored in a file's `config` metadata (with `kind`)."""
    d = asdict(cfg)
    d["kind"] = cfg.kind
    return d


def config_from_dict(d: Dict[str, Any]) -> Any:
    """The Config an entry of a file's `config` metadata describes (through the registry)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind is None:
        raise AdapterError(f"adapter config entry lacks 'kind': {d}")
    return config(kind, **d)


# ---------------------------------------------------------------------------- per-model state
@dataclass
class AdapterInfo:
    """One attached adapter: its kinds' configs, decoder policy and what each part injected."""

    name: str
    configs: List[Any]
    decoder: str = "frozen"
    decoder_r: int = 4
    parts: Dict[str, Injected] = field(default_factory=dict)  # kind name or "decoder" -> what it injected
    decoder_config: Any = None  # the decoder policy's Config (None: frozen)

    @property
    def tensors(self) -> Dict[str, Tuple[nn.Module, str]]:
        """Canonical tensor name -> (owner module, attribute), over all parts."""
        out: Dict[str, Tuple[nn.Module, str]] = {}
        for part in self.parts.values():
            out.update(part.tensors)
        return out


@dataclass
class AdapterState:
    """Every adapter attached to one `Sam`, the shared active list, and the merge record."""

    active: List[str] = field(default_factory=list)  # shared with every adapted layer
    adapters: Dict[str, AdapterInfo] = field(default_factory=dict)
    merged: Optional[str] = None
    merge_stash: Dict[str, Tuple[nn.Module, torch.Tensor]] = field(default_factory=dict)
    # kinds attached here that follow activation by a call (`KindSpec.on_activate`), by kind label
    on_activate: Dict[str, Callable] = field(default_factory=dict)
    # the row route of a mixed-adapter encoder pass (`adapters.mixed.route`), None otherwise
    route: Any = None


def state_of(sam: nn.Module, create: bool = True) -> Optional[AdapterState]:
    """The adapter state of `sam` (kept in `sam.extensions`, the core's public place for extensions:
    not a submodule or buffer, so `state_dict` and `to()` never see it); None if it has none and
    `create` is False.
    """
    ext = getattr(sam, "extensions", None)
    if ext is None:
        if create:
            _check_sam(sam)
        return None
    st = ext.get(STATE_KEY)
    if st is None and create:
        st = AdapterState()
        ext[STATE_KEY] = st
    return st


def _check_sam(sam: nn.Module) -> None:
    # `fingerprint` is looked up on the class: hasattr on the instance would hash every core weight
    if not hasattr(sam, "image_encoder") or not hasattr(sam, "mask_decoder") or not hasattr(type(sam), "fingerprint"):
        raise AdapterError(f"expected a sam_core.Sam model, got {type(sam).__name__}; "
                           f"build one with sam_core.build_sam or load_sam")


def is_valid_name(name: object) -> bool:
    r"""True if `name` can name an adapter: 1-64 letters, digits, `_` or `-`, starting with a letter.

    Example:
        >>> is_valid_name("cod-v2"), is_valid_name("2cod"), is_valid_name("a\n")
        (True, False, False)
    """
    return isinstance(name, str) and _NAME_RE.match(name) is not None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise AdapterError(
            f"adapter name {name!r} is not allowed; use 1-64 letters, digits, '_' or '-', starting with a letter"
        )
    if hasattr(_PROBE, name):  # adapters are keyed by name in ModuleDicts (ours and peft's)
        raise AdapterError(f"adapter name {name!r} is not allowed: it clashes with a torch.nn.Module attribute; "
                           f"pick another")


def adapter_tensors(sam: nn.Module, name: str) -> Dict[str, torch.Tensor]:
    """The live tensors of adapter `name` (parameters themselves, not copies) by canonical name."""
    return {k: getattr(m, a) for k, (m, a) in info(sam, name).tensors.items()}


def adapter_parameters(sam: nn.Module, name: str) -> List[nn.Parameter]:
    """Every parameter owned by adapter `name` (all kinds, and its decoder copy or decoder LoRA)."""
    seen, out = set(), []
    for t in adapter_tensors(sam, name).values():
        if isinstance(t, nn.Parameter) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _known_parameters(sam: nn.Module) -> List[nn.Parameter]:
    """The core's parameters and every attached adapter's: all the parameters a `Sam` holds,
    found from the core's references and the adapters' indexes, without walking the model.
    """
    params = list(sam.core_parameters())
    st = state_of(sam, create=False)
    if st is not None:
        for n in st.adapters:
            params.extend(adapter_parameters(sam, n))
    return params


def load_adapter_tensors(sam: nn.Module, name: str, sd: Dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy `sd` (canonical names) into adapter `name`'s tensors. Strict: every tensor of the
    adapter filled, nothing left over, shapes equal; otherwise nothing is written.
    """
    index = info(sam, name).tensors
    missing = sorted(set(index) - set(sd))
    unexpected = sorted(set(sd) - set(index))
    wrong = []
    for k, (m, a) in index.items():
        if k in sd and tuple(sd[k].shape) != tuple(getattr(m, a).shape):
            wrong.append(f"{k} {tuple(sd[k].shape)} vs {tuple(getattr(m, a).shape)}")
    if missing or unexpected or wrong:
        raise AdapterError(f"{where}: tensors do not fit this adapter's configuration: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, shape {wrong[:5]}")
    with torch.no_grad():
        for k, (m, a) in index.items():
            getattr(m, a).copy_(sd[k])


def _link(parts: Iterable[Injected], state: AdapterState) -> None:
    """Point peft layers' active-adapter list at the shared one, through peft's public `set_adapter`.

    peft keeps the very list it is handed as the layer's active adapters, so every layer then reads
    `state.active` and `activate` stays one list write. `set_adapter` also sets requires_grad on the
    layer's adapters; the flags are put back as they were (the lifecycle owns them).
    """
    for part in parts:
        for _, layer in part.peft_layers:
            flags = [(p, p.requires_grad) for p in layer.parameters()]
            if layer.disable_adapters:
                layer.enable_adapters(True)
            layer.set_adapter(state.active, inference_mode=True)
            for p, flag in flags:
                p.requires_grad_(flag)


# ---------------------------------------------------------------------------- lifecycle
def attach(
    sam: nn.Module,
    configs: Union[Any, Sequence[Any]],
    name: str,
    decoder: str = "frozen",
    decoder_r: int = 4,
    activate: bool = True,
    _init: bool = True,
    _trainable: bool = True,
) -> None:
    """Inject adapter `name` (one config or several kinds combined) into a frozen SAM.

    The core stays frozen (requires_grad False); the new adapter's parameters (and, with
    `decoder="full"`, a trainable copy of the mask decoder, or with `decoder="lora"`, LoRA on the
    decoder's attention projections) become trainable; other adapters' are frozen. A fresh
    adapter changes no output.

    Args:
        sam: a `sam_core.Sam`.
        configs: a kind's Config (see `adapters.config`) or a list of them.
        name: adapter name (letters, digits, `_`, `-`).
        decoder: `frozen`, `full` or `lora`.
        decoder_r: LoRA rank for `decoder="lora"`.
        activate: make it the active adapter.
        _init: False only when every tensor of the adapter is written right after (`load` does):
            kinds may then skip their random initialisation.
        _trainable: False (`load`): the new adapter is frozen and the other adapters keep their
            requires_grad flags, instead of only the new adapter being trainable.

    Example:
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
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
    dec_spec = decoder_spec(decoder)  # None: frozen, no decoder part
    dec_cfg = decoder_config(dec_spec, decoder_r) if dec_spec is not None else None  # checked before any change
    configs = list(configs) if isinstance(configs, (list, tuple)) else [configs]
    if not configs and dec_spec is None:
        raise AdapterError("nothing to attach: give at least one adapter config or a decoder policy "
                           "other than 'frozen'")
    kinds = [getattr(c, "kind", None) for c in configs]
    for c, k in zip(configs, kinds):
        if k not in KINDS or not isinstance(c, KINDS[k].config_cls):
            raise AdapterError(f"{c!r} is not an adapter config; make one with adapters.config(kind, ...)")
    if len(set(kinds)) != len(kinds):
        raise AdapterError(f"kind listed twice in {kinds}; combine different kinds only")
    flags = [(p, p.requires_grad) for p in _known_parameters(sam)]
    core = {id(p) for p in sam.core_parameters()}
    for p, _ in flags:
        p.requires_grad_(False)
    info_ = AdapterInfo(name=name, configs=configs, decoder=decoder, decoder_r=decoder_r, decoder_config=dec_cfg)
    state.adapters[name] = info_  # registered first: a failure below is undone by _remove
    try:
        jobs = [(c.kind, KINDS[c.kind], c) for c in configs]
        if dec_spec is not None:
            jobs.append(("decoder", dec_spec, dec_cfg))
        for part_name, spec, c in jobs:
            part = spec.inject(sam, c, name, state, _init)
            part.spec = spec
            info_.parts[part_name] = part
            if spec.on_activate is not None:
                state.on_activate[spec.label] = spec.on_activate
        seen: Dict[str, str] = {}
        for part_name, part in info_.parts.items():
            for k in part.tensors:
                if k in seen:
                    raise AdapterError(f"tensor name {k} is claimed by both {seen[k]} and {part_name}")
                if not part.spec.owns(k):  # labels (inspect, trainable_summary) come from `owns`
                    raise AdapterError(f"kind {part.spec.name!r} injected tensor {k} that its KindSpec.owns does "
                                       f"not claim; fix the kind's owns (or its tensor names)")
                seen[k] = part_name
    except BaseException:
        _remove(sam, name, state)
        for p, flag in flags:  # a failed attach leaves requires_grad as it found it
            p.requires_grad_(flag)
        raise
    _link(info_.parts.values(), state)
    # new modules are made in training mode; an eval-mode core (predict, serve, the bank) must not run
    # the new adapter's dropout (a core in training mode is left as its training code set it)
    if not sam.training:
        sam.eval()
    # peft's update_layer re-flags the adapters of the layers it touches: settle every flag here
    for p, flag in flags:  # the core stays frozen; other adapters frozen, or as they were
        p.requires_grad_(flag and not _trainable and id(p) not in core)
    for p in adapter_parameters(sam, name):
        p.requires_grad_(_trainable)
    if activate:
        globals()["activate"](sam, name)
    else:
        globals()["activate"](sam, state.active[0] if state.active else None)


def set_trainable(sam: nn.Module, name: Optional[str]) -> None:
    """Make exactly adapter `name`'s parameters trainable (None: nothing trainable): the core and
    every other adapter are frozen. Reads the adapters' indexes; does not walk the model.
    """
    for p in _known_parameters(sam):
        p.requires_grad_(False)
    if name is not None:
        for p in adapter_parameters(sam, name):
            p.requires_grad_(True)


def activate(sam: nn.Module, name: Optional[str]) -> None:
    """Switch the model to adapter `name`, or to the plain frozen core with None. Constant time.

    Example:
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("bottleneck"), name="a")
        >>> adapters.activate(sam, None); adapters.active(sam) is None
        True
    """
    state = state_of(sam)
    if name is not None and name not in state.adapters:
        raise AdapterError(f"no adapter named {name!r} is attached; attached: {sorted(state.adapters)}")
    if state.merged is not None and name != state.merged:
        raise AdapterError(f"adapter {state.merged!r} is merged into the core; "
                           f"call adapters.unmerge(sam) before switching")
    state.active[:] = [name] if name is not None else []
    for hook in state.on_activate.values():  # one call per kind attached here, not per layer
        hook(sam, name)
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
    """The `AdapterInfo` of attached adapter `name`.

    Raises:
        AdapterError: no adapter of that name is attached (lists the attached ones).
    """
    st = state_of(sam)
    if name not in st.adapters:
        raise AdapterError(f"no adapter named {name!r} is attached; attached: {sorted(st.adapters)}")
    return st.adapters[name]


def _remove(sam: nn.Module, name: str, state: AdapterState) -> None:
    inf = state.adapters.get(name)
    if inf is not None:
        if name in state.active:  # peft would otherwise pick another adapter to activate, with a warning
            state.active[:] = []
        for part in list(inf.parts.values()):
            part.spec.remove(sam, name, state, part.handle)
            _link([part], state)  # peft's delete_adapter may have replaced a layer's active list
        inf.parts.clear()
    state.adapters.pop(name, None)


def detach(sam: nn.Module, name: str) -> None:
    """Remove adapter `name` and its modules; the model returns to the plain core if it was active.

    Raises:
        AdapterError: `name` is not attached, or is merged (unmerge first).

    Example:
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("bottleneck"), name="b")
        >>> adapters.detach(sam, "b"); adapters.attached(sam)
        []
    """
    state = state_of(sam)
    info(sam, name)
    if state.merged == name:
        raise AdapterError(f"adapter {name!r} is merged; call adapters.unmerge(sam) first")
    was_active = active(sam) == name
    _remove(sam, name, state)
    if was_active:
        activate(sam, None)
    sam.generation += 1


def merge(sam: nn.Module, name: str) -> None:
    """Fold adapter `name`'s LoRA into the frozen weights (zero-overhead inference); other kinds
    of the same adapter stay active as modules. `unmerge` restores the core bit for bit.

    Raises:
        AdapterError: `name` is not attached, or another adapter is merged.

    Example:
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("lora", r=2), name="l")
        >>> adapters.merge(sam, "l"); adapters.unmerge(sam); adapters.active(sam)
        'l'
    """
    state = state_of(sam)
    inf = info(sam, name)  # raises for a name that is not attached
    if state.merged is not None:
        raise AdapterError(f"adapter {state.merged!r} is already merged; unmerge first")
    activate(sam, name)
    stash = {}
    for part in inf.parts.values():
        for path, layer in part.peft_layers:
            stash[path] = (layer, layer.get_base_layer().weight.detach().clone())
            layer.merge(safe_merge=True, adapter_names=[name])
    state.merge_stash = stash
    state.merged = name
    sam.generation += 1


def unmerge(sam: nn.Module) -> None:
    """Undo `merge`: the frozen weights are restored exactly (copied back, not subtracted)."""
    state = state_of(sam)
    if state.merged is None:
        return
    with torch.no_grad():
        for layer, w in state.merge_stash.values():
            layer.get_base_layer().weight.copy_(w)
            layer.merged_adapters.clear()
    state.merge_stash = {}
    state.merged = None
    sam.generation += 1


def trainable_summary(sam: nn.Module) -> Dict[str, Any]:
    """Trainable vs total parameters, overall and per adapter kind.

    Each attached adapter's parts are labelled by the kind that made them (`KindSpec.label`, asked
    through the registry); trainable parameters no adapter owns count as `other`.

    Returns:
        A dict: `trainable`, `total`, `percent`, `by_kind` ({label: trainable count}).

    Example:
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("lora", r=2), name="l", decoder="lora")
        >>> sorted(adapters.trainable_summary(sam)["by_kind"])
        ['decoder_lora', 'lora']
    """
    total = sum(p.numel() for p in sam.parameters())
    trainable = sum(p.numel() for p in sam.parameters() if p.requires_grad)
    by_kind: Dict[str, int] = {}
    seen = set()
    st = state_of(sam, create=False)
    for inf in (st.adapters.values() if st is not None else ()):
        for part in inf.parts.values():  # each part is labelled by the kind that made it
            for m, a in part.tensors.values():
                p = getattr(m, a)
                if isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    by_kind[part.spec.label] = by_kind.get(part.spec.label, 0) + p.numel()
    for p in sam.parameters():
        if p.requires_grad and id(p) not in seen:
            by_kind["other"] = by_kind.get("other", 0) + p.numel()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1), "by_kind": by_kind}
