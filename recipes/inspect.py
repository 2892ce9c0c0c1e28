"""`samadapt inspect FILE`: what a `.safetensors` file holds, read from its header without torch.

An adapter file's JSON header carries everything the table shows (metadata, tensor names, shapes and
dtypes), so this module reads it with `struct` and `json` and never imports torch (which costs seconds
and hundreds of MB for a header of a few KB). Tensor values are read with numpy only to flag NaN and
infinity, as `samadapt.adapters.inspect` does.

It also says what a file is when it is not an adapter: a SAM core checkpoint ("pass it as --base"),
another `.safetensors` file, or not a `.safetensors` file at all (a JPEG, a PyTorch pickle, ...).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import UserError

__all__ = ["InspectError", "read_safetensors_header", "describe", "inspect_file", "format_table"]

FORMAT = "samadapt.adapter/1"  # the adapter file format this samadapt reads (samadapt.adapters.io.FORMAT)
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# the built-in adapter kinds and how they label their tensors (the rules of each kind's `KindSpec.owns`)
_BUILTIN_KINDS = ("lora", "sam_adapter", "bottleneck")
_BUILTIN_DECODER = ("frozen", "full", "lora")

# The built-in kinds' settings as `inspect` checks them without importing the kinds (which import torch): the
# types and ranges of each Config's fields (tests/test_inspect.py holds this table to the dataclasses' fields
# and to `samadapt.adapters.io.metadata_problem`'s verdicts). `load` runs the Configs themselves.
_MAX_WIDTH = 1024  # samadapt.adapters.parts.MAX_WIDTH


def _int(lo=1, hi=_MAX_WIDTH, none=False):
    return lambda v: (v is None and none) or (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi)


def _num(lo=float("-inf"), hi=float("inf"), none=False, open_hi=False):
    import math

    def ok(v):
        if v is None:
            return none
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return lo <= v < hi if open_hi else lo <= v <= hi
    return ok


def _strs(allowed):
    return lambda v: (isinstance(v, str) and v in allowed) or (
        isinstance(v, list) and bool(v) and all(isinstance(x, str) and x in allowed for x in v))


def _blocks(v):
    return v is None or (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v))


def _bool(v):
    return True  # the Configs read these flags as truth values and check nothing more; neither does inspect


KIND_SETTINGS = {
    "lora": {"r": _int(), "alpha": _num(none=True), "dropout": _num(0.0, 1.0, open_hi=True),
             "targets": _strs({"qkv", "proj", "mlp.fc1", "mlp.fc2"}), "blocks": _blocks, "use_dora": _bool},
    "sam_adapter": {"scale_factor": _int(1, 2**31), "width": _int(none=True),
                    "freq_ratio": _num(0.0, 1.0, open_hi=True),
                    "blocks": _blocks, "handcrafted": _bool, "embedding": _bool},
    "bottleneck": {"width": _int(none=True), "positions": _strs({"attn", "mlp"}), "scale": _num(), "blocks": _blocks},
}


def config_problem(i: int, c: Dict[str, Any]) -> Optional[str]:
    """What is wrong with `config[i]` of a built-in kind (None: fine, or not a built-in kind).

    Example:
        >>> config_problem(0, {"kind": "lora", "r": 4, "alpha": "abc"})
        "'config'[0] (lora): alpha='abc' is not valid"
    """
    table = KIND_SETTINGS.get(c.get("kind"))
    if table is None:
        return None
    for k, v in c.items():
        if k == "kind":
            continue
        if k not in table:
            return f"'config'[{i}] ({c['kind']}): unknown setting {k!r}"
        if not table[k](v):
            return f"'config'[{i}] ({c['kind']}): {k}={v!r:.40} is not valid"
    if c["kind"] == "sam_adapter" and c.get("handcrafted") is False and c.get("embedding") is False:
        return f"'config'[{i}] (sam_adapter): handcrafted and embedding both off leave no input"
    return None


def metadata_problem(meta: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a file's parsed metadata, torch-free: the checks of
    `samadapt.adapters.io.metadata_problem` with the built-in kinds' settings checked by `config_problem`.

    Example:
        >>> ok = {"config": [{"kind": "lora", "r": 4}], "decoder": {"policy": "frozen", "r": 4},
        ...       "base": {"arch": "tiny", "image_size": 256, "fingerprint": "ab12"}, "dtype": "fp32"}
        >>> metadata_problem(ok) is None, metadata_problem({**ok, "base": ["tiny"]})
        (True, "'base' should be a JSON object, got list")
    """
    def typename(v: Any) -> str:
        return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
            type(v), type(v).__name__)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    cfg, dec, base = meta.get("config"), meta.get("decoder"), meta.get("base")
    if not isinstance(cfg, list):
        return f"'config' should be a JSON list of kind settings, got {typename(cfg)}"
    for i, c in enumerate(cfg):
        if not isinstance(c, dict) or not isinstance(c.get("kind"), str):
            return f"'config'[{i}] should be an object with a string 'kind', got {typename(c)}"
    if not isinstance(dec, dict):
        return f"'decoder' should be a JSON object, got {typename(dec)}"
    if not isinstance(dec.get("policy", "frozen"), str) or not is_int(dec.get("r", 4)) or dec.get("r", 4) < 1:
        return f"'decoder' should hold a string 'policy' and an int 'r' >= 1, got {dec!r:.80}"
    if not isinstance(base, dict):
        return f"'base' should be a JSON object, got {typename(base)}"
    if not isinstance(base.get("arch"), str) or not is_int(base.get("image_size")) or not isinstance(
            base.get("fingerprint"), str):
        return f"'base' should hold a string 'arch', an int 'image_size' and a string 'fingerprint', got {base!r:.80}"
    for k in ("checkpoint", "checkpoint_sha256"):
        if k in base and not isinstance(base[k], str):
            return f"'base' {k!r} should be a string, got {typename(base[k])}"
    for i, c in enumerate(cfg):
        problem = config_problem(i, c)
        if problem:
            return problem
    if "metrics" in meta and not isinstance(meta["metrics"], (dict, type(None))):
        return f"'metrics' should be a JSON object, got {typename(meta['metrics'])}"
    if "dtype" in meta and meta["dtype"] not in ("fp32", "fp16", "bf16"):
        return f"'dtype' {meta['dtype']!r:.40} is not one of fp32, fp16, bf16"
    return None


