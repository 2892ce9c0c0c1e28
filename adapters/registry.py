"""The adapter-kind registry: the one place that knows which kinds exist and which tensors each owns.

Built-in kinds (`adapters/kinds/`) register at import. Third-party kinds register through the
entry-point group `samadapt.adapter_kinds`: each entry point names a module (importing it registers
its kind) or a `KindSpec` (registered as loaded). Entry points are read lazily, on the first lookup
(`config`, `attach`, `load`, `inspect`, ...), so `import samadapt.adapters` stays cheap; a plugin that
fails to load is skipped with a warning naming it.

Example:
    >>> from samadapt import adapters
    >>> adapters.KINDS["lora"].label_of("image_encoder.blocks.0.attn.qkv.lora_A.weight")
    'lora'
"""
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type

from torch import nn

ENTRY_POINT_GROUP = "samadapt.adapter_kinds"
PARTS = ("encoder", "decoder")


class AdapterError(ValueError):
    """A user-facing adapter problem (bad name, unknown kind, nothing matched, ...)."""


@dataclass
class Injected:
    """What a kind's `inject` hands back for one adapter.

    Attributes:
        tensors: every tensor of the adapter by its canonical (name-free) path in the `Sam`, as the
            (owner module, attribute) that holds it. Saving, loading, the trainable flags and the
            parameter list all read this index instead of walking the model.
        handle: the kind's own record, handed back to its `remove`.
        peft_layers: the peft tuner layers (path, layer) holding this adapter; they are pointed at
            the shared active list and used by `merge`.
        spec: the `KindSpec` that made it (filled in by `attach`).
    """

    tensors: Dict[str, Tuple[nn.Module, str]]
    handle: Any = None
    peft_layers: List[Tuple[str, nn.Module]] = field(default_factory=list)
    spec: Optional["KindSpec"] = None


@dataclass
class KindSpec:
    """What the lifecycle needs from one adapter kind (one file in `adapters/kinds/`).

    Attributes:
        name: the kind's name (`adapters.config(name, ...)`; for `part="decoder"`, the value of
            `attach(..., decoder=name)`).
        config_cls: its `Config` dataclass, with a class attribute `kind` equal to `name`.
        inject: `(sam, config, adapter_name, state, init) -> Injected`; `init=False` means every
            tensor is written right after (loading), so random initialisation may be skipped.
        remove: `(sam, adapter_name, state, handle) -> None`, undoing `inject`.
        mergeable: its weights can be folded into the core (`adapters.merge`).
        part: `encoder` (combined in the configs list of `attach`) or `decoder` (a decoder policy:
            at most one per adapter, chosen with `attach(..., decoder=...)`).
        owns: canonical tensor name -> whether this kind owns it; default: the name holds
            `.samadapt_<name>.` (the slot attribute the built-in module kinds use).
        label: how `inspect` and `trainable_summary` label its tensors (default: `name`).
        on_activate: optional `(sam, adapter_name_or_None) -> None`, called by `activate` on models
            where this kind is attached (for kinds that cannot read the shared active list).
    """

    name: str
    config_cls: Type
    inject: Callable
    remove: Callable
    mergeable: bool = False
    part: str = "encoder"
    owns: Optional[Callable[[str], bool]] = None
    label: Optional[str] = None
    on_activate: Optional[Callable] = None

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise AdapterError(f"kind {self.name!r}: part={self.part!r} is not one of {PARTS}")
        if self.label is None:
            self.label = self.name
        if self.owns is None:
            marker = f".samadapt_{self.name}."
            self.owns = lambda key: marker in key

    def label_of(self, key: str) -> Optional[str]:
        """This kind's label if it owns canonical tensor name `key`, else None."""
        return self.label if self.owns(key) else None


