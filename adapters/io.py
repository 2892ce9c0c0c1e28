"""The adapter file: one `.safetensors` holding only the adapter's tensors (name-free, by their
path in the `Sam` module) and string metadata (JSON where structured). Written atomically.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import base as _base
from .atomic import atomic_file  # noqa: F401 -- re-exported: recipes write their files through it
from .base import (
    AdapterError,
    IncompatibleAdapterError,
    attach,
    config_from_dict,
    config_to_dict,
    detach,
    info,
    set_trainable,
)
from .base_record import base_record, describe_base  # noqa: F401 -- re-exported
from .registry import DECODER_KINDS, KINDS, label_tensor

FORMAT = "samadapt.adapter/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
RESERVED = {"format", "config", "decoder", "base", "samadapt_version", "name", "dtype"}


class AdapterFormatError(AdapterError):
    """The file is not a readable samadapt adapter of a supported format version."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("samadapt")
    except Exception:
        return "0+unknown"


def adapter_state_dict(sam: nn.Module, name: str) -> Dict[str, torch.Tensor]:
    """All tensors of adapter `name` under their canonical (name-free) names, detached."""
    return {k: v.detach() for k, v in _base.adapter_tensors(sam, name).items()}


def save(sam: nn.Module, path: Union[str, os.PathLike], name: str, dtype: str = "fp32",
         base_fingerprint: Optional[str] = None, **meta: Any) -> Path:
    """Write adapter `name` to one `.safetensors` file (atomically: temporary name, then rename).

    Args:
        sam: the model holding the adapter.
        path: destination file.
        name: the attached adapter to save.
        dtype: `fp32`, `fp16` or `bf16` for the stored tensors.
        base_fingerprint: the core's fingerprint to record (default: computed now; pass the
            fp32 core's when training ran on a cast core).
        **meta: `domain`, `prompt_mode`, `metrics` (dict), `recipe` (YAML text) and any other
            string or JSON-able values.

    Example:
        >>> import os, tempfile
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("lora", r=4), name="cod")
        >>> dest = os.path.join(tempfile.mkdtemp(), "cod.safetensors")
        >>> p = adapters.save(sam, dest, name="cod", domain="camouflage")
        >>> adapters.inspect(p)["domain"]
        'camouflage'
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise AdapterError(f"dtype {dtype!r} not supported; use one of fp32, fp16, bf16")
    inf = info(sam, name)
    merged = _base.state_of(sam).merged
    if merged is not None and base_fingerprint is None:
        # the merged core is not the base the file is for: record the unmerged core's fingerprint (unmerge
        # restores it bit for bit; merging again gives the same weights)
        _base.unmerge(sam)
        try:
            base_fingerprint = core_fingerprint(sam)
        finally:
            _base.merge(sam, merged)
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in adapter_state_dict(sam, name).items()}
    bad_meta = sorted(set(meta) & RESERVED)
    if bad_meta:
        raise AdapterError(f"metadata keys {bad_meta} are written by samadapt itself; rename them")
    metadata = {
        "format": FORMAT,
        "name": name,
        "config": json.dumps([config_to_dict(c) for c in inf.configs]),
        "decoder": json.dumps({"policy": inf.decoder, "r": inf.decoder_r}),
        "base": json.dumps(base_record(sam, base_fingerprint or core_fingerprint(sam))),
        "dtype": {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[DTYPES[dtype]],
        "samadapt_version": _version(),
    }
    meta.setdefault("prompt_mode", "none")
    meta.setdefault("domain", "")
    for k, v in meta.items():
        metadata[k] = v if isinstance(v, str) else json.dumps(v)
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def _read(path: Path, tensors: bool = True) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """The file's metadata (checked: a samadapt adapter of a supported format) and, with
    `tensors`, its tensors: the file is read once and parsed by safetensors.
    """
    from safetensors import safe_open
    from safetensors.torch import load as load_bytes

    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such adapter file")
    size = path.stat().st_size
    try:
        if tensors:
            with open(path, "rb") as fh:  # the header first: a foreign (maybe huge) file is refused unread
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 0 < n <= _MAX_HEADER or n > size - 8:
                    raise ValueError(f"header length {n} does not fit the file's {size} bytes")
                header_bytes = fh.read(n)
                header = json.loads(header_bytes)
                meta = dict(header.get("__metadata__") or {})
                keys = [k for k in header if k != "__metadata__"]
                if meta.get("format") == FORMAT:
                    fh.seek(0)
                    tensor_sd = load_bytes(fh.read())
                else:
                    tensor_sd = {}
        else:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
            tensor_sd = {}
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterFormatError(f"{path}: not a readable .safetensors file ({why}); is it truncated?") from None
    fmt = meta.get("format")
    if fmt is None:
        raise AdapterFormatError(f"{path}: a .safetensors file but not a samadapt adapter (no 'format' metadata)")
    if fmt != FORMAT:
        raise AdapterFormatError(f"{path}: format {fmt!r} is not supported by this samadapt (reads {FORMAT!r}); "
                                 f"upgrade samadapt or re-export the adapter")
    for k in ("config", "decoder", "base"):
        if k not in meta:
            raise AdapterFormatError(f"{path}: metadata lacks {k!r}; the file is damaged or was not written "
                                     f"by samadapt")
    meta["_keys"] = keys
    return meta, tensor_sd


def _read_header(path: Path) -> Dict[str, str]:
    return _read(path, tensors=False)[0]


def _parse(meta: Dict[str, str], path: Path) -> Dict[str, Any]:
    """The file's metadata with its JSON fields decoded and every field's type checked."""
    out: Dict[str, Any] = {}
    for k, v in meta.items():
        if k == "_keys":
            continue
        if k in ("config", "decoder", "base", "metrics"):
            try:
                out[k] = json.loads(v)
            except (json.JSONDecodeError, RecursionError):
                raise AdapterFormatError(f"{path}: metadata {k!r} is not valid JSON") from None
        else:
            out[k] = v
    problem = metadata_problem(out)
    if problem:
        raise AdapterFormatError(f"{path}: metadata {problem}; the file is damaged or was not written by samadapt")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def metadata_problem(meta: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a file's parsed metadata (types of every field samadapt reads), or None.

    `config` is a list of `{"kind": str, setting: value}` objects, `decoder` is `{"policy": str, "r": int}`,
    `base` is `{"arch": str, "image_size": int, "fingerprint": str}` with optional string `checkpoint` and
    `checkpoint_sha256` (the base file's name and hash), `metrics` (optional) an object, and
    `dtype` one of fp32/fp16/bf16. The settings of registered kinds are checked by their own Configs.

    Example:
        >>> ok = {"config": [{"kind": "lora", "r": 4}], "decoder": {"policy": "frozen", "r": 4},
        ...       "base": {"arch": "tiny", "image_size": 256, "fingerprint": "ab12"}, "dtype": "fp32"}
        >>> metadata_problem(ok) is None, metadata_problem({**ok, "base": ["tiny"]})
        (True, "'base' should be a JSON object, got list")
    """
    def typename(v: Any) -> str:
        return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
            type(v), type(v).__name__)

    cfg, dec, base = meta.get("config"), meta.get("decoder"), meta.get("base")
    if not isinstance(cfg, list):
        return f"'config' should be a JSON list of kind settings, got {typename(cfg)}"
    for i, c in enumerate(cfg):
        if not isinstance(c, dict) or not isinstance(c.get("kind"), str):
            return f"'config'[{i}] should be an object with a string 'kind', got {typename(c)}"
    if not isinstance(dec, dict):
        return f"'decoder' should be a JSON object, got {typename(dec)}"
    if not isinstance(dec.get("policy", "frozen"), str) or not _is_int(dec.get("r", 4)) or dec.get("r", 4) < 1:
        return f"'decoder' should hold a string 'policy' and an int 'r' >= 1, got {dec!r:.80}"
    if not isinstance(base, dict):
        return f"'base' should be a JSON object, got {typename(base)}"
    if not isinstance(base.get("arch"), str) or not _is_int(base.get("image_size")) or not isinstance(
            base.get("fingerprint"), str):
        return f"'base' should hold a string 'arch', an int 'image_size' and a string 'fingerprint', got {base!r:.80}"
    for k in ("checkpoint", "checkpoint_sha256"):  # optional: the file the base was loaded from
        if k in base and not isinstance(base[k], str):
            return f"'base' {k!r} should be a string, got {typename(base[k])}"
    for i, c in enumerate(cfg):
        if c["kind"] in KINDS:  # a plugin kind that is not installed here is named by `load`, not here
            try:
                config_from_dict(c)
            except (AdapterError, TypeError, ValueError) as e:
                return f"'config'[{i}] ({c['kind']}): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if "metrics" in meta and not isinstance(meta["metrics"], (dict, type(None))):
        return f"'metrics' should be a JSON object, got {typename(meta['metrics'])}"
    if "dtype" in meta and meta["dtype"] not in ("fp32", "fp16", "bf16"):
        return f"'dtype' {meta['dtype']!r:.40} is not one of fp32, fp16, bf16"
    return None


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensors(tensors: Dict[str, torch.Tensor], where: str) -> None:
    """Refuse tensors that are not floating point, or hold NaN or infinity.

    One pass over the adapter's tensors (about 2 ms for a 1.6 M-parameter vit_b LoRA file on one CPU core,
    a few percent of reading it); a diverged run's file would otherwise load and serve empty masks.

    Raises:
        AdapterFormatError: naming the first offending tensors.
    """
    wrong = [f"{k} ({str(t.dtype).replace('torch.', '')})" for k, t in tensors.items() if t.dtype not in _FLOAT_DTYPES]
    if wrong:
        raise AdapterFormatError(f"{where}: tensors must be fp32, fp16 or bf16: {', '.join(wrong[:3])}")
    bad = sorted(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if bad:
        raise AdapterFormatError(f"{where}: {len(bad)} of {len(tensors)} tensors hold NaN or infinity (e.g. "
                                 f"{bad[0]}); the file was saved from a diverged run or is damaged")


def inspect(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Metadata and a tensor summary of an adapter file, without a model.

    Returns a dict with the parsed metadata (`format`, `name`, `config`, `decoder`, `base`,
    `domain`, `prompt_mode`, `metrics`, `recipe`, `samadapt_version`, ...) plus `tensors` (count),
    `parameters`, `tensor_bytes`, `file_bytes`, `header_bytes`, `parameters_by_kind` and
    `tensors_by_kind` (label -> tensor names) and `non_finite` (tensors holding NaN or infinity, or not
    floating point: `load` refuses such a file). Labels come from the kinds the file names, asked
    through the registry (`KindSpec.owns`); a tensor none of them owns is labelled `other`.

    Args:
        path: an adapter `.safetensors` file, or a remote source as `load` takes (fetched first).

    Returns:
        The dict described above.

    Raises:
        AdapterFormatError: not a readable samadapt adapter file.
    """
    from safetensors import safe_open

    from .sources import is_remote, resolve

    path = resolve(path) if is_remote(path) else Path(path)
    meta = _read_header(path)
    out = _parse(meta, path)
    by_kind: Dict[str, int] = {}
    tensors_by_kind: Dict[str, List[str]] = {}
    specs = _file_specs(out)
    n_params = n_bytes = 0
    non_finite = []
    with safe_open(str(path), framework="pt") as f:
        for k in meta["_keys"]:
            sl = f.get_slice(k)
            t = f.get_tensor(k)
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                non_finite.append(k)
            shape = sl.get_shape()
            numel = 1
            for s in shape:
                numel *= s
            n_params += numel
            n_bytes += numel * {"F32": 4, "F16": 2, "BF16": 2}.get(sl.get_dtype(), 4)
            kind = label_tensor(k, specs)
            by_kind[kind] = by_kind.get(kind, 0) + numel
            tensors_by_kind.setdefault(kind, []).append(k)
    with open(path, "rb") as fh:
        header = int.from_bytes(fh.read(8), "little")
    out.update(tensors=len(meta["_keys"]), parameters=n_params, tensor_bytes=n_bytes,
               file_bytes=path.stat().st_size, header_bytes=header + 8, parameters_by_kind=by_kind,
               tensors_by_kind=tensors_by_kind, non_finite=non_finite)
    return out


def _file_specs(parsed: Dict[str, Any]) -> Optional[List[Any]]:
    """The registered kinds a file names (its configs, then its decoder policy), which label its
    tensors; None (every registered kind) when the metadata does not say.
    """
    try:
        names = [c["kind"] for c in parsed["config"]]
        policy = parsed["decoder"].get("policy", "frozen")
    except (KeyError, TypeError, AttributeError):
        return None
    specs = [KINDS[n] for n in names if n in KINDS]
    if policy in DECODER_KINDS:
        specs.append(DECODER_KINDS[policy])
    return specs


def core_fingerprint(sam: nn.Module) -> str:
    """`sam.fingerprint`, reused while the core is unchanged.

    The fingerprint hashes every core weight (about a second for vit_b), which would dominate loading
    a small adapter. It is recomputed whenever a core tensor was replaced (storage, dtype, device) or
    written in place through autograd-visible tensors (their version counter moved: `copy_`,
    `load_state_dict`, optimiser steps). Writes through `.data` are not seen.
    """
    key = sam.core_version_key()
    cached = sam.extensions.get("samadapt.adapters.fingerprint")
    if cached is not None and cached[0] == key:
        return cached[1]
    fp = sam.fingerprint
    sam.extensions["samadapt.adapters.fingerprint"] = (key, fp)
    return fp


MISMATCH_FIX = "or pass allow_base_mismatch=True (CLI: --allow-base-mismatch) to load anyway"


def check_base(sam: nn.Module, base: Dict[str, Any], where: str) -> None:
    """Raise IncompatibleAdapterError unless `base` (from a file) describes this model; the message names
    the base the file expects (arch, fingerprint and, when recorded, the checkpoint file and its sha256).
    """
    have = {"arch": sam.arch, "image_size": sam.image_size}
    wanted = describe_base(base)
    if base.get("arch") != have["arch"] or int(base.get("image_size", -1)) != have["image_size"]:
        raise IncompatibleAdapterError(
            f"{where} was made for base {wanted}; this model is {have['arch']}@{have['image_size']}; load that "
            f"base, {MISMATCH_FIX}"
        )
    fp = core_fingerprint(sam)
    if base.get("fingerprint") != fp:
        ckpt = f"checkpoint {base['checkpoint']}" if base.get("checkpoint") else "the checkpoint it was trained on"
        raise IncompatibleAdapterError(
            f"{where} expects base {wanted}; this model's fingerprint is {fp}; load {ckpt}, {MISMATCH_FIX}"
        )


def load(sam: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None,
         allow_base_mismatch: bool = False, activate: bool = True, is_trainable: bool = False,
         sha256: Optional[str] = None) -> str:
    """Attach the adapter stored at `path` to `sam` (never via pickle) and return its name.

    Args:
        sam: the frozen model; its fingerprint must match the file's base.
        path: the adapter's source: a local `.safetensors` file, an `http(s)://` URL, or
            `hf://org/repo/file.safetensors[@revision]` (downloaded through huggingface_hub's cache;
            see `adapters.sources.resolve`).
        name: name to attach it under (default: the name stored in the file).
        allow_base_mismatch: load even if the file was made for other base weights.
        activate: make it the active adapter.
        is_trainable: leave its parameters trainable (to continue training).
        sha256: the file's expected sha256 (hex); a file with another hash is refused unread.

    Raises:
        AdapterFormatError: truncated, foreign or other-version file, or an unknown kind.
        IncompatibleAdapterError: the file was made for another base (says which).
        SourceError: a remote source cannot be fetched; HashMismatchError: `sha256` differs.

    Example:
        >>> import hashlib, os, tempfile
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("lora", r=4), name="cod")
        >>> p = adapters.save(sam, os.path.join(tempfile.mkdtemp(), "cod.safetensors"), name="cod")
        >>> pin = hashlib.sha256(open(p, "rb").read()).hexdigest()
        >>> adapters.load(sam, p, name="cod2", sha256=pin)
        'cod2'
    """
    from .sources import resolve

    path = resolve(path, sha256=sha256)
    merged = _base.state_of(sam).merged
    if merged is not None:  # checked first: the merged core's fingerprint would mislead the base check
        raise AdapterError(f"adapter {merged!r} is merged into the core; call adapters.unmerge(sam) before loading "
                           f"{path}")
    meta, file_sd = _read(path)
    parsed = _parse(meta, path)
    check_tensors(file_sd, str(path))
    name = name or parsed.get("name") or path.stem
    if not allow_base_mismatch:
        check_base(sam, parsed["base"], str(path))
    try:
        configs = [config_from_dict(d) for d in parsed["config"]]
    except (AdapterError, TypeError, ValueError) as e:
        raise AdapterFormatError(f"{path}: {e}") from None
    dec = parsed["decoder"]
    # attached frozen, the other adapters' requires_grad flags kept (the core stays frozen)
    core_flags = [(p, p.requires_grad) for p in sam.core_parameters()]
    attach(sam, configs, name, decoder=dec.get("policy", "frozen"), decoder_r=int(dec.get("r", 4)), activate=False,
           _init=False, _trainable=False)
    try:
        try:  # copy_ casts the file's dtype (fp16/bf16) to the adapter's
            _base.load_adapter_tensors(sam, name, file_sd, str(path))
        except AdapterError as e:
            raise AdapterFormatError(str(e)) from None
    except BaseException:
        detach(sam, name)
        for p, flag in core_flags:  # a failed load leaves requires_grad as it found it
            p.requires_grad_(flag)
        raise
    if is_trainable:
        set_trainable(sam, name)
    sam.generation += 1
    if activate:
        _base.activate(sam, name)
    return name
