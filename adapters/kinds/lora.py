"""LoRA and DoRA on the image encoder's linear layers, built from peft's own LoRA layers (the
`lora` decoder policy in `kinds/decoder.py` uses the same `add_lora` on the mask decoder).

Each targeted `nn.Linear` becomes a `peft.tuners.lora.Linear` -- the layer peft's
`inject_adapter_in_model` creates for it -- and a second adapter on the same layer is added with
peft's `LoraLayer.update_layer`, which is what `inject_adapter_in_model` calls per target. The
targets are found by their known paths (`image_encoder.blocks.<i>.attn.qkv`, ...) instead of by
matching a pattern against every module name: peft's model-wide injection costs 10-25 ms on a
vit_b even when handed only the target subtree, ten times the budget of loading an adapter on
demand. The tensor names are peft's (`get_peft_model_state_dict` without the adapter name:
`<path>.lora_A.weight`, `<path>.lora_B.weight`, `<path>.lora_magnitude_vector`); the tests check
both against peft's `inject_adapter_in_model` and `get/set_peft_model_state_dict`.
"""
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from torch import nn

from ..base import AdapterError, Injected, KindSpec, block_indices, register_kind
from ..mixed import add_rows, set_rows
from ..parts import MAX_WIDTH

# target name -> attribute path inside an encoder block
TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


