# why over 500 lines: the one recipe schema (defaults, types, choices, ranges) and its validation, kept together
"""Recipe files: YAML validated against one schema before anything runs.

Every key has a default here; a recipe overrides some. An unknown key is an error that suggests
the nearest valid one, a value of the wrong type is an error naming the expected type, and
`--set a.b=value` overrides any key (the value is parsed as YAML).
"""
import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import yaml

from samadapt.adapters import DECODER_KINDS, KINDS
from samadapt.sam_core import ARCHS

from .data import LAYOUTS
from .data.augment import DOMAINS
from .data.layouts import SPLITS
from .data.medical import CHANNELS as VOLUME_CHANNELS
from .data.medical import CT_WINDOWS, NORMALISE
from .data.prompts import PROMPT_MODES
from .data.synthetic import SYNTHETIC_DOMAINS
from .errors import RecipeError
from .losses import RECIPE_LOSSES
from .metrics import METRICS

ANY = object()  # a leaf that takes any value (e.g. a list of adapter kind settings)

SCHEMA: Dict[str, Any] = {
    "name": "run",
    "domain": "",
    "base": {
        "checkpoint": None,  # SAM checkpoint path (Meta .pth, .safetensors, HF folder); None: see `arch`
        "arch": "tiny",  # one of sam_core.ARCHS: vit_b | vit_l | vit_h | tiny
        "image_size": None,  # encoder input side (None: the checkpoint's / arch's)
        "pretrained_tiny": True,  # tiny with no checkpoint: use the committed pretrained tiny core
    },
    "adapter": {
        "name": "adapter",
        "kinds": ANY,  # list of {kind: ..., setting: value}
        "decoder": "frozen",  # frozen | a decoder kind (adapters.DECODER_KINDS: full | lora)
        "decoder_r": 4,
    },
    "data": {
        "root": None,  # dataset folder(s): a path or a list (or --data)
        "layout": "auto",  # auto or one of data.LAYOUTS (generic, cod10k, camo, istd, sbu, kvasir, ...)
        "train_split": "train",
        "eval_split": "test",
        "val_fraction": 0.1,  # held-out share when a layout has no test split
        "synthetic": None,  # one of synthetic.SYNTHETIC_DOMAINS: generated data instead of a folder
        "synthetic_train_size": 256,
        "synthetic_eval_size": 32,
        "synthetic_image_size": 256,
        "num_workers": 0,
        "strict": True,  # images without masks are an error naming them (false: skip them with a warning)
    },
    "augment": {
        "domain": None,  # augmentation pipeline, one of augment.DOMAINS (None: the recipe's domain)
        "enabled": True,
    },
    "prompts": {
        "mode": "none",  # one of prompts.PROMPT_MODES: none | box | points | box+points | mixed
        "box_jitter": 0.1,  # std of box-side noise, as a fraction of the box side
        "n_pos": 1,
        "n_neg": 0,
        "correction_rounds": 0,  # iterative correction clicks sampled from the previous prediction's errors
        "multimask": False,  # train on the best of 3 masks (ambiguous single-point prompts)
        # mode none only: this share of batches trains with a box or a click on one object instead, so
        # prompts keep working under a promptless adapter; the batches come from keep_prompts_data:
        # "self" (one connected component of the recipe's own masks), a synthetic domain (e.g. objects:
        # generic scenes, the mask one object) or a folder of generic images with one-object masks
        "keep_prompts": 0.0,
        "keep_prompts_data": "self",
    },
    "loss": {name: 0.0 for name in RECIPE_LOSSES},  # weights (losses.RECIPE_LOSSES); 0 disables a term
    "train": {
        "epochs": 10,
        "max_steps": None,  # stop after this many optimizer steps (None: epochs decide)
        "batch_size": 4,
        "grad_accum": 1,
        "lr": 2e-4,
        "weight_decay": 1e-4,
        "scheduler": "cosine",  # cosine | constant
        "warmup_steps": 0,
        "mixed_precision": "no",  # no | bf16 | fp16
        "grad_checkpointing": False,
        "attention": "auto",  # image-encoder attention: auto | timm | sdpa | triton (same function; see sam_core.fast)
        "compile": False,  # torch.compile the image encoder (minutes to compile; pays on long GPU runs)
        "max_grad_norm": 1.0,
        "seed": 0,
        "log_every": 10,
        "checkpoint_every": 100,  # optimizer steps between checkpoints (and at each epoch end; 0: epoch ends only)
        "keep_checkpoints": 2,
        "full_core": False,  # train the whole core instead of adapters (used to pretrain the tiny core)
    },
    "eval": {
        "metrics": ["s_measure", "e_measure_mean", "weighted_f", "mae"],
        "select": "s_measure",  # metric that picks the best epoch
        "every_epochs": 1,
        "baseline": True,  # also evaluate the frozen core
        "samples": 4,  # overlays written per evaluation
        "batch_size": 8,
    },
    # volumes (NIfTI/DICOM; the nnU-Net/MSD layout or image/label pairs) and K-class output: recipes/volumes.py
    "volume": {
        "enabled": False,  # the data are volumes: 2-D slices train a K-class head (class names from dataset.json)
        "layout": "auto",  # auto | nnunet (dataset.json, imagesTr/, labelsTr/) | pairs (image/label NIfTI files)
        "normalise": "auto",  # auto (CT: the window; other modalities: percentiles) | window | percentile | none
        "window": "abdomen",  # CT window by name (data.medical.CT_WINDOWS) ...
        "level": None,  # ... or by level and width in HU (both set: they win over the name)
        "width": None,
        "percentile_low": 0.5,  # MR and other modalities: clip to these percentiles of the volume, then [0, 1]
        "percentile_high": 99.5,
        "channels": "repeat",  # repeat (one slice made three channels) | 2.5d (slices k-1, k, k+1)
        "empty_share": 0.1,  # share of the training slices drawn from slices without any labelled voxel
        "ce": 0.2,  # K-class loss: cross-entropy weight (SAMed: 0.2) ...
        "dice": 0.8,  # ... and Dice weight (SAMed: 0.8); the `loss` section weighs the prompted batches
        "phantoms_train": 0,  # > 0: synthetic CT phantoms (data.medical) instead of data.root: this many for training
        "phantoms_test": 4,  # ... and this many held out
        "nsd_tolerance": 2.0,  # mm, for the NSD metric
        "surface_metrics": True,  # HD95 and NSD in evaluations (false: Dice and IoU only, faster)
        "slice_batch": 8,  # slices per forward at inference
    },
    "output": {
        "dir": None,  # run directory (default runs/<name>)
        "dtype": "fp32",  # adapter file dtype: fp32 | fp16 | bf16
    },
}

