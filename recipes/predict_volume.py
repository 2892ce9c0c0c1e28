"""Volume inference: a K-class adapter over every slice of a volume, batched, back into the input's frame.

`segment_volume` is the one code path evaluation, `samadapt predict` and the demo use. `run_volume_predict`
is what `samadapt predict scan.nii.gz --adapter organs.safetensors --out DIR` runs: it writes
`DIR/scan_seg.nii.gz`, an integer label map with the input's shape, affine and header (a DICOM folder gives
`DIR/<folder>_seg.nii.gz`), and with `--probs` one float probability volume per foreground class.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple  # noqa: F401

import numpy as np
import torch
from torch.nn import functional as F

from .data.medical import normalise, resize_slice, slice_channels
from .data.volumes import VolumeError, is_volume_input, read_volume, save_like, volume_stem
from .errors import UserError


@torch.no_grad()
def segment_volume(sam, image01: np.ndarray, image_size: Optional[int] = None, channels: str = "repeat",
                   batch_size: int = 8, probs: bool = False, progress: bool = False,
                   desc: str = "slices") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Label every slice (last axis) of a [0, 1] volume with the active adapter's class head.

    Args:
        sam: a core with a `classes` adapter active.
        image01: X x Y x Z intensities in [0, 1] (canonical orientation, see `data.volumes`).
        image_size: the model's input side (default `sam.image_size`).
        channels: `repeat` or `2.5d`, as the adapter was trained.
        batch_size: slices per forward.
        probs: also return the class probabilities (K x X x Y x Z, float16).
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        (class-index map X x Y x Z uint8, probabilities or None).
    """
    from tqdm.auto import tqdm

    from samadapt.adapters import semantic_logits

    size = image_size or sam.image_size
    nx, ny, nz = image01.shape
    labels = np.zeros((nx, ny, nz), np.uint8)
    prob_vol = None
    dev = sam.device
    bar = tqdm(total=nz, desc=desc, disable=not progress, unit="slice")
    for start in range(0, nz, batch_size):
        ks = list(range(start, min(nz, start + batch_size)))
        imgs, hw = [], None
        for k in ks:
            img, hw = resize_slice(slice_channels(image01, k, channels), size)
            imgs.append(torch.from_numpy(img).permute(2, 0, 1))
        batch = torch.stack(imgs).to(dev).float()
        emb = sam.encode_image(sam.preprocess(batch))
        logits = semantic_logits(sam, emb).float()
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        logits = logits[:, :, : hw[0], : hw[1]]  # every slice of a volume has the same in-plane size
        logits = F.interpolate(logits, size=(ny, nx), mode="bilinear", align_corners=False)  # rows = y
        p = logits.softmax(dim=1)
        lab = p.argmax(dim=1).to(torch.uint8).cpu().numpy()  # B x Y x X
        labels[:, :, ks] = lab.transpose(2, 1, 0)
        if probs:
            if prob_vol is None:
                prob_vol = np.zeros((p.shape[1], nx, ny, nz), np.float16)
            prob_vol[:, :, :, ks] = p.cpu().numpy().transpose(1, 3, 2, 0).astype(np.float16)
        bar.update(len(ks))
    bar.close()
    return labels, prob_vol


def adapter_volume_settings(meta: Dict[str, Any]) -> Dict[str, Any]:
    """What an adapter file says about its volumes: class values and names, intensity settings, channels.

    Raises:
        UserError: the adapter has no class head (not a multi-class adapter).
    """
    head = next((c for c in meta.get("config", []) if c.get("kind") == "classes"), None)
    if head is None:
        raise UserError(f"{meta.get('name', 'the adapter')} has no class head, so it cannot label volumes; pass a "
                        "multi-class adapter (e.g. one trained with `samadapt train organs`)")
    names = head["names"]
    values = head.get("values") or list(range(len(names)))
    vol = meta.get("volume") or {}
    if isinstance(vol, str):  # extra metadata fields are stored as JSON text
        try:
            vol = json.loads(vol)
        except ValueError:
            vol = {}
    vol = vol if isinstance(vol, dict) else {}
    return {"classes": dict(zip(values, names)), "volume": vol}


def run_volume_predict(args) -> int:
    """`samadapt predict` for volume inputs (NIfTI files, DICOM folders); see the module docstring.

    Raises:
        UserError: no or a non-multi-class adapter, an unreadable or unsuitable volume, a mix of volumes and
            images, or an `--out` that holds the inputs; checked before anything is written, and each output
            is written under a temporary name, then renamed.
    """
    from samadapt import adapters

    from .model import load_base

    inputs = [str(p) for p in args.images]
    check_volume_inputs(inputs)
    if not args.adapter:
        raise UserError("volumes need a multi-class adapter: pass --adapter FILE (e.g. from `samadapt train organs`)")
    if args.box is not None or args.point or args.prompts or args.auto:
        raise UserError("volume inputs are labelled promptless by the adapter's class head; drop --box/--point/"
                        "--prompts/--auto")
    meta = adapters.inspect(args.adapter)
    settings = adapter_volume_settings(meta)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder")
    for src in inputs:
        if out_dir.exists() and Path(src).resolve().parent == out_dir.resolve():
            raise UserError(f"--out {out_dir} holds the input {src}; choose another folder")
    vols = [read_volume(src) for src in inputs]  # every input read (and checked) before anything is written
    sam = load_base(args.base, image_size=meta["base"].get("image_size"))
    name = adapters.load(sam, args.adapter)
    sam.eval()
    if torch.cuda.is_available():
        sam.to("cuda")
    classes, vs = settings["classes"], settings["volume"]
    values = np.array(sorted(classes), dtype=np.int32)
    norm = {"mode": vs.get("normalise", "auto"), "window": vs.get("window", "abdomen"),
            "level": vs.get("level"), "width": vs.get("width"),
            "percentiles": (vs.get("percentile_low", 0.5), vs.get("percentile_high", 99.5))}
    out_dir.mkdir(parents=True, exist_ok=True)
    for src, vol in zip(inputs, vols):
        modality = vol.meta.get("modality") or vs.get("modality") or "CT"
        img01 = normalise(vol.data, modality, **norm)
        adapters.activate(sam, name)
        idx, probs = segment_volume(sam, img01, channels=vs.get("channels", "repeat"),
                                    batch_size=int(getattr(args, "batch_size", 8) or 8),
                                    probs=bool(getattr(args, "probs", False)), progress=True, desc=Path(src).name)
        labels = values[idx]
        stem = volume_stem(src)
        dtype = np.uint8 if values.max() < 256 else np.int16
        seg = save_like(labels, vol, out_dir / f"{stem}_seg.nii.gz", dtype=dtype)
        if probs is not None:
            for i, v in enumerate(sorted(classes)):
                if v == 0:
                    continue
                safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in classes[v])
                save_like(probs[i].astype(np.float32), vol, out_dir / f"{stem}_prob_{safe}.nii.gz", dtype=np.float32)
        counts = {classes[int(v)]: int((labels == v).sum()) for v in values if v != 0}
        print(f"{src}: {seg}  voxels per class {json.dumps(counts)}")
    return 0


def check_volume_inputs(inputs: List[str]) -> None:
    """Refuse a mix of volumes and 2-D images in one `predict` call (they need different adapters)."""
    kinds = {is_volume_input(p) for p in inputs}
    if len(kinds) > 1:
        raise VolumeError("predict got volumes and 2-D images together; run them in separate calls")