@dataclass
class LoraConfig:
    """LoRA (or DoRA) on chosen linear layers of chosen encoder blocks.

    Args:
        r: rank of the update `B @ A`.
        alpha: scaling numerator; the update is scaled by `alpha / r` (default: `r`).
        dropout: dropout on the LoRA input.
        targets: linear layers of each block (`qkv`, `proj`, `mlp.fc1`, `mlp.fc2`).
        blocks: encoder block indices (None: all).
        use_dora: weight-decomposed LoRA (DoRA).

    Raises:
        AdapterError: a setting out of range (says which and what is allowed).

    Example:
        >>> from samadapt import adapters
        >>> adapters.config("lora", r=8, targets=["qkv", "proj"], blocks=[0, 1]).alpha
        8.0
    """

    kind: ClassVar[str] = "lora"
    r: int = field(default=4, metadata={"help": "rank of the update B @ A"})
    alpha: Optional[float] = field(
        default=None, metadata={"help": "scaling numerator; update scaled by alpha / r (default: r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    targets: List[str] = field(default_factory=lambda: ["qkv"], metadata={"help": f"linear layers: {sorted(TARGETS)}"})
    blocks: Optional[List[int]] = field(default=None, metadata={"help": "encoder block indices (None: all)"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= MAX_WIDTH:
            raise AdapterError(f"lora r={self.r!r} must be an integer from 1 to {MAX_WIDTH}, e.g. 4")
        alpha = self.r if self.alpha is None else self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise AdapterError(f"lora alpha={alpha!r} must be a finite number (the update is scaled by alpha / r)")
        self.alpha = float(alpha)
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise AdapterError(f"lora dropout={self.dropout} must be in [0, 1)")
        self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise AdapterError(f"lora targets {bad or self.targets} not valid; choose from {sorted(TARGETS)}")
        if self.blocks is not None:
            self.blocks = [int(b) for b in self.blocks]


def peft_config(r: int, alpha: float, dropout: float = 0.0, use_dora: bool = False, target_modules=None,
                init: bool = True):
    """The `peft.LoraConfig` our layers are built with (`target_modules` matters only to peft's own
    `inject_adapter_in_model`, which the tests use as the reference; `init=False` skips peft's
    A-random / B-zero initialisation when a file's tensors are written next).
    """
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora, bias="none",
                          target_modules=target_modules or [], init_lora_weights=init)


def encoder_targets(sam: nn.Module, cfg: LoraConfig) -> List[str]:
    """Module paths of the linear layers `cfg` adapts, in model order."""
    blocks = block_indices(cfg.blocks, len(sam.image_encoder.blocks), "lora")
    return [f"image_encoder.blocks.{i}.{TARGETS[t]}" for i in blocks for t in TARGETS if t in cfg.targets]


@dataclass
class LoraHandle:
    """The layers holding one adapter's LoRA: (module path, peft LoRA layer)."""

    layers: List[Tuple[str, nn.Module]] = field(default_factory=list)
    hooks: List[Any] = field(default_factory=list)  # the mixed-batch routing hooks (encoder LoRA only)


def add_lora(sam: nn.Module, paths: List[str], name: str, peft_cfg) -> Injected:
    """Give every linear layer at `paths` a LoRA named `name` (peft's layers; see the module doc)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    handle = LoraHandle()
    tensors: Dict[str, Tuple[nn.Module, str]] = {}
    try:
        for path in paths:
            parent_path, _, attr = path.rpartition(".")
            parent = sam.get_submodule(parent_path)
            target = getattr(parent, attr)
            if isinstance(target, LoraLayer):
                target.update_layer(name, peft_cfg.r, lora_alpha=peft_cfg.lora_alpha, config=peft_cfg,
                                    target_name=path)
                layer = target
            elif isinstance(target, nn.Linear):
                layer = LoraLinear(target, name, config=peft_cfg, r=peft_cfg.r, lora_alpha=peft_cfg.lora_alpha,
                                   target_name=path)
                setattr(parent, attr, layer)
            else:
                raise AdapterError(f"lora target {path} is a {type(target).__name__}, not a linear layer")
            handle.layers.append((path, layer))
            tensors[f"{path}.lora_A.weight"] = (layer.lora_A[name], "weight")
            tensors[f"{path}.lora_B.weight"] = (layer.lora_B[name], "weight")
            if name in layer.lora_magnitude_vector:
                tensors[f"{path}.lora_magnitude_vector"] = (layer.lora_magnitude_vector[name], "weight")
    except BaseException:
        remove_lora(sam, name, handle)
        raise
    return Injected(tensors=tensors, handle=handle, peft_layers=list(handle.layers))


def remove_lora(sam: nn.Module, name: str, handle: LoraHandle) -> None:
    """Delete LoRA `name` from its layers; a layer left without any LoRA is unwrapped, so the model
    holds the plain linear layer again, as before the first attach.
    """
    for path, layer in handle.layers:
        layer.delete_adapter(name)
        if not layer.lora_A:
            parent_path, _, attr = path.rpartition(".")
            parent = sam.get_submodule(parent_path)
            if getattr(parent, attr) is layer:
                setattr(parent, attr, layer.get_base_layer())
    handle.layers = []


def _routed(layer: nn.Module, name: str, state):
    """A forward hook adding LoRA `name`'s update to its own rows of a mixed-adapter batch.

    During a mixed pass (`adapters.mixed.route`) no adapter is active, so peft's layer returns the
    frozen layer's output over the whole batch; this adds `name`'s part to its rows only, as
    peft's forward would for that adapter alone (its DoRA variant included, handed the rows'
    frozen output as peft hands it the whole batch's).
    """
    def hook(module, args, output):
        route = state.route
        if route is None or layer.merged or layer.disable_adapters or name not in layer.lora_A:
            return None
        rows = route.rows(name, output.shape[0])
        if rows is None:
            return None
        x = args[0][rows].to(layer.lora_A[name].weight.dtype)
        if name in layer.lora_variant:
            return set_rows(output, rows, layer.lora_variant[name].forward(
                layer, active_adapter=name, x=x, result=output[rows]))
        delta = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]
        return add_rows(output, rows, delta)
    return hook


def inject(sam: nn.Module, cfg: LoraConfig, name: str, state, init: bool = True) -> Injected:
    """LoRA `name` on the encoder layers `cfg` targets (the kind's `inject`), with the hooks that
    route it in mixed-adapter batches.
    """
    peft_cfg = peft_config(cfg.r, cfg.alpha, cfg.dropout, cfg.use_dora, init=init)
    part = add_lora(sam, encoder_targets(sam, cfg), name, peft_cfg)
    part.handle.hooks = [layer.register_forward_hook(_routed(layer, name, state)) for _, layer in part.handle.layers]
    return part


def remove(sam: nn.Module, name: str, state, handle: LoraHandle) -> None:
    """Undo `inject` (the kind's `remove`)."""
    for h in handle.hooks:
        h.remove()
    handle.hooks = []
    remove_lora(sam, name, handle)


def owns(key: str) -> bool:
    """The encoder LoRA's tensors: peft's `lora_A` / `lora_B` / `lora_magnitude_vector` names."""
    return ".lora_" in key and not key.startswith("mask_decoder.")


register_kind(KindSpec("lora", LoraConfig, inject, remove, mergeable=True, owns=owns))