NULLABLE_TYPES = {
    ("base", "checkpoint"): str, ("base", "image_size"): int, ("data", "root"): (str, list),
    ("data", "synthetic"): str, ("augment", "domain"): str, ("train", "max_steps"): int, ("output", "dir"): str,
    ("volume", "level"): float, ("volume", "width"): float,
}
# The allowed values of a key come from the registry that defines them, so a new arch, layout,
# domain, prompt mode, adapter kind or metric is a valid recipe value without touching this file.
CHOICES = {
    ("base", "arch"): list(ARCHS),
    ("adapter", "decoder"): ["frozen", *DECODER_KINDS],  # frozen: no decoder part; the rest are decoder kinds
    ("data", "layout"): ["auto", *LAYOUTS],
    ("data", "train_split"): list(SPLITS),
    ("data", "eval_split"): list(SPLITS),
    ("data", "synthetic"): [None, *SYNTHETIC_DOMAINS],
    ("augment", "domain"): [None, *DOMAINS],
    ("prompts", "mode"): list(PROMPT_MODES),
    ("train", "scheduler"): ["cosine", "constant"],
    ("train", "mixed_precision"): ["no", "bf16", "fp16"],
    ("train", "attention"): ["auto", "timm", "sdpa", "triton"],
    ("output", "dtype"): ["fp32", "fp16", "bf16"],
    ("volume", "layout"): ["auto", "nnunet", "pairs"],
    ("volume", "normalise"): list(NORMALISE),
    ("volume", "window"): sorted(CT_WINDOWS),
    ("volume", "channels"): list(VOLUME_CHANNELS),
}

