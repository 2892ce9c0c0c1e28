"""Loading SAM weights: Meta's `.pth`, the same keys in `.safetensors`, Hugging Face `SamModel`
checkpoints (file or folder) and plain state dicts. Conversions are pure functions over state
dicts, in the spirit of timm's `checkpoint_filter_fn`; loading is strict.
"""
import json
import os
import pickle
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from timm.layers import resample_abs_pos_embed_nhwc
from torch.nn import functional as F

from .build import ARCHS, PATCH_SIZE, SamArch, build_sam
from .checkpoint_file import checkpoint_file
from .sam import Sam

StateDict = Dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message says why and what to do."""


# ---------------------------------------------------------------------------- reading files
def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({e}); is it truncated or of another format?"
        ) from None


def _torch_load_reason(e: Exception) -> str:
    # torch's weights-only refusal starts with advice to re-run with weights_only=False; never give it.
    # Report what was refused (the pickled global) or the unpickler's own complaint instead.
    text = str(e)
    if "Weights only load failed" in text or isinstance(e, pickle.UnpicklingError):
        m = re.search(r"GLOBAL ([\w.]+)", text)
        if m:
            return f"it pickles a non-tensor object ({m.group(1)}), refused without running it"
        m = re.search(r"(Unsupported operand \S+|Unsupported class \S+|[A-Za-z ]*Unpickler error: .+)", text)
        detail = f": {m.group(1).strip()}" if m else ""
        return f"not a pickle of tensors{detail}"
    return text.splitlines()[0] if text else type(e).__name__


def _read_torch(path: Path) -> StateDict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_torch_load_reason(e)}); "
            f"is it truncated, or a pickle of more than tensors?"
        ) from None
    return _unwrap(obj, str(path))


def _unwrap(obj, where: str) -> StateDict:
    # training scripts often nest the weights under "model" or "state_dict"
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where}: holds no state dict of tensors; expected a SAM checkpoint")
    return dict(obj)


def _read_hf_folder(path: Path) -> StateDict:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: StateDict = {}
            for shard in shards:
                sd.update(read_state_dict(path / shard))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return read_state_dict(path / name)
    raise CheckpointError(
        f"{path}: folder holds no model.safetensors or pytorch_model.bin; "
        "point to a SamModel folder or a checkpoint file"
    )


def read_state_dict(source: Union[str, os.PathLike]) -> StateDict:
    """Read tensors from a file or a Hugging Face folder, never unpickling arbitrary objects.

    Args:
        source: a torch file (`.pth`, `.pt`, `.bin`, `.ckpt`), a `.safetensors` file, or a transformers folder.

    Returns:
        The state dict as found (any key convention; `load_sam` converts it).

    Raises:
        CheckpointError: the path is missing or empty, or holds no readable tensors.
    """
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_hf_folder(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file; expected a SAM checkpoint")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt") or head[:2] == b"PK" or head[:1] == b"\x80":
        return _read_torch(path)  # a zip (torch.save) or a legacy torch file
    try:
        return _read_safetensors(path)
    except CheckpointError:
        raise CheckpointError(
            f"{path}: not a checkpoint: neither a torch.save file nor a .safetensors file"
        ) from None


# ---------------------------------------------------------------------------- key conversion
def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """'meta' (segment_anything), 'samadapt' (ours: timm names), or 'hf' (transformers SamModel)."""
    keys = list(sd)
    if any(k.endswith("vision_encoder.patch_embed.projection.weight") for k in keys):
        return "hf"
    if "image_encoder.patch_embed.proj.weight" in sd:
        if any(".mlp.lin1." in k for k in keys if k.startswith("image_encoder.")):
            return "meta"
        return "samadapt"
    sample = ", ".join(keys[:3])
    raise CheckpointError(
        f"not a SAM checkpoint: no image-encoder weights among {len(keys)} keys (e.g. {sample}); "
        f"expected Meta's sam_vit_*.pth, its .safetensors twin, or a transformers SamModel"
    )


def meta_to_samadapt(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Meta's names -> ours: only the image encoder's MLP is named differently in timm."""
    out = {}
    for k, v in sd.items():
        if k.startswith("image_encoder."):
            k = k.replace(".mlp.lin1.", ".mlp.fc1.").replace(".mlp.lin2.", ".mlp.fc2.")
        out[k] = v
    return out


