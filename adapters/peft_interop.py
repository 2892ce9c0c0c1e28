"""peft interop for LoRA-only adapters: a samadapt file <-> a peft adapter folder for transformers' `SamModel`.

`to_peft` writes `adapter_config.json` (peft's own `LoraConfig.save_pretrained`) and
`adapter_model.safetensors` under the names `get_peft_model_state_dict` gives on a `SamModel`
(`base_model.model.vision_encoder.layers.<i>.attn.qkv.lora_A.weight`, ...), so
`PeftModel.from_pretrained(SamModel.from_pretrained(base), folder)` computes what our core with the
adapter computes. `from_peft` is the reverse. Our LoRA layers are peft's (`kinds/lora.py`), so the
tensors are the same ones under other module names: timm's `mlp.fc1`/`fc2` are transformers'
`mlp.lin1`/`lin2`, and `image_encoder.blocks` is `vision_encoder.layers`.

What peft on `SamModel` cannot express, or samadapt's `lora` kind does not have, is refused by name:
other kinds (sam_adapter, bottleneck), a trained mask decoder, several LoRA configs under one name,
and on import LoRA on modules outside the vision encoder's four linear layers, biases, per-module
ranks, `modules_to_save`, and the like.
"""
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .base import AdapterError, attach, detach

PEFT_PREFIX = "base_model.model."
# our target name -> (our module path in a block, transformers SamModel's)
MODULES = {"qkv": ("attn.qkv", "attn.qkv"), "proj": ("attn.proj", "attn.proj"),
           "mlp.fc1": ("mlp.fc1", "mlp.lin1"), "mlp.fc2": ("mlp.fc2", "mlp.lin2")}