class Range:
    """A numeric leaf's allowed interval (and step): `Range(1)` is >= 1, `Range(0.0, 1.0, hi_open=True)` is [0, 1).

    Every float must also be finite (no NaN or infinity), whatever its range.

    Example:
        >>> Range(0.0, 1.0, hi_open=True).problem(1.0), Range(16, multiple=16).problem(40)
        ('must be in [0.0, 1.0)', 'must be a multiple of 16 and >= 16')
    """

    def __init__(self, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, multiple: int = 0,
                 hint: str = "") -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.multiple, self.hint = multiple, hint

    def describe(self) -> str:
        if self.multiple:
            return f"a multiple of {self.multiple} in [{self.lo}, {self.hi}]" if self.hi else \
                f"a multiple of {self.multiple} and >= {self.lo}"
        if self.lo is not None and self.hi is not None and self.hi != BIG:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"{'<' if self.hi_open else '<='} {self.hi}"

    def problem(self, v) -> Optional[str]:
        """Why `v` is out of range ("must be ..."), or None when it is allowed."""
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        bad = (
            self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
            or self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
            or self.multiple and v % self.multiple
        )
        return f"must be {self.describe()}" if bad else None


BIG = 10**9  # a sanity ceiling for counts (steps, items): far above any real run, far below an overflow
# The range of every numeric leaf (the schema's types say int or float; these say which ones). Floats not
# listed here must still be finite.
RANGES: Dict[tuple, Range] = {
    ("base", "image_size"): Range(64, 4096, multiple=16, hint="the encoder sees image_size/16 patches a side"),
    ("adapter", "decoder_r"): Range(1, 1024),
    ("data", "val_fraction"): Range(0.0, 1.0, lo_open=True, hi_open=True, hint="0.1 holds out 10 %"),
    ("data", "synthetic_train_size"): Range(1, BIG),
    ("data", "synthetic_eval_size"): Range(1, BIG),
    ("data", "synthetic_image_size"): Range(16, 4096),
    ("data", "num_workers"): Range(0, 256, hint="0 loads in the main process"),
    ("prompts", "box_jitter"): Range(0.0, 1.0, hint="0.1 = 10 % of the box side"),
    ("prompts", "n_pos"): Range(0, 256),
    ("prompts", "n_neg"): Range(0, 256),
    ("prompts", "correction_rounds"): Range(0, 64),
    ("prompts", "keep_prompts"): Range(0.0, 1.0, hint="a share of batches, e.g. 0.5"),
    **{("loss", k): Range(0.0, 1e6, hint="0 disables the term") for k in RECIPE_LOSSES},
    ("train", "epochs"): Range(1, BIG),
    ("train", "max_steps"): Range(1, BIG, hint="or null: the epochs decide"),
    ("train", "batch_size"): Range(1, 65536),
    ("train", "grad_accum"): Range(1, 65536),
    ("train", "lr"): Range(0.0, 10.0, lo_open=True, hint="e.g. 2e-4"),
    ("train", "weight_decay"): Range(0.0, 10.0),
    ("train", "warmup_steps"): Range(0, BIG),
    ("train", "max_grad_norm"): Range(0.0, 1e9, hint="0 turns clipping off"),
    ("train", "seed"): Range(0, 2**32 - 1),
    ("train", "log_every"): Range(1, BIG),
    ("train", "checkpoint_every"): Range(0, BIG, hint="0: at epoch ends only"),
    ("train", "keep_checkpoints"): Range(0, BIG, hint="0 keeps them all"),
    ("eval", "every_epochs"): Range(1, BIG),
    ("eval", "samples"): Range(0, 10000),
    ("eval", "batch_size"): Range(1, 65536),
    ("volume", "level"): Range(-5000.0, 5000.0, hint="HU, e.g. 40 for the abdomen"),
    ("volume", "width"): Range(0.0, 10000.0, lo_open=True, hint="HU, e.g. 400 for the abdomen"),
    ("volume", "percentile_low"): Range(0.0, 100.0, hi_open=True, hint="e.g. 0.5"),
    ("volume", "percentile_high"): Range(0.0, 100.0, lo_open=True, hint="e.g. 99.5"),
    ("volume", "empty_share"): Range(0.0, 1.0, hi_open=True, hint="0.1: a tenth of the slices are empty"),
    ("volume", "ce"): Range(0.0, 1e6, hint="0 disables the term"),
    ("volume", "dice"): Range(0.0, 1e6, hint="0 disables the term"),
    ("volume", "phantoms_train"): Range(0, 100000, hint="0: read data.root"),
    ("volume", "phantoms_test"): Range(1, 100000),
    ("volume", "nsd_tolerance"): Range(0.0, 1000.0, hint="mm"),
    ("volume", "slice_batch"): Range(1, 4096),
}
# Names that end up in paths and module names: the run name (runs/<name>) and the adapter's name.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# Common spellings from other trainers -> our key (the nearest-key suggestion alone can mislead: learning_rate
# is closer to weight_decay than to lr as strings).
ALIASES = {
    "learning_rate": "lr", "lr_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "epoch": "epochs",
    "steps": "max_steps", "num_steps": "max_steps", "bs": "batch_size", "batchsize": "batch_size",
    "batch": "batch_size", "gradient_accumulation_steps": "grad_accum", "accumulate": "grad_accum",
    "wd": "weight_decay",
    "warmup": "warmup_steps", "clip_grad_norm": "max_grad_norm", "grad_clip": "max_grad_norm",
    "precision": "mixed_precision", "workers": "num_workers", "size": "image_size",
}
ADAPTER_KINDS = list(KINDS)  # adapter.kinds[*].kind (checked by `adapters.config`, which names them)
METRIC_NAMES = list(METRICS)  # eval.metrics and eval.select


