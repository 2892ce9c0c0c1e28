"""The image encoder's route on a CPU: bf16 where the CPU has native bf16 matrix units, else fp32,
both with the factorised attention of `fast.attention` (the same function as timm's, exact in fp32).

`SamPredictor` (and through it `AdapterBank`, `SamAutomaticMaskGenerator`, `samadapt predict` and
`samadapt serve`) encodes images inside `encoder_route(sam, route)`, where `route` comes from
`choose_route`:

* `bf16`: the encoder runs under CPU bf16 autocast (matrix products, convolutions and attention in
  bf16, weights cast on the fly, so adapters attached in fp32 -- LoRA, DoRA, sam_adapter,
  bottleneck, merged or not -- keep working), and the embedding is handed to the decoder in the
  model's dtype. Taken by `auto` when the CPU has AVX-512 bf16 or AMX bf16 (x86) or the bf16
  extension (Arm) and the encoder input is at least `MIN_BF16_IMAGE_SIZE` px: below it the bf16
  kernels' fixed costs outweigh what they save (the tiny core at 256 px encoded in 0.45 s under bf16
  against 0.13 s in fp32 on the 2-core AMX machine of benchmarks/RESULTS.md; at 1024 px bf16 was 2.4x
  faster for the tiny core and 2.2x for vit_b).
* `fp32`: the encoder in the model's own dtype with the factorised attention.
* `as built` (`SamPredictor(fast=False)`, or a model on another device): nothing changed.

Masks under `bf16` agree with fp32 segment_anything on >= 99 % of pixels for points, boxes and
box + points (tests/test_cpu_route.py; the measured agreement is in benchmarks/RESULTS.md).

The setting: `SamPredictor(sam, precision=...)` / `AdapterBank(sam, precision=...)`, the CLI's
`--precision`, else the environment variable `SAMADAPT_PRECISION`; each `auto` (default), `bf16`
or `fp32`.

Example:
    >>> from samadapt.sam_core import build_sam
    >>> from samadapt.sam_core.fast import choose_route
    >>> choose_route(build_sam("tiny"), "fp32").precision
    'fp32'
"""
import contextlib
import dataclasses
import os
import threading
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from .attention import enable_fast_attention, fast_attention_enabled

__all__ = [
    "BATCH", "ENV_PRECISION", "MIN_BF16_IMAGE_SIZE", "MIN_SINGLE_IMAGE_SIZE", "PRECISIONS", "EncoderRoute",
    "choose_route", "cpu_features", "encoder_batch", "encoder_route", "native_bf16", "resolve_precision",
]

PRECISIONS = ("auto", "bf16", "fp32")
ENV_PRECISION = "SAMADAPT_PRECISION"
# below this input side the tiny core (and vit_b at 256 px) gained nothing from bf16 (module docstring)
MIN_BF16_IMAGE_SIZE = 512
# images per encoder call where batching pays; on a CPU from this input side one image per call is
# faster (encoder_batch)
BATCH = 8
MIN_SINGLE_IMAGE_SIZE = 512