_HF_RULES = [
    (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^vision_encoder\.pos_embed$", "image_encoder.pos_embed"),
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm1\.", r"image_encoder.blocks.\1.norm1."),
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm2\.", r"image_encoder.blocks.\1.norm2."),
    (r"^vision_encoder\.layers\.(\d+)\.mlp\.lin1\.", r"image_encoder.blocks.\1.mlp.fc1."),
    (r"^vision_encoder\.layers\.(\d+)\.mlp\.lin2\.", r"image_encoder.blocks.\1.mlp.fc2."),
    (r"^vision_encoder\.layers\.(\d+)\.attn\.", r"image_encoder.blocks.\1.attn."),
    (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^prompt_encoder\.point_embed\.(\d+)\.", r"prompt_encoder.point_embeddings.\1."),
    (r"^prompt_encoder\.(no_mask_embed|not_a_point_embed)\.", r"prompt_encoder.\1."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    (r"^mask_decoder\.(iou_token|mask_tokens)\.", r"mask_decoder.\1."),
    (r"^mask_decoder\.transformer\.", "mask_decoder.transformer."),
]


def hf_to_samadapt(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Transformers `SamModel` names -> ours. The prompt encoder's copy of the shared positional
    matrix must equal the top-level one (they are tied); it is checked, then dropped.
    """
    prefix = ""
    for k in sd:
        if k.endswith("vision_encoder.patch_embed.projection.weight"):
            prefix = k[: -len("vision_encoder.patch_embed.projection.weight")]
            break
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out: StateDict = {}
    unmatched = []
    shared = sd.get("shared_image_embedding.positional_embedding")
    # MLP heads: proj_in, layers.0..n-3, proj_out -> layers.0..n-1
    head_depth: Dict[str, int] = {}
    for k in sd:
        m = re.match(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.", k)
        if m:
            head_depth[m.group(1)] = max(head_depth.get(m.group(1), 0), int(m.group(2)) + 1)
    for k, v in sd.items():
        if k == "prompt_encoder.shared_embedding.positional_embedding":
            if shared is not None and not torch.equal(shared, v):
                raise CheckpointError("Hugging Face checkpoint: the two copies of the positional matrix differ")
            if shared is None:
                out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = v
            continue
        m = re.match(
            r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|proj_out|layers\.(\d+))\.(.*)$",
            k,
        )
        if m:
            head, part, idx, rest = m.groups()
            n_mid = head_depth.get(head, 0)
            i = 0 if part == "proj_in" else n_mid + 1 if part == "proj_out" else int(idx) + 1
            out[f"{head}.layers.{i}.{rest}"] = v
            continue
        for pat, rep in _HF_RULES:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            unmatched.append(k)
    for k in unmatched:  # left for the strict check to report as unexpected
        out[k] = sd[k]
    return out


def to_samadapt_keys(sd: Mapping[str, torch.Tensor]) -> Tuple[StateDict, str]:
    fmt = detect_format(sd)
    if fmt == "meta":
        return meta_to_samadapt(sd), fmt
    if fmt == "hf":
        return hf_to_samadapt(sd), fmt
    return dict(sd), fmt


# ---------------------------------------------------------------------------- arch detection
def infer_spec(sd: Mapping[str, torch.Tensor]) -> Tuple[SamArch, int]:
    """Read the architecture numbers off the shapes; returns (spec, native image size)."""
    def need(key):
        if key not in sd:
            raise CheckpointError(f"checkpoint lacks {key}; cannot tell its architecture")
        return sd[key]

    embed_dim, _, patch, _ = need("image_encoder.patch_embed.proj.weight").shape
    if patch != PATCH_SIZE:
        raise CheckpointError(f"patch size {patch} is not supported (SAM uses {PATCH_SIZE})")
    grid = need("image_encoder.pos_embed").shape[1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)))
    global_idx, window = [], None
    head_dim = need("image_encoder.blocks.0.attn.rel_pos_h").shape[1]
    for i in range(depth):
        length = need(f"image_encoder.blocks.{i}.attn.rel_pos_h").shape[0]
        if length == 2 * grid - 1:
            global_idx.append(i)
        else:
            window = (length + 1) // 2
    prompt_dim = need("mask_decoder.iou_token.weight").shape[1]
    dec_depth = 1 + max(
        int(m.group(1)) for k in sd if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))
    )
    spec = dict(
        embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim,
        global_attn_indexes=tuple(global_idx), window_size=window or 14,
        prompt_embed_dim=prompt_dim, decoder_depth=dec_depth,
        decoder_mlp_dim=need("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0],
        mask_in_chans=need("prompt_encoder.mask_downscaling.3.weight").shape[0],
        iou_head_hidden_dim=need("mask_decoder.iou_prediction_head.layers.0.weight").shape[0],
    )
    return spec, grid * PATCH_SIZE


def _fits(spec: SamArch, found: Mapping, sd: Mapping[str, torch.Tensor], grid: int) -> bool:
    # Global and windowed blocks are told apart by the arch's own indexes, not by table length:
    # when the grid equals the window (tiny at 128 px, vit_b at 224 px) both lengths are equal.
    if any(getattr(spec, k) != v for k, v in found.items() if k not in ("global_attn_indexes", "window_size")):
        return False
    return all(
        sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]
        == (2 * grid - 1 if i in spec.global_attn_indexes else 2 * spec.window_size - 1)
        for i in range(spec.depth)
    )


def detect_arch(sd: Mapping[str, torch.Tensor]) -> Tuple[str, int]:
    """Name of the known arch whose numbers match the shapes, and the checkpoint's image size."""
    found, native = infer_spec(sd)
    for name, spec in ARCHS.items():
        if _fits(spec, found, sd, native // PATCH_SIZE):
            return name, native
    desc = ", ".join(f"{k}={v}" for k, v in found.items())
    raise CheckpointError(f"checkpoint matches no known arch ({desc}); known: {sorted(ARCHS)}")


# ---------------------------------------------------------------------------- resizing
def _resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    # linear interpolation along the offset axis, as timm's get_rel_pos does at run time
    dtype = rel_pos.dtype
    r = F.interpolate(rel_pos.float().T[None], size=length, mode="linear")[0].T
    return r.to(dtype).contiguous()


def resize_for_image_size(
    sd: StateDict, image_size: int, window_size: int, global_attn_indexes: Optional[Tuple[int, ...]] = None
) -> StateDict:
    """Resample the absolute position table and the global blocks' relative-position tables of a
    checkpoint made at another input size (e.g. 1024 -> 512). Pass `global_attn_indexes` where the
    checkpoint's grid may equal the window (then table lengths cannot tell the blocks apart).
    """
    grid = image_size // PATCH_SIZE
    pos = sd["image_encoder.pos_embed"]
    if pos.shape[1] == grid and pos.shape[2] == grid:
        return sd
    old_grid = pos.shape[1]
    sd = dict(sd)
    sd["image_encoder.pos_embed"] = resample_abs_pos_embed_nhwc(pos, [grid, grid]).contiguous()
    for k in list(sd):
        m = re.match(r"image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]$", k)
        if not m:
            continue
        if global_attn_indexes is not None:
            is_global = int(m.group(1)) in global_attn_indexes
        else:
            is_global = sd[k].shape[0] == 2 * old_grid - 1
        if is_global:
            sd[k] = _resize_rel_pos(sd[k], 2 * grid - 1)
    return sd


# ---------------------------------------------------------------------------- strict loading
def _file_key_names(raw: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """Our key -> the key as the file spells it (conversions keep the tensor objects)."""
    by_id: Dict[int, Optional[str]] = {}
    for k, v in raw.items():
        by_id[id(v)] = k if id(v) not in by_id else None  # a tensor under two names: ambiguous
    return {k: by_id[id(v)] for k, v in converted.items() if by_id.get(id(v))}


def _name_missing(key: str, names: Mapping[str, str], fmt: Optional[str]) -> str:
    # A missing key has no tensor to trace; a converted sibling of the same module gives the file's spelling.
    parent, _, leaf = key.rpartition(".")
    for ours, theirs in names.items():
        if ours.rpartition(".")[0] == parent and ours != theirs:
            return f"{theirs.rpartition('.')[0]}.{leaf}"
    if fmt == "meta" and key.startswith("image_encoder."):
        return key.replace(".mlp.fc1.", ".mlp.lin1.").replace(".mlp.fc2.", ".mlp.lin2.")
    return key


def check_state_dict(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    what: str = "checkpoint",
    names: Optional[Mapping[str, str]] = None,
    fmt: Optional[str] = None,
) -> None:
    """Raise `CheckpointError` naming every missing, unexpected or wrongly shaped key.

    `names` maps our key names to the checkpoint's own (so that messages name keys as the file
    spells them); `fmt` is the detected format.
    """
    names = dict(names or {})
    expected = model.state_dict()
    missing = [_name_missing(k, names, fmt) for k in expected if k not in sd]
    unexpected = [names.get(k, k) for k in sd if k not in expected]
    wrong = [f"{names.get(k, k)}: {tuple(sd[k].shape)} in checkpoint vs {tuple(expected[k].shape)} in model"
             for k in expected if k in sd and sd[k].shape != expected[k].shape]

    def few(xs):
        return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {few(wrong)}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(problems))


def load_sam(
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    arch: Optional[str] = None,
    image_size: Optional[int] = None,
) -> Sam:
    """Build SAM from a checkpoint; format and arch are detected from keys and shapes.

    Args:
        source: path to Meta's `.pth` (e.g. `sam_vit_b_01ec64.pth`), the same keys in a
            `.safetensors` file, a transformers `SamModel` checkpoint (file or folder), or a state dict.
        arch: expected arch (`vit_b`, `vit_l`, `vit_h`, `tiny`); an error if the file holds another.
        image_size: encoder input side; defaults to the checkpoint's. Smaller sizes resample the
            position tables.

    Raises:
        CheckpointError: unreadable file, not a SAM checkpoint, wrong arch, or any missing,
            unexpected or mis-shaped key. No model is returned half-loaded.

    Example:
        >>> import torch, tempfile, os
        >>> from samadapt.sam_core import build_sam, load_sam
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny.pth")
        >>> torch.save(build_sam("tiny").state_dict(), path)
        >>> load_sam(path).arch
        'tiny'
    """
    where = "state dict" if isinstance(source, Mapping) else str(source)
    raw = _unwrap(source, where) if isinstance(source, Mapping) else read_state_dict(source)
    try:
        sd, fmt = to_samadapt_keys(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    names = _file_key_names(raw, sd)
    try:
        detected, native = detect_arch(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if arch is not None and arch != detected:
        raise CheckpointError(f"{where} holds a {detected} model, not {arch}; pass arch={detected!r} or another file")
    size = native if image_size is None else image_size
    sam = build_sam(detected, image_size=size)
    sd = resize_for_image_size(sd, sam.image_size, sam.spec.window_size, sam.spec.global_attn_indexes)
    check_state_dict(sam, sd, what=where, names=names, fmt=fmt)
    expected = sam.state_dict()
    sd = {k: v.to(expected[k].dtype) for k, v in sd.items()}
    sam.load_state_dict(sd, strict=True)
    sam.source_format = fmt
    # which file the weights came from (None for a state dict): adapters record its name and sha256
    sam.checkpoint = None if isinstance(source, Mapping) else checkpoint_file(source)
    return sam.eval()