def _paths(schema: Dict[str, Any], prefix=()) -> List[tuple]:
    out = []
    for k, v in schema.items():
        if isinstance(v, dict):
            out.extend(_paths(v, prefix + (k,)))
        else:
            out.append(prefix + (k,))
    return out


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _suggest(bad: str, candidates: Iterable[str]) -> str:
    near = difflib.get_close_matches(bad, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


def _show(v: Any, limit: int = 60) -> str:
    """A value as an error message shows it: its repr, cut to `limit` characters (a value may be huge).

    Example:
        >>> _show(10**100)[-14:], _show("ok")
        ('...(101 chars)', "'ok'")
    """
    text = repr(v)
    return text if len(text) <= limit else f"{text[:limit - 16]}...({len(text)} chars)"


def _check(node: Any, schema: Dict[str, Any], prefix: tuple, errors: List[str]) -> Dict[str, Any]:
    if not isinstance(node, dict):
        errors.append(f"{'.'.join(prefix) or 'recipe'} must be a mapping, got {type(node).__name__}")
        return copy.deepcopy(schema)
    out = {}
    for k, v in node.items():
        path = prefix + (k,)
        dotted = ".".join(path)
        if k not in schema:
            full = [".".join(p) for p in _paths(SCHEMA)]
            alias = ALIASES.get(str(k))
            hint = (f"; did you mean {'.'.join(prefix + (alias,))!r}?" if alias in schema
                    else _suggest(dotted, full) or _suggest(str(k), schema))
            errors.append(f"unknown key {dotted!r}{hint}")
            continue
        default = schema[k]
        if isinstance(default, dict):
            out[k] = _check(v, default, path, errors)
            continue
        if default is ANY:
            out[k] = v
            continue
        expected = NULLABLE_TYPES.get(path) if default is None else type(default)
        if v is not None or default is not None:
            before = len(errors)
            if v is None and default is not None:
                errors.append(f"{dotted} may not be null; give a {type(default).__name__} like {_show(default)}")
            elif expected is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v) if abs(v) < 2**1023 else math.inf  # past float range: refused below as not finite
            elif expected is float and isinstance(v, str) and _is_float(v):
                v = float(v)  # YAML 1.1 reads 1e-4 (no dot) as a string
            elif (
                expected is not None
                and not isinstance(v, expected)
                or isinstance(v, bool)
                and expected in (int, float)
            ):
                name = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
                errors.append(f"{dotted}={_show(v)} should be {'an' if name[0] in 'aeiou' else 'a'} {name}")
            if (len(errors) == before and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and expected in (int, float)):
                rule = RANGES.get(path, Range())
                problem = rule.problem(v)
                if problem:
                    errors.append(f"{dotted}={_show(v)} {problem}" + (f" ({rule.hint})" if rule.hint else ""))
        if path in CHOICES and v not in CHOICES[path]:
            errors.append(
                f"{dotted}={_show(v)} is not one of {CHOICES[path]}{_suggest(str(v), [str(c) for c in CHOICES[path]])}"
            )
        out[k] = v
    for k, default in schema.items():
        if k not in out and not any(e.startswith(f"unknown key {'.'.join(prefix + (k,))!r}") for e in errors):
            out[k] = copy.deepcopy(default) if default is not ANY else []
    return out


