"""LoRA and DoRA on the image encoder's linear layers, through peft's model-agnostic API
(`inject_adapter_in_model`, `get_peft_model_state_dict`, `set_peft_model_state_dict`)."""
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from torch import nn

from .base import AdapterError, KindSpec, block_indices, register_kind

TARGETS = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "mlp.fc1": r"mlp\.fc1", "mlp.fc2": r"mlp\.fc2"}
DECODER_TARGETS = r"mask_decoder\.transformer\..*(q_proj|k_proj|v_proj|out_proj)"


@dataclass
class LoraConfig:
    """LoRA (or DoRA) on chosen linear layers of chosen encoder blocks.

    Example:
        >>> import adapters
        >>> adapters.config("lora", r=8, targets=["qkv", "proj"], blocks=[0, 1]).alpha
        8.0
    """

    kind: ClassVar[str] = "lora"
    r: int = field(default=4, metadata={"help": "rank of the update B @ A"})
    alpha: Optional[float] = field(default=None, metadata={"help": "scaling numerator; update scaled by alpha / r (default: r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    targets: List[str] = field(default_factory=lambda: ["qkv"], metadata={"help": f"linear layers: {sorted(TARGETS)}"})
    blocks: Optional[List[int]] = field(default=None, metadata={"help": "encoder block indices (None: all)"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"lora r={self.r!r} must be a positive integer, e.g. 4")
        self.alpha = float(self.r if self.alpha is None else self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora dropout={self.dropout} must be in [0, 1)")
        self.targets = list(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise AdapterError(f"lora targets {bad or self.targets} not valid; choose from {sorted(TARGETS)}")
        if self.blocks is not None:
            self.blocks = [int(b) for b in self.blocks]


def _peft_config(cfg: LoraConfig, depth: int):
    from peft import LoraConfig as PeftLoraConfig

    blocks = block_indices(cfg.blocks, depth, "lora")
    regex = r"image_encoder\.blocks\.(%s)\.(%s)" % ("|".join(map(str, blocks)), "|".join(TARGETS[t] for t in cfg.targets))
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=regex,
                          use_dora=cfg.use_dora, bias="none")


def _inject(sam: nn.Module, peft_cfg, name: str, part: str) -> None:
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(peft_cfg, sam, adapter_name=name)
    except ValueError as e:
        if "not found" in str(e) or "Target modules" in str(e):
            raise AdapterError(f"lora targets matched no layer ({peft_cfg.target_modules}); check targets/blocks") from None
        raise
    # one adapter name may carry encoder and decoder LoRA: keep each part's peft config
    _PEFT_CONFIGS(sam)[(name, part)] = peft_cfg
    cfgs = getattr(sam, "peft_config", None)
    if isinstance(cfgs, dict):
        cfgs.pop(name, None)


def _PEFT_CONFIGS(sam: nn.Module) -> dict:
    return sam.__dict__.setdefault("_samadapt_peft_configs", {})


class _peft_config_as:
    """peft's state-dict functions read `model.peft_config[name]`: expose one part's config."""

    def __init__(self, sam, name, part):
        self.sam, self.name, self.cfg = sam, name, _PEFT_CONFIGS(sam)[(name, part)]

    def __enter__(self):
        self.saved = self.sam.__dict__.get("peft_config", None)
        self.sam.__dict__["peft_config"] = {self.name: self.cfg}

    def __exit__(self, *exc):
        if self.saved is None:
            self.sam.__dict__.pop("peft_config", None)
        else:
            self.sam.__dict__["peft_config"] = self.saved


def inject(sam: nn.Module, cfg: LoraConfig, name: str, state) -> None:
    _inject(sam, _peft_config(cfg, len(sam.image_encoder.blocks)), name, "image_encoder.")


def inject_decoder_lora(sam: nn.Module, name: str, r: int) -> None:
    from peft import LoraConfig as PeftLoraConfig

    _inject(sam, PeftLoraConfig(r=r, lora_alpha=r, target_modules=DECODER_TARGETS, bias="none"), name, "mask_decoder.")


def _lora_layers(sam: nn.Module, name: str, prefix: str):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, mod in sam.named_modules():
        if isinstance(mod, BaseTunerLayer) and path.startswith(prefix) and name in mod.lora_A:
            yield path, mod


def _delete(sam: nn.Module, name: str, prefix: str) -> None:
    for path, mod in list(_lora_layers(sam, name, prefix)):
        mod.delete_adapter(name)
        if not mod.lora_A:  # its last LoRA is gone: put the plain layer back, as it was before attach
            parent, _, attr = path.rpartition(".")
            setattr(sam.get_submodule(parent), attr, mod.get_base_layer())
    _PEFT_CONFIGS(sam).pop((name, prefix), None)


def remove(sam: nn.Module, name: str, state) -> None:
    _delete(sam, name, "image_encoder.")


def remove_decoder_lora(sam: nn.Module, name: str) -> None:
    _delete(sam, name, "mask_decoder.")


def _state_dict(sam: nn.Module, name: str, prefix: str):
    from peft import get_peft_model_state_dict

    if (name, prefix) not in _PEFT_CONFIGS(sam):
        return {}
    # peft drops other adapters' tensors only for names listed in `model.peft_config`, which exposes
    # this one alone: hand it exactly this adapter's tensors, found structurally
    own = {}
    for path, mod in _lora_layers(sam, name, prefix):
        for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
            d = getattr(mod, attr, None)
            if isinstance(d, nn.ModuleDict) and name in d:
                own.update({f"{path}.{attr}.{name}.{k}": v for k, v in d[name].state_dict().items()})
    with _peft_config_as(sam, name, prefix):
        sd = get_peft_model_state_dict(sam, state_dict=own, adapter_name=name, save_embedding_layers=False)
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def _load_state_dict(sam: nn.Module, name: str, sd, prefix: str) -> None:
    from peft import set_peft_model_state_dict

    own = _state_dict(sam, name, prefix)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise AdapterError(f"LoRA tensors do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, shape {wrong[:5]}")
    if not sd:
        return
    # peft maps the name-free keys back onto adapter `name`
    with _peft_config_as(sam, name, prefix):
        result = set_peft_model_state_dict(sam, dict(sd), adapter_name=name)
    stray = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if stray:
        raise AdapterError(f"peft did not place LoRA tensors: {stray[:5]}")


def state_dict(sam, name):
    return _state_dict(sam, name, "image_encoder.")


def load_state_dict(sam, name, sd):
    _load_state_dict(sam, name, sd, "image_encoder.")


def decoder_state_dict(sam, name):
    return _state_dict(sam, name, "mask_decoder.")


def load_decoder_state_dict(sam, name, sd):
    _load_state_dict(sam, name, sd, "mask_decoder.")


register_kind(KindSpec("lora", LoraConfig, inject, remove, state_dict, load_state_dict, mergeable=True))