# the first bytes of files people pass by mistake, to name what they are
_MAGIC = [
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"BM", "a BMP image"),
    (b"PK\x03\x04", "a zip archive (a PyTorch .pth/.pt checkpoint is one: pass it as --base)"),
    (b"\x80\x02", "a Python pickle"), (b"\x1f\x8b", "a gzip file"), (b"\x93NUMPY", "a NumPy .npy file"),
    (b"{", "a JSON or text file"), (b"DICM", "a DICOM file"),
]
_CORE_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
# Hugging Face SamModel checkpoints name the same parts vision_encoder / prompt_encoder / mask_decoder
_HF_PREFIXES = ("vision_encoder.", "prompt_encoder.", "mask_decoder.")


class InspectError(UserError, ValueError):
    """The file is not a samadapt adapter file; the message says what it is instead."""


def _what_is(head: bytes) -> Optional[str]:
    if head[128:132] == b"DICM":
        return "a DICOM file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    return None


def read_safetensors_header(path) -> Tuple[Dict[str, Any], int]:
    r"""The JSON header of a `.safetensors` file and its length in bytes (8-byte length included).

    Args:
        path: the file.

    Returns:
        (header dict: tensor name -> {dtype, shape, data_offsets}, plus `__metadata__`), header bytes.

    Raises:
        InspectError: the file does not exist or is not a `.safetensors` file (naming what it looks like).

    Example:
        >>> import os, tempfile
        >>> f = os.path.join(tempfile.mkdtemp(), "x.jpg")
        >>> _ = open(f, "wb").write(b"\xff\xd8\xff\xe0" + bytes(100))
        >>> try:
        ...     read_safetensors_header(f)
        ... except InspectError as e:
        ...     print(str(e).split(": ", 1)[1])
        not a .safetensors file: it is a JPEG image
    """
    p = Path(path)
    if not p.is_file():
        raise InspectError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        what = _what_is(head + fh.read(256)) if not 2 <= n <= min(_MAX_HEADER, size - 8) else None
        if what:
            raise InspectError(f"{p}: not a .safetensors file: it is {what}")
        if not 2 <= n <= _MAX_HEADER:
            raise InspectError(f"{p}: not a .safetensors file (its first 8 bytes are no header length)")
        if n > size - 8:
            raise InspectError(f"{p}: a .safetensors header of {n:,} bytes in a {size:,}-byte file; the file is "
                               "truncated (copy it again)")
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InspectError(f"{p}: not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InspectError(f"{p}: not a .safetensors file (its header is not a JSON object)")
    return header, n + 8


def _tensors(header: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def describe(header: Dict[str, Any]) -> Optional[str]:
    """What a `.safetensors` file without samadapt adapter metadata holds, from its tensor names (None: unknown).

    Example:
        >>> describe({"image_encoder.patch_embed.proj.weight": {"dtype": "F32", "shape": [768, 3, 16, 16]},
        ...           "mask_decoder.iou_token.weight": {"dtype": "F32", "shape": [1, 256]}})
        'a SAM core checkpoint (vit_b: image encoder width 768; 2 tensors, 590,080 parameters)'
    """
    t = _tensors(header)
    names = list(t)
    n_params = sum(_numel(v.get("shape", [])) for v in t.values())
    for prefixes, emb in ((_CORE_PREFIXES, "image_encoder.patch_embed.proj.weight"),
                          (_HF_PREFIXES, "vision_encoder.patch_embed.projection.weight")):
        if any(k.startswith(prefixes[0]) for k in names) and any(k.startswith(prefixes[2]) for k in names):
            width = (t.get(emb, {}).get("shape") or [None])[0]
            arch = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}.get(width, "tiny" if width and width < 768 else None)
            what = f"{arch}: image encoder width {width}; " if arch else ""
            return f"a SAM core checkpoint ({what}{len(names):,} tensors, {n_params:,} parameters)"
    if names and all(".lora_" in k for k in names):
        return (f"a LoRA file without samadapt metadata (peft's format? {len(names)} tensors; "
                "samadapt convert --from peft)")
    return None


def _label(key: str, kinds: List[str], policy: str) -> Optional[str]:
    """The label samadapt's built-in kinds give canonical tensor name `key` (first owner in the file's order)."""
    for kind in kinds:
        if kind == "lora" and ".lora_" in key and not key.startswith("mask_decoder."):
            return "lora"
        if kind in ("sam_adapter", "bottleneck") and f".samadapt_{kind}." in key:
            return kind
    if policy == "full" and key.startswith("mask_decoder.") and ".lora_" not in key:
        return "decoder_full"
    if policy == "lora" and key.startswith("mask_decoder.") and ".lora_" in key:
        return "decoder_lora"
    return None


def _non_finite(path: Path, header_bytes: int, tensors: Dict[str, Dict[str, Any]]) -> List[str]:
    """Tensors holding NaN or infinity, or not floating point (numpy reads them; no torch)."""
    import numpy as np

    out = []
    with open(path, "rb") as fh:
        for k, v in tensors.items():
            dt = v.get("dtype")
            if dt not in ("F32", "F16", "BF16", "F64"):
                out.append(k)
                continue
            a, b = v.get("data_offsets", [0, 0])
            fh.seek(header_bytes + int(a))
            raw = fh.read(int(b) - int(a))
            if dt == "BF16":  # bf16 is the top half of a float32
                arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype={"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dt])
            if not np.isfinite(arr).all():
                out.append(k)
    return out


def inspect_file(path) -> Dict[str, Any]:
    """Metadata and a tensor summary of an adapter file, without torch: the keys of
    `samadapt.adapters.inspect` (`format`, `name`, `config`, `decoder`, `base`, ..., `tensors`,
    `parameters`, `tensor_bytes`, `file_bytes`, `header_bytes`, `parameters_by_kind`, `tensors_by_kind`,
    `non_finite`) plus `tensor_list` (name, shape, dtype of every tensor, in file order).

    Tensors of a kind that is not built in (a plugin) are labelled through the adapter registry, which
    imports torch; files of the built-in kinds never do.

    Args:
        path: an adapter `.safetensors` file.

    Returns:
        The dict described above.

    Raises:
        InspectError: the file is not a samadapt adapter; the message says what it is (a core checkpoint:
            "pass it as --base"; not a `.safetensors` file; another format version).

    Example:
        >>> from samadapt.recipes.model import TINY_CORE
        >>> try:
        ...     inspect_file(TINY_CORE)
        ... except InspectError as e:
        ...     print(str(e).split(": ", 1)[1][:40])
        a SAM core checkpoint (tiny: image encod
    """
    p = Path(path)
    header, header_bytes = read_safetensors_header(p)
    meta = header.get("__metadata__") or {}
    tensors = _tensors(header)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = describe(header)
        if what and what.startswith("a SAM core"):  # samadapt's own core files (samadapt.core/1) included
            raise InspectError(f"{p}: {what}, not an adapter; pass it as --base")
    if not isinstance(meta, dict) or "format" not in meta:
        raise InspectError(f"{p}: a .safetensors file but not a samadapt adapter (no 'format' metadata)"
                           + (f"; it is {what}" if what else ""))
    if meta["format"] != FORMAT:
        raise InspectError(f"{p}: adapter format {meta['format']!r}; this samadapt reads {FORMAT!r}: upgrade "
                           "samadapt or re-export the adapter")
    out: Dict[str, Any] = {}
    for k, v in meta.items():
        if k in ("config", "decoder", "base", "metrics"):
            try:
                out[k] = json.loads(v)
            except (TypeError, json.JSONDecodeError, RecursionError):
                raise InspectError(f"{p}: metadata {k!r} is not valid JSON; the file is damaged") from None
        else:
            out[k] = v
    for k in ("config", "decoder", "base"):
        if k not in out:
            raise InspectError(f"{p}: metadata lacks {k!r}; the file is damaged or was not written by samadapt")
    problem = metadata_problem(out)
    if problem:
        raise InspectError(f"{p}: metadata {problem}; the file is damaged or was not written by samadapt")
    kinds = [c.get("kind") for c in out["config"] if isinstance(c, dict)]
    policy = out["decoder"].get("policy", "frozen")
    labels = {k: _label(k, kinds, policy) for k in tensors}
    if any(v is None for v in labels.values()) and (set(kinds) - set(_BUILTIN_KINDS)
                                                     or policy not in _BUILTIN_DECODER):
        from samadapt.adapters import inspect as lib_inspect  # a plugin kind labels its own tensors (torch)

        by = lib_inspect(p)["tensors_by_kind"]
        labels = {k: lab for lab, ks in by.items() for k in ks}
    by_kind: Dict[str, int] = {}
    tensors_by_kind: Dict[str, List[str]] = {}
    n_params = n_bytes = 0
    tensor_list = []
    for k, v in tensors.items():
        shape = [int(s) for s in v.get("shape", [])]
        numel = _numel(shape)
        n_params += numel
        n_bytes += numel * _DTYPE_BYTES.get(v.get("dtype"), 4)
        lab = labels.get(k) or "other"
        by_kind[lab] = by_kind.get(lab, 0) + numel
        tensors_by_kind.setdefault(lab, []).append(k)
        tensor_list.append({"name": k, "shape": shape, "dtype": v.get("dtype"), "kind": lab})
    out.update(tensors=len(tensors), parameters=n_params, tensor_bytes=n_bytes, file_bytes=p.stat().st_size,
               header_bytes=header_bytes, parameters_by_kind=by_kind, tensors_by_kind=tensors_by_kind,
               non_finite=_non_finite(p, header_bytes, tensors), tensor_list=tensor_list)
    return out


def format_table(info: Dict[str, Any], tensors: bool = False) -> str:
    """The `samadapt inspect` table of `inspect_file`'s dict (`tensors`: one row per tensor too).

    Example:
        >>> info = {"name": "a", "format": FORMAT, "base": {"arch": "tiny", "image_size": 256, "fingerprint": "f"},
        ...         "decoder": {"policy": "frozen"}, "config": [{"kind": "lora", "r": 4}], "tensors": 2,
        ...         "parameters": 10, "parameters_by_kind": {"lora": 10}, "file_bytes": 100, "tensor_bytes": 40,
        ...         "header_bytes": 60, "tensor_list": [{"name": "x.lora_A", "shape": [2, 5], "dtype": "F32"}]}
        >>> print(format_table(info).splitlines()[2])
        base       tiny @ 256 px, fingerprint f
    """
    rows = []
    for k in ("name", "format", "domain", "prompt_mode", "samadapt_version", "dtype"):
        if k in info:
            rows.append((k, str(info[k])))
    base = info.get("base", {})
    rows.append(("base", f"{base.get('arch')} @ {base.get('image_size')} px, fingerprint {base.get('fingerprint')}"))
    if base.get("checkpoint"):  # base.checkpoint and base.checkpoint_sha256: the file the core was loaded from
        rows.append(("base file", f"{base['checkpoint']} (sha256 {base.get('checkpoint_sha256', '?')})"))
    dec = info.get("decoder", {})
    rows.append(("decoder", f"{dec.get('policy')}" + (f" (r={dec.get('r')})" if dec.get("policy") == "lora" else "")))
    for c in info.get("config", []):
        if isinstance(c, dict):
            settings = ", ".join(f"{k}={v}" for k, v in c.items() if k != "kind")
            rows.append((f"kind {c.get('kind')}", settings))
    head = next((c for c in info.get("config", []) if isinstance(c, dict) and c.get("kind") == "classes"), None)
    if head and isinstance(head.get("names"), list):  # multi-class adapters: label value = class name
        values = head.get("values") or range(len(head["names"]))
        rows.append(("classes", ", ".join(f"{v}={n}" for v, n in zip(values, head["names"]))))
    rows.append(("tensors", f"{info['tensors']} tensors, {info['parameters']:,} parameters"))
    for k, v in sorted(info["parameters_by_kind"].items()):
        rows.append((f"  {k}", f"{v:,} parameters"))
    rows.append(
        ("size", f"{info['file_bytes']:,} bytes ({info['tensor_bytes']:,} tensor + {info['header_bytes']:,} header)")
    )
    metrics = info.get("metrics")
    if isinstance(metrics, dict):
        flat = metrics.get("eval", metrics)
        if isinstance(flat, dict):
            rows.append(("metrics", "  ".join(f"{k}={v:.4f}" if isinstance(v, (int, float)) else f"{k}={v}"
                                              for k, v in flat.items())))
    if info.get("non_finite"):
        rows.append(("WARNING", f"{len(info['non_finite'])} tensors hold NaN/infinity (e.g. {info['non_finite'][0]}); "
                                "this file will not load"))
    if info.get("recipe"):
        rows.append(("recipe", f"{len(info['recipe'].splitlines())} lines of resolved YAML (--json shows it)"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if tensors:
        tl = info.get("tensor_list", [])
        nw = max((len(t["name"]) for t in tl), default=4)
        lines.append("")
        lines.append(f"{'tensor':<{nw}}  {'shape':<16}  dtype")
        for t in tl:
            lines.append(f"{t['name']:<{nw}}  {'x'.join(map(str, t['shape'])) or '()':<16}  {t['dtype']}")
    return "\n".join(lines)