def _default(parts: List[str]) -> Any:
    """The schema default at a dotted path (None where the path is unknown)."""
    node: Any = SCHEMA
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def set_value(raw: Dict[str, Any], assignment: str) -> None:
    """Apply one `a.b=value` override (the value parsed as YAML) to a raw (unvalidated) recipe dict.

    Args:
        raw: the recipe dict, changed in place.
        assignment: `key.path=value`, as `--set` takes it.

    Raises:
        RecipeError: no `=` in `assignment`.

    Example:
        >>> raw = {}; set_value(raw, "train.epochs=3"); set_value(raw, "train.mixed_precision=no"); raw
        {'train': {'epochs': 3, 'mixed_precision': 'no'}}
    """
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r} needs the form key.path=value, e.g. train.lr=1e-4")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, bool) and isinstance(_default(parts), str):
        parsed = value.strip()  # YAML 1.1 reads no/yes/on/off as booleans: `train.mixed_precision=no` means "no"
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = parsed


def _cross_field(cfg: Dict[str, Any]) -> List[str]:
    """The rules between keys, and the string values that end up in paths and module names."""
    from samadapt.adapters.base import is_valid_name

    from .data.prompts import PromptSampler

    errors = []
    if not _RUN_NAME.match(cfg["name"]):
        errors.append(f"name={cfg['name']!r} names the run folder (runs/<name>): use letters, digits, '.', '_' "
                      "and '-', starting with a letter or digit, e.g. cod-lora")
    if not is_valid_name(cfg["adapter"]["name"]):
        errors.append(f"adapter.name={cfg['adapter']['name']!r} is not a valid adapter name: start with a letter, "
                      "then letters, digits, '_' or '-', e.g. cod-v2")
    root = cfg["data"]["root"]
    if isinstance(root, list) and (not root or not all(isinstance(r, str) and r for r in root)):
        errors.append(f"data.root={root!r} should be a folder path or a non-empty list of folder paths")
    elif isinstance(root, str) and not root.strip():
        errors.append("data.root is empty; give a dataset folder or null")
    for key in ("train_split", "eval_split"):
        if not cfg["data"][key].strip():
            errors.append(f"data.{key} is empty; give a split name such as 'train' or 'test'")
    p = cfg["prompts"]
    try:
        PromptSampler(p["mode"], n_pos=p["n_pos"], n_neg=p["n_neg"], box_jitter=p["box_jitter"])
    except ValueError as e:
        errors.append(f"prompts: {e}")
    if p["mode"] in ("points", "box+points", "mixed") and p["n_pos"] + p["n_neg"] < 1:
        errors.append(f"prompts.mode={p['mode']!r} needs at least one point: set prompts.n_pos >= 1")
    errors.extend(_volume_rules(cfg))
    if cfg["train"]["full_core"] and cfg["adapter"]["kinds"]:
        errors.append("train.full_core trains the whole core: remove adapter.kinds (or set full_core false)")
    return errors


def _volume_rules(cfg: Dict[str, Any]) -> List[str]:
    """The `volume` section's rules between keys."""
    v, errors = cfg["volume"], []
    if (v["level"] is None) != (v["width"] is None):
        errors.append("volume.level and volume.width go together (a CT window in HU, e.g. 40 and 400); set both "
                      "or neither")
    if v["percentile_low"] >= v["percentile_high"]:
        errors.append(f"volume.percentile_low={v['percentile_low']} must be below volume.percentile_high="
                      f"{v['percentile_high']}, e.g. 0.5 and 99.5")
    if not v["enabled"]:
        return errors
    if v["ce"] + v["dice"] <= 0:
        errors.append("volume.ce and volume.dice are both 0: the K-class head would learn nothing; e.g. 0.2 and 0.8")
    if cfg["prompts"]["mode"] != "none":
        errors.append(f"volume.enabled trains a promptless K-class head: set prompts.mode none (not "
                      f"{cfg['prompts']['mode']!r}); prompts.keep_prompts keeps box and click prompts working")
    if cfg["data"]["synthetic"] is not None:
        errors.append("volume.enabled reads volumes: use volume.phantoms_train for synthetic CT instead of "
                      "data.synthetic")
    if any(isinstance(k, dict) and k.get("kind") == "classes" for k in cfg["adapter"]["kinds"] or []):
        errors.append("adapter.kinds lists 'classes': with volume.enabled the class head is added from the "
                      "dataset's labels; remove it from adapter.kinds")
    if cfg["train"]["full_core"]:
        errors.append("volume.enabled trains adapters and a class head; set train.full_core false")
    return errors