_OURS = re.compile(r"^image_encoder\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\."
                   r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_THEIRS = re.compile(r"^vision_encoder\.layers\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2)\."
                     r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_TO_HF = {ours: hf for ours, hf in MODULES.values()}
_FROM_HF = {hf: ours for ours, hf in MODULES.values()}
_TARGET_OF = {path: t for t, (path, _) in MODULES.items()}
# adapter_config.json settings that change what the LoRA computes beyond r / alpha / dropout / DoRA,
# with the value that means "not used"
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "target_parameters": None,
                "trainable_token_indices": None, "use_qalora": False, "use_bdlora": None,
                "alora_invocation_tokens": None, "arrow_config": None}


class PeftInteropError(AdapterError):
    """The adapter cannot be expressed on the other side; the message says which part and why."""


def _empty(v: Any) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


def to_peft(file: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
            base_model_name_or_path: Optional[str] = None) -> Path:
    """Write a LoRA-only samadapt adapter file as a peft adapter folder for transformers' `SamModel`.

    Args:
        file: the samadapt `.safetensors` adapter (one `lora` config, decoder frozen).
        out_dir: the folder to create (must not exist, or be empty); written under a temporary name
            and renamed, so it is never left half-written.
        base_model_name_or_path: recorded in `adapter_config.json` (default: the base checkpoint's name
            the file records, if any).

    Returns:
        `out_dir`.

    Raises:
        PeftInteropError: the file holds something peft cannot express on `SamModel` (says which).

    Example:
        >>> import os, tempfile
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("lora", r=4, targets=["qkv", "mlp.fc1"]), name="cod")
        >>> tmp = tempfile.mkdtemp()
        >>> p = adapters.save(sam, os.path.join(tmp, "cod.safetensors"), name="cod")
        >>> sorted(os.listdir(to_peft(p, os.path.join(tmp, "cod-peft"))))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    from .io import _parse, _read, check_tensors

    path = Path(file)
    meta, tensors = _read(path)
    parsed = _parse(meta, path)
    check_tensors(tensors, str(path))
    kinds = [c["kind"] for c in parsed["config"]]
    other = sorted({k for k in kinds if k != "lora"})
    policy = parsed["decoder"].get("policy", "frozen")
    problems = []
    if other:
        problems.append(f"adapter kinds {other} (peft on SamModel expresses LoRA only)")
    if kinds.count("lora") > 1:
        problems.append(f"{kinds.count('lora')} LoRA configs under one name (a peft adapter holds one)")
    if policy != "frozen":
        problems.append(f"decoder policy {policy!r} (only the image encoder's LoRA converts; decoder must be frozen)")
    if not kinds:
        problems.append("no adapter kinds")
    if problems:
        raise PeftInteropError(f"{path}: cannot convert to peft: {'; '.join(problems)}; "
                               f"`samadapt convert --to peft` takes LoRA-only adapters")
    cfg = parsed["config"][0]
    out_tensors: Dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        m = _OURS.match(k)
        if not m:
            raise PeftInteropError(f"{path}: tensor {k} has no counterpart on SamModel; cannot convert to peft")
        block, module, leaf = m.groups()
        out_tensors[f"{PEFT_PREFIX}vision_encoder.layers.{block}.{_TO_HF[module]}.{leaf}"] = t.contiguous()
    hf_modules = "|".join(re.escape(MODULES[t][1]) for t in MODULES if t in cfg.get("targets", []))
    blocks = cfg.get("blocks")
    layer = r"\d+" if blocks is None else "(" + "|".join(str(int(b)) for b in sorted(blocks)) + ")"
    base = parsed["base"]
    name = base_model_name_or_path
    if name is None and base.get("checkpoint"):
        name = re.sub(r"/(model\.safetensors|pytorch_model\.bin)$", "", str(base["checkpoint"]))
    peft_cfg = LoraConfig(
        r=int(cfg["r"]), lora_alpha=float(cfg.get("alpha") or cfg["r"]), lora_dropout=float(cfg.get("dropout", 0.0)),
        use_dora=bool(cfg.get("use_dora", False)), bias="none",
        target_modules=rf"vision_encoder\.layers\.{layer}\.({hf_modules})", base_model_name_or_path=name,
    )
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PeftInteropError(f"{out} already exists and is not an empty folder; pass a new folder")
    from .sources import _tmpdir_beside

    tmp = Path(_tmpdir_beside(out))
    try:
        peft_cfg.save_pretrained(str(tmp))
        # what the file was made for, so `from_peft` can check the base it is given
        save_file(out_tensors, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt", "samadapt_base": json.dumps(base),
                            "samadapt_domain": str(parsed.get("domain") or "")})
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_peft(peft_dir: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Dict[str, str]]:
    """A peft adapter folder's `adapter_config.json`, its tensors and its safetensors metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = Path(peft_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise PeftInteropError(f"{d}: no adapter_config.json; point to a peft adapter folder "
                               f"(what PeftModel.save_pretrained writes)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftInteropError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PeftInteropError(f"{cfg_path}: should hold a JSON object")
    weights = d / "adapter_model.safetensors"
    meta: Dict[str, str] = {}
    if weights.is_file():
        try:
            tensors = load_file(str(weights))
            with safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 -- safetensors raises several types for a damaged file
            raise PeftInteropError(f"{weights}: not a readable .safetensors file ({e})") from None
    elif (d / "adapter_model.bin").is_file():
        try:
            tensors = torch.load(str(d / "adapter_model.bin"), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise PeftInteropError(f"{d / 'adapter_model.bin'}: not a readable tensor file ({e})") from None
    else:
        raise PeftInteropError(f"{d}: no adapter_model.safetensors (or adapter_model.bin)")
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise PeftInteropError(f"{d}: the adapter weights are not a dict of tensors")
    return cfg, tensors, meta


def peft_to_samadapt(cfg: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                     where: str = "peft adapter") -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Our `LoraConfig` and tensors (our names) for a peft LoRA on `SamModel`; refuses what we cannot hold.

    Example:
        >>> import torch
        >>> cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none"}
        >>> t = {"base_model.model.vision_encoder.layers.0.mlp.lin1.lora_A.weight": torch.zeros(2, 8),
        ...      "base_model.model.vision_encoder.layers.0.mlp.lin1.lora_B.weight": torch.zeros(32, 2)}
        >>> c, ours = peft_to_samadapt(cfg, t)
        >>> c.targets, c.blocks, c.alpha, sorted(ours)[0]
        (['mlp.fc1'], [0], 4.0, 'image_encoder.blocks.0.mlp.fc1.lora_A.weight')
    """
    from .kinds.lora import LoraConfig

    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise PeftInteropError(f"{where}: peft type {cfg.get('peft_type')!r} is not LoRA; samadapt imports "
                               f"peft LoRA adapters only")
    bad = [f"{k}={cfg[k]!r}" for k, default in _UNSUPPORTED.items()
           if k in cfg and cfg[k] != default and not (_empty(default) and _empty(cfg[k]))]
    if bad:
        raise PeftInteropError(f"{where}: uses peft settings samadapt's lora kind does not have: {', '.join(bad)}")
    ours: Dict[str, torch.Tensor] = {}
    foreign: List[str] = []
    grid: Dict[int, set] = {}
    for k, t in tensors.items():
        key = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        m = _THEIRS.match(key)
        if not m:
            foreign.append(re.sub(r"\.(lora_\w+)(\.weight)?$", "", key))
            continue
        block, module, leaf = m.groups()
        grid.setdefault(int(block), set()).add(_FROM_HF[module])
        ours[f"image_encoder.blocks.{block}.{_FROM_HF[module]}.{leaf}"] = t
    if foreign:
        names = sorted(set(foreign))
        raise PeftInteropError(
            f"{where}: LoRA on modules samadapt's lora kind does not adapt: {', '.join(names[:4])}"
            f"{' ...' if len(names) > 4 else ''} (it adapts vision_encoder.layers.<i>.attn.qkv, attn.proj, "
            f"mlp.lin1, mlp.lin2)")
    if not ours:
        raise PeftInteropError(f"{where}: holds no LoRA tensors")
    modules = set().union(*grid.values())
    ragged = sorted(b for b, ms in grid.items() if ms != modules)
    if ragged:
        raise PeftInteropError(f"{where}: blocks {ragged} adapt other layers than the rest; samadapt's lora kind "
                               f"adapts the same layers in every chosen block")
    r = int(cfg.get("r", 8))
    ranks = {t.shape[0] for k, t in ours.items() if k.endswith("lora_A.weight")}
    if ranks != {r}:
        raise PeftInteropError(f"{where}: adapter_config.json says r={r} but the tensors have ranks {sorted(ranks)}")
    alpha = float(cfg.get("lora_alpha", 8))
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); ours by alpha / r
    doras = {k.endswith("lora_magnitude_vector") for k in ours}
    use_dora = bool(cfg.get("use_dora", False))
    if use_dora != (True in doras):
        raise PeftInteropError(f"{where}: use_dora={use_dora} but the tensors {'lack' if use_dora else 'hold'} "
                               f"DoRA magnitude vectors")
    targets = [t for t, (path, _) in MODULES.items() if path in modules]
    config = LoraConfig(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0) or 0.0), targets=targets,
                        blocks=sorted(grid), use_dora=use_dora)
    return config, ours


def from_peft(peft_dir: Union[str, os.PathLike], sam: nn.Module, out_file: Union[str, os.PathLike],
              name: Optional[str] = None, allow_base_mismatch: bool = False, **meta: Any) -> Path:
    """Turn a peft LoRA adapter trained on transformers' `SamModel` into a samadapt adapter file.

    Args:
        peft_dir: the peft adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
        sam: our core loaded from the same base weights (`load_sam(SamModel folder)`); its fingerprint and
            checkpoint are recorded. It is left as found.
        out_file: the samadapt `.safetensors` to write (atomically).
        name: the adapter's name (default: the file's stem).
        allow_base_mismatch: convert even if the folder says (it came from `to_peft`) it was made for
            another base.
        **meta: `domain`, `prompt_mode`, ... as `adapters.save` takes.

    Returns:
        `out_file`.

    Raises:
        PeftInteropError: the peft adapter holds what samadapt's lora kind cannot (says which).

    Example:
        >>> import os, tempfile
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("lora", r=4), name="cod")
        >>> tmp = tempfile.mkdtemp()
        >>> d = to_peft(adapters.save(sam, os.path.join(tmp, "cod.safetensors"), name="cod"), os.path.join(tmp, "p"))
        >>> adapters.detach(sam, "cod")
        >>> back = from_peft(d, sam, os.path.join(tmp, "back.safetensors"))
        >>> adapters.inspect(back)["config"][0]["targets"]
        ['qkv']
    """
    from .base import load_adapter_tensors
    from .io import check_base, save

    cfg, tensors, file_meta = read_peft(peft_dir)
    config, ours = peft_to_samadapt(cfg, tensors, str(peft_dir))
    depth = len(sam.image_encoder.blocks)
    if max(config.blocks) >= depth:
        raise PeftInteropError(f"{peft_dir}: LoRA on block {max(config.blocks)} but this core has {depth} blocks; "
                               f"pass the base the adapter was trained on")
    if len(config.blocks) == depth:
        config.blocks = None
    if "samadapt_base" in file_meta and not allow_base_mismatch:
        try:
            recorded = json.loads(file_meta["samadapt_base"])
        except json.JSONDecodeError:
            recorded = None  # a damaged record of ours is no reason to refuse a peft folder
        if isinstance(recorded, dict):
            check_base(sam, recorded, str(peft_dir))
    if "samadapt_domain" in file_meta:
        meta.setdefault("domain", file_meta["samadapt_domain"])
    out = Path(out_file)
    name = name or re.sub(r"[^A-Za-z0-9_-]", "_", out.stem) or "adapter"
    if not name[0].isalpha():
        name = "a" + name
    dtypes = {t.dtype for t in ours.values()}
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "fp32"
    attach(sam, config, name, activate=False, _init=False, _trainable=False)
    try:
        try:
            load_adapter_tensors(sam, name, ours, str(peft_dir))
        except AdapterError as e:
            raise PeftInteropError(str(e)) from None
        save(sam, out, name=name, dtype=dtype, **meta)
    finally:
        detach(sam, name)
    return out