class _Registry(Mapping):
    """A read-only view of one part's kinds; any lookup first reads the plugins' entry points."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.specs: Dict[str, KindSpec] = {}

    def __getitem__(self, name: str) -> KindSpec:
        _ensure_plugins()
        return self.specs[name]

    def __iter__(self) -> Iterator[str]:
        _ensure_plugins()
        return iter(list(self.specs))

    def __len__(self) -> int:
        _ensure_plugins()
        return len(self.specs)

    def __contains__(self, name: object) -> bool:
        _ensure_plugins()
        return name in self.specs

    def __repr__(self) -> str:
        return f"KINDS({self.part}: {sorted(self.specs)})"


KINDS = _Registry("encoder")
DECODER_KINDS = _Registry("decoder")
_BY_PART = {"encoder": KINDS, "decoder": DECODER_KINDS}


def register_kind(spec: KindSpec) -> KindSpec:
    """Enrol an adapter kind; each kind file calls this once at import.

    Args:
        spec: the kind's `KindSpec`.

    Returns:
        `spec`.

    Raises:
        AdapterError: a kind of that name is already registered for the same part.

    Example:
        >>> from samadapt import adapters
        >>> try:
        ...     adapters.register_kind(adapters.KINDS["lora"])
        ... except adapters.AdapterError as e:
        ...     print(str(e)[:41])
        adapter kind 'lora' is already registered
    """
    if not isinstance(spec, KindSpec):
        raise AdapterError(f"register_kind takes a KindSpec, got {type(spec).__name__}")
    reg = _BY_PART[spec.part]
    old = reg.specs.get(spec.name)
    if old is not None:
        where = getattr(old.config_cls, "__module__", "?")
        raise AdapterError(
            f"adapter kind {spec.name!r} is already registered (by {where}); two kinds under one name would "
            f"make saved files ambiguous; give the new kind another name, or unregister_kind({spec.name!r}) first"
        )
    if getattr(spec.config_cls, "kind", None) != spec.name:
        raise AdapterError(f"kind {spec.name!r}: its config class {spec.config_cls.__name__} must have the class "
                           f"attribute kind = {spec.name!r}")
    reg.specs[spec.name] = spec
    return spec


def unregister_kind(name: str, part: str = "encoder") -> KindSpec:
    """Remove a registered kind (for plugin tests); adapters already attached keep working.

    Args:
        name: the kind's name.
        part: `encoder` or `decoder`.

    Returns:
        The removed `KindSpec`.
    """
    reg = _BY_PART.get(part)
    if reg is None or name not in reg.specs:
        raise AdapterError(f"no {part} adapter kind named {name!r} is registered; registered: "
                           f"{sorted(reg.specs) if reg else list(_BY_PART)}")
    return reg.specs.pop(name)


# ---------------------------------------------------------------------------- plugins
_plugins = {"done": False, "loading": False, "seen": set()}
_plugin_lock = threading.RLock()


def _ensure_plugins() -> None:
    if _plugins["done"]:
        return
    with _plugin_lock:  # another thread's lookup waits here until the plugins are in
        if not (_plugins["done"] or _plugins["loading"]):  # loading: a plugin's own lookup, same thread
            load_plugins()


def load_plugins() -> List[str]:
    """Read the `samadapt.adapter_kinds` entry points and load those not loaded yet.

    Called by the first registry lookup; call it again after installing a plugin while running.
    Each entry point (name and object reference) is loaded at most once per process.

    Returns:
        The names of the entry points loaded by this call.

    Example:
        >>> from samadapt import adapters
        >>> isinstance(adapters.load_plugins(), list)
        True
    """
    from importlib.metadata import entry_points

    with _plugin_lock:
        _plugins["loading"] = True  # a plugin's own registry lookups must not recurse into loading
        try:
            return _load_entry_points(entry_points(group=ENTRY_POINT_GROUP))
        finally:
            _plugins["loading"] = False
            _plugins["done"] = True


def _load_entry_points(eps: Iterable[Any]) -> List[str]:
    """Load each entry point not seen before; a failure is a warning naming the plugin."""
    loaded = []
    for ep in eps:
        key = (ep.name, ep.value)
        if key in _plugins["seen"]:
            continue
        _plugins["seen"].add(key)
        try:
            obj = ep.load()  # a module registers its kind on import; a KindSpec is registered here
            if isinstance(obj, KindSpec) and _BY_PART[obj.part].specs.get(obj.name) is not obj:
                register_kind(obj)
        except Exception as e:  # a broken plugin must not take the built-in kinds down with it
            warnings.warn(f"samadapt: adapter-kind plugin {ep.name!r} ({ep.value}) could not be loaded and is "
                          f"skipped: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
            continue
        loaded.append(ep.name)
    return loaded


# ---------------------------------------------------------------------------- lookups
def config(kind: str, **kwargs: Any) -> Any:
    """The `Config` dataclass of a registered kind, filled with `kwargs`.

    Args:
        kind: a registered kind's name (`adapters.KINDS`).
        **kwargs: that Config's settings.

    Returns:
        The Config instance (checked by its `__post_init__`).

    Raises:
        AdapterError: unknown kind or setting, or a value the kind refuses.

    Example:
        >>> from samadapt import adapters
        >>> adapters.config("lora", r=4, targets=["qkv"]).r
        4
    """
    if kind not in KINDS:
        raise AdapterError(f"unknown adapter kind {kind!r}; registered kinds: {sorted(KINDS)}; third-party kinds "
                           f"come from the entry-point group {ENTRY_POINT_GROUP!r} (is the plugin installed?)")
    cls = KINDS[kind].config_cls
    valid = {f.name for f in fields(cls)}
    bad = sorted(set(kwargs) - valid)
    if bad:
        raise AdapterError(f"{kind} config has no setting(s) {bad}; valid: {sorted(valid)}")
    return cls(**kwargs)


def decoder_spec(policy: str) -> Optional[KindSpec]:
    """The decoder policy's `KindSpec` (None for `frozen`: no decoder part)."""
    if policy == "frozen":
        return None
    if policy not in DECODER_KINDS:
        raise AdapterError(f"decoder policy {policy!r} is not one of {('frozen',) + tuple(DECODER_KINDS)}; "
                           f"pick one (frozen keeps the core's decoder as it is)")
    return DECODER_KINDS[policy]


def decoder_config(spec: KindSpec, r: int) -> Any:
    """A decoder policy's Config from `attach`'s arguments: `r` goes to a policy that has a rank."""
    has_r = any(f.name == "r" for f in fields(spec.config_cls))
    return spec.config_cls(r=r) if has_r else spec.config_cls()


def label_tensor(key: str, specs: Optional[Iterable[KindSpec]] = None) -> str:
    """The label of canonical tensor name `key`: the first of `specs` (default: every registered
    kind) that owns it, or `other`.
    """
    if specs is None:
        specs = [s for reg in _BY_PART.values() for s in reg.values()]
    for spec in specs:
        label = spec.label_of(key)
        if label is not None:
            return label
    return "other"