def validate(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Check a raw recipe dict against the schema: types, choices (from the registries) and cross-field rules.

    Args:
        raw: the recipe as read from YAML (with overrides applied).

    Returns:
        The recipe with every default filled in.

    Raises:
        RecipeError: listing every problem, each with its fix (nearest key, allowed values).

    Example:
        >>> validate({"adapter": {"kinds": [{"kind": "lora"}]}, "loss": {"dice": 1}})["train"]["scheduler"]
        'cosine'
    """
    errors: List[str] = []
    cfg = _check(raw or {}, SCHEMA, (), errors)
    if not errors:
        kinds = cfg["adapter"]["kinds"]
        if not isinstance(kinds, list):
            errors.append("adapter.kinds must be a list of {kind: ..., ...} mappings")
        else:
            from samadapt import adapters

            for i, k in enumerate(kinds):
                if not isinstance(k, dict) or "kind" not in k:
                    errors.append(f"adapter.kinds[{i}] must be a mapping with a 'kind' key")
                    continue
                settings = {kk: vv for kk, vv in k.items() if kk != "kind"}
                try:
                    adapters.config(k["kind"], **settings)
                except (ValueError, TypeError) as e:
                    errors.append(f"adapter.kinds[{i}]: {e}")
        if (not cfg["train"]["full_core"] and not kinds and cfg["adapter"]["decoder"] == "frozen"
                and not cfg["volume"]["enabled"]):  # volume recipes always train their class head
            errors.append("nothing to train: add adapter.kinds or set adapter.decoder to full or lora")
        if sum(cfg["loss"].values()) <= 0:
            errors.append(
                "every loss weight is 0; set at least one of " + ", ".join(f"loss.{k}" for k in SCHEMA["loss"])
            )
        bad = [m for m in cfg["eval"]["metrics"] if m not in METRICS]
        if bad:
            errors.append(f"eval.metrics {bad} unknown; choose from {sorted(METRICS)}")
        if cfg["eval"]["select"] not in METRICS:
            errors.append(f"eval.select={cfg['eval']['select']!r} unknown; choose from {sorted(METRICS)}")
        kp = cfg["prompts"]["keep_prompts"]  # its range is in RANGES
        if kp > 0 and cfg["prompts"]["mode"] != "none":
            errors.append("prompts.keep_prompts is for promptless recipes (prompts.mode none); "
                          "a prompted recipe keeps its prompts already: set it to 0")
        errors.extend(_cross_field(cfg))
    if errors:
        errors = [e if len(e) <= 300 else e[:280] + "...(cut)" for e in errors]  # one readable line
        if len(errors) == 1:
            raise RecipeError(f"recipe: {errors[0]}")
        raise RecipeError("recipe has %d problems: %s" % (len(errors), "; ".join(errors)))
    return cfg


BUILTIN = Path(__file__).parent / "configs"


def resolve_path(recipe: Union[str, Path]) -> Path:
    """A recipe file path, or the name of a built-in recipe in `recipes/configs/` (`demo`, `camouflage`, ...).

    Raises:
        RecipeError: neither a file nor a built-in name (the names are listed).

    Example:
        >>> resolve_path("demo").parent.name
        'configs'
    """
    p = Path(recipe)
    if p.is_file():
        return p
    builtin = BUILTIN / f"{p.stem if p.suffix in ('.yaml', '.yml') else p.name}.yaml"
    if p.parent == Path(".") and builtin.is_file():
        return builtin
    names = sorted(x.stem for x in BUILTIN.glob("*.yaml"))
    raise RecipeError(f"recipe {str(recipe)!r} not found; give a YAML path or one of {names}")


def load_recipe(recipe: Union[str, Path, Dict[str, Any]], overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """Read, override and validate a recipe.

    Example:
        >>> from samadapt.recipes.config import load_recipe
        >>> load_recipe("demo", ["train.lr=1e-3"])["train"]["lr"]
        0.001
    """
    if isinstance(recipe, dict):
        raw = copy.deepcopy(recipe)
    else:
        path = resolve_path(recipe)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for o in overrides or []:
        set_value(raw, o)
    return validate(raw)


def dump(cfg: Dict[str, Any]) -> str:
    """The recipe as YAML, keys in schema order (what `recipe.yaml` and adapter files record)."""
    return yaml.safe_dump(cfg, sort_keys=False)