def _cpuinfo_flags() -> set:
    """The first CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(val.split())
    except OSError:
        pass
    return set()


def _torch_probe(name: str) -> Optional[bool]:
    fn = getattr(getattr(torch, "cpu", None), name, None)
    if fn is None:
        return None
    try:
        return bool(fn())
    except Exception:  # a torch build without the probe's backend: fall back to the flags
        return None


def cpu_features() -> Dict[str, object]:
    """What this CPU offers the encoder, read from torch's own probes (cpuinfo flags as fallback).

    Returns:
        `{"capability": torch's vector ISA ("AVX512", "AVX2", "DEFAULT", ...), "avx512_bf16": bool,
        "amx_bf16": bool, "arm_bf16": bool}`.

    Example:
        >>> from samadapt.sam_core.fast import cpu_features
        >>> sorted(cpu_features())
        ['amx_bf16', 'arm_bf16', 'avx512_bf16', 'capability']
    """
    flags = _cpuinfo_flags()
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old torch
        capability = "unknown"
    avx512_bf16 = _torch_probe("_is_avx512_bf16_supported")
    amx = _torch_probe("_is_amx_tile_supported")
    return {
        "capability": capability,
        "avx512_bf16": bool(avx512_bf16 if avx512_bf16 is not None else "avx512_bf16" in flags),
        # torch probes AMX tiles, not their bf16 part: the flag says it where /proc/cpuinfo exists
        "amx_bf16": "amx_bf16" in flags if flags else bool(amx),
        "arm_bf16": "bf16" in flags,
    }


def native_bf16(features: Optional[Dict[str, object]] = None) -> bool:
    """Whether the CPU multiplies bf16 matrices natively (AVX-512 bf16, AMX bf16, or Arm's bf16).

    Args:
        features: `cpu_features()` (None: read now).

    Example:
        >>> native_bf16({"capability": "AVX2", "avx512_bf16": False, "amx_bf16": False, "arm_bf16": False})
        False
    """
    f = cpu_features() if features is None else features
    return bool(f.get("avx512_bf16") or f.get("amx_bf16") or f.get("arm_bf16"))


def resolve_precision(precision: Optional[str] = None) -> str:
    """The precision setting in force: `precision` if given, else `$SAMADAPT_PRECISION`, else `auto`.

    Raises:
        ValueError: not one of `PRECISIONS` (the message names the source and the values allowed).

    Example:
        >>> resolve_precision("FP32")
        'fp32'
    """
    source = "precision"
    if precision is None:
        precision, source = os.environ.get(ENV_PRECISION, "").strip() or "auto", ENV_PRECISION
    value = str(precision).strip().lower()
    if value not in PRECISIONS:
        raise ValueError(f"{source}={precision!r} is not a precision; use one of {list(PRECISIONS)} "
                         "(fp32 forces full precision)")
    return value


@dataclasses.dataclass(frozen=True)
class EncoderRoute:
    """How `SamPredictor` runs the image encoder.

    Attributes:
        device: `cpu`, `cuda`, ...
        precision: `bf16` (autocast), `fp32`, or `as built` (the model's own dtype, untouched).
        attention: `factorised` (`fast.enable_fast_attention`) or `as built`.
        reason: why this route was taken, in words.
    """

    device: str
    precision: str
    attention: str
    reason: str

    def describe(self) -> str:
        """One line for logs, e.g. `cpu bf16 autocast, factorised attention (auto: the CPU has amx_bf16)`."""
        prec = "bf16 autocast" if self.precision == "bf16" else self.precision
        return f"{self.device} {prec}, {self.attention} attention ({self.reason})"


def choose_route(sam: nn.Module, precision: Optional[str] = None, fast: bool = True,
                 features: Optional[Dict[str, object]] = None) -> EncoderRoute:
    """The encoder route for `sam` on its device under a precision setting.

    Args:
        sam: the `Sam`.
        precision: `auto`, `bf16` or `fp32` (None: `$SAMADAPT_PRECISION`, else `auto`).
        fast: False leaves the encoder as built (the route of `SamPredictor(fast=False)`).
        features: `cpu_features()` (None: read now; tests pass their own).

    Returns:
        The `EncoderRoute`.

    Raises:
        ValueError: an unknown precision.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> r = choose_route(sam, "auto", features={"avx512_bf16": False})
        >>> r.precision, r.attention
        ('fp32', 'factorised')
    """
    setting = resolve_precision(precision)
    device = sam.pixel_mean.device.type if hasattr(sam, "pixel_mean") else "cpu"
    if not fast:
        return EncoderRoute(device, "as built", "as built", "fast=False")
    if device != "cpu":
        return EncoderRoute(device, "as built", "as built", f"not a CPU; {device} runs the model as it is")
    if setting == "fp32":
        return EncoderRoute(device, "fp32", "factorised", "fp32 asked for")
    if setting == "bf16":
        return EncoderRoute(device, "bf16", "factorised", "bf16 asked for")
    f = cpu_features() if features is None else features
    if not native_bf16(f):
        return EncoderRoute(device, "fp32", "factorised", "auto: the CPU has no native bf16 matrix units")
    have = next(k for k in ("amx_bf16", "avx512_bf16", "arm_bf16") if f.get(k))
    size = int(getattr(sam, "image_size", 0))
    if size < MIN_BF16_IMAGE_SIZE:
        return EncoderRoute(device, "fp32", "factorised",
                            f"auto: the CPU has {have}, but at {size} px fp32 is faster")
    return EncoderRoute(device, "bf16", "factorised", f"auto: the CPU has {have}")


def encoder_batch(sam: nn.Module) -> int:
    """How many images to encode per call on `sam`'s device: `BATCH`, except 1 on a CPU from
    `MIN_SINGLE_IMAGE_SIZE` px.

    On the 2-core machine of benchmarks/RESULTS.md, per image, a batch of 8 against one at a time:
    tiny at 256 px (fp32) 0.36-0.74x (the fixed cost per call dominates), vit_b at 256 px 1.01-1.02x,
    tiny at 1024 px (bf16) 1.11-1.14x, vit_b at 512 px 1.19x and at 1024 px 1.3-1.5x (bf16): from 512 px
    the batch's activations outgrow the caches. On a GPU a batch fills the device.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> encoder_batch(build_sam("tiny")), encoder_batch(build_sam("tiny", image_size=512))
        (8, 1)
    """
    device = sam.pixel_mean.device.type if hasattr(sam, "pixel_mean") else "cpu"
    if device == "cpu" and int(getattr(sam, "image_size", 0)) >= MIN_SINGLE_IMAGE_SIZE:
        return 1
    return BATCH


_LOCK = threading.Lock()
_HOLDERS: Dict[int, int] = {}  # id(encoder) -> encoder_route contexts that switched it and are open


@contextlib.contextmanager
def encoder_route(sam: nn.Module, route: EncoderRoute) -> Iterator[None]:
    """Run `sam.encode_image` calls inside this block on `route`.

    The factorised attention is switched on for the block (unless the model already has a fast
    attention route of its own, which is kept) and back off after the last open block ends, so the
    model is left as it was; bf16 autocast is thread-local, so decoders running on other threads
    stay in their precision.

    Args:
        sam: the `Sam`.
        route: from `choose_route`.

    Example:
        >>> import torch
        >>> from samadapt.sam_core import build_sam
        >>> from samadapt.sam_core.fast import fast_attention_enabled
        >>> sam = build_sam("tiny")
        >>> with torch.no_grad(), encoder_route(sam, choose_route(sam, "bf16")):
        ...     emb = sam.encode_image(torch.zeros(1, 3, 256, 256))
        >>> emb.dtype, fast_attention_enabled(sam)
        (torch.bfloat16, False)
    """
    enc = getattr(sam, "image_encoder", sam)
    switched = False
    if route.attention == "factorised":
        with _LOCK:
            if _HOLDERS.get(id(enc)):
                _HOLDERS[id(enc)] += 1
                switched = True
            elif not fast_attention_enabled(enc):
                enable_fast_attention(enc)
                _HOLDERS[id(enc)] = 1
                switched = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=route.precision == "bf16"):
            yield
    finally:
        if switched:
            with _LOCK:
                _HOLDERS[id(enc)] -= 1
                if not _HOLDERS[id(enc)]:
                    del _HOLDERS[id(enc)]
                    enable_fast_attention(enc, enabled=False)
