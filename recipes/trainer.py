"""Accelerate training and evaluation of adapters on a frozen SAM core.

The loop follows Accelerate's complete example: seed -> model -> trainable params only ->
`prepare` -> `accumulate` -> `backward` -> `gather_for_metrics`; checkpoints hold only what is
trained (adapter tensors), the optimizer, the scheduler, RNG states and the data position, and
resume exactly. Rank 0 writes every file; every file is written to a temporary name and renamed.
"""
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from samadapt import adapters
from samadapt.sam_core import build_sam, load_sam
from samadapt.sam_core.checkpoint import CheckpointError

from . import config as recipe_config
from .losses import CombinedLoss
from .metrics import MetricSuite
from .data.prompts import PromptSampler, append_correction_clicks, box_from_mask
from samadapt.adapters.io import atomic_file

LOWER_IS_BETTER = {"mae", "ber"}
WEIGHTS_DIR = Path(__file__).parent / "weights"
TINY_CORE = WEIGHTS_DIR / "tiny_generic.safetensors"


from .errors import TrainingError  # noqa: E402,F401


# ---------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ---------------------------------------------------------------------------- model
def load_base(base: Optional[str] = None, image_size: Optional[int] = None) -> nn.Module:
    """`base` checkpoint, or the committed pretrained tiny core when None (CLI default)."""
    if base:
        return load_sam(base, image_size=image_size)
    if not TINY_CORE.is_file():
        raise CheckpointError(f"no --base given and the pretrained tiny core {TINY_CORE} is missing; pass --base CKPT")
    return load_sam(TINY_CORE, image_size=image_size)


def build_core(cfg: Dict[str, Any], base: Optional[str] = None) -> nn.Module:
    """The frozen core named by the recipe (`--base` overrides `base.checkpoint`)."""
    b = cfg["base"]
    ckpt = base or b["checkpoint"]
    if ckpt:
        sam = load_sam(ckpt, arch=b["arch"] if base is None and b["checkpoint"] is None else None,
                       image_size=b["image_size"])
        if b["arch"] and sam.arch != b["arch"] and not base:
            raise CheckpointError(f"{ckpt} holds a {sam.arch} model but the recipe says base.arch={b['arch']}")
        if base and b["arch"] and sam.arch != b["arch"]:
            raise CheckpointError(
                f"{ckpt} holds a {sam.arch} model but the recipe is for {b['arch']}; pass a {b['arch']} checkpoint "
                f"or --set base.arch={sam.arch}"
            )
        return sam
    if b["arch"] == "tiny" and b["pretrained_tiny"]:
        if not TINY_CORE.is_file():
            raise CheckpointError(f"the pretrained tiny core {TINY_CORE} is missing; reinstall samadapt or set base.pretrained_tiny=false")
        return load_sam(TINY_CORE, image_size=b["image_size"])
    return build_sam(b["arch"], image_size=b["image_size"])


def pick_multimask(logits: torch.Tensor, iou: torch.Tensor, target: torch.Tensor, loss_fn) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's multimask training: of each sample's candidate masks (B x C x H x W logits, B x C
    predicted IoUs) keep the one with the lowest loss against that sample's target, so only it
    is trained. Returns the B x 1 x H x W logits and B IoU predictions picked."""
    B, C = logits.shape[:2]
    with torch.no_grad():
        per = torch.stack([torch.stack([loss_fn(logits[b:b + 1, j:j + 1], target[b:b + 1], iou[b:b + 1, j])[0]
                                        for j in range(C)]) for b in range(B)])  # B x C
    pick = per.argmin(1)
    rows = torch.arange(B, device=logits.device)
    return logits[rows, pick.to(logits.device)].unsqueeze(1), iou[rows, pick.to(iou.device)]


def set_encoder_attention(sam: nn.Module, attention: str, device: torch.device, bf16: bool = True) -> str:
    """Route the image encoder's attention (`train.attention`); every route computes the same
    function (tests/test_fast_paths.py, tests/test_relpos_attention.py).

    * `timm`: timm's own path (an N x N bias for every global block);
    * `sdpa`: the factorised bias through fused SDPA kernels;
    * `triton`: samadapt's fused Triton kernel for the global blocks, SDPA for the windows (the
      fastest training on an H100: benchmarks/RESULTS.md); off CUDA the SDPA route;
    * `auto`: on CUDA `triton` for a bf16 core on an Ampere or newer GPU (the case measured, on
      an H100), `sdpa` otherwise; elsewhere the encoder is left as built (CPU training gains nothing).
    Returns the route taken.
    """
    from samadapt.sam_core.fast import enable_fast_attention

    if attention == "auto":
        if device.type != "cuda":
            return "as built"
        attention = "triton" if bf16 and torch.cuda.get_device_capability(device) >= (8, 0) else "sdpa"
    if attention == "timm":
        enable_fast_attention(sam, enabled=False)
    elif attention == "sdpa":
        enable_fast_attention(sam, kernel="sdpa")
    else:
        enable_fast_attention(sam, kernel="triton", window_kernel="sdpa")
    return attention


class TrainStep(nn.Module):
    """Wraps the model so the whole step (image encoding + decoding + correction rounds) is one
    `forward` call: DDP/FSDP then see one forward per backward and synchronise gradients."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, images, point_coords=None, point_labels=None, boxes=None, gt=None,
                rounds: int = 0, multimask: bool = False, click_seed: int = 0):
        sam = self.sam
        emb = sam.encode_image(sam.preprocess(images))
        outputs = []
        mask_input = None
        rng = np.random.default_rng(click_seed)
        for r in range(rounds + 1):
            low, iou = sam.decode(emb, point_coords, point_labels, boxes, mask_input, multimask_output=multimask and r == 0)
            outputs.append((low, iou))
            if r < rounds:
                # SAM's iterative training: a click on the previous prediction's error, previous logits as mask input
                best = low[:, :1]
                pred = F.interpolate(best.detach().float(), size=images.shape[-2:], mode="bilinear", align_corners=False) > 0
                point_coords, point_labels = append_correction_clicks(point_coords, point_labels, pred, gt > 0.5, rng)
                point_coords = point_coords.to(images.device)
                point_labels = point_labels.to(images.device)
                mask_input = best.detach()
        return outputs


# ---------------------------------------------------------------------------- data
class _AugmentedItems(Dataset):
    """Applies augmentation with a seed derived from (seed, epoch, index): the same item of the
    same epoch is augmented the same way in every process and after a resume."""

    def __init__(self, base, aug, image_size: int, seed: int) -> None:
        from .data import sam_resize_pad

        self.base, self.aug, self.image_size, self.seed, self.epoch = base, aug, image_size, seed, 0
        self._resize = sam_resize_pad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        image, mask = item["image"], item["mask"]
        if self.aug is not None:
            self.aug.reseed((self.seed * 1_000_003 + self.epoch * 10_007 + i) % (2**31))
            image, mask = self.aug(image, mask)
        out = dict(self._resize(image, mask, self.image_size))
        out["name"] = item.get("name", str(i))
        return out


class EpochSampler(Sampler):
    """A permutation that depends only on (seed, epoch)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def build_datasets(cfg: Dict[str, Any], image_size: int, data_root=None):
    """(train, eval) datasets of SAM-ready items; raises clear errors for bad folders."""
    from .data.augment import build_augmentation
    from .data import FolderDataset
    from .data.synthetic import SyntheticDataset

    d = cfg["data"]
    root = data_root or d["root"]
    domain = cfg["augment"]["domain"] or cfg["domain"] or "generic"
    seed = cfg["train"]["seed"]
    if root:
        common = dict(layout=d["layout"], strict=d["strict"], val_fraction=d["val_fraction"], seed=seed)
        train_raw = FolderDataset(root, split=d["train_split"], **common)
        eval_raw = FolderDataset(root, split=d["eval_split"], **common)
    elif d["synthetic"]:
        s = d["synthetic_image_size"]
        train_raw = SyntheticDataset(d["synthetic"], size=d["synthetic_train_size"], image_size=s, seed=seed)
        eval_raw = SyntheticDataset(d["synthetic"], size=d["synthetic_eval_size"], image_size=s, seed=seed + 10_000)
    else:
        raise recipe_config.RecipeError("no data: pass --data DIR, set data.root, or set data.synthetic to a synthetic domain")
    aug = build_augmentation(domain if domain in ("camouflage", "shadow", "polyp", "generic", "demo") else "generic",
                             image_size, train=True) if cfg["augment"]["enabled"] else None
    return _AugmentedItems(train_raw, aug, image_size, seed), _AugmentedItems(eval_raw, None, image_size, seed)


# ---------------------------------------------------------------------------- evaluation
def eval_prompts(cfg, masks: torch.Tensor, input_sizes: torch.Tensor):
    """Deterministic prompts for evaluation: none, the tight box, or the interior point farthest inside."""
    mode = cfg["prompts"]["mode"]
    if mode == "none":
        return None, None, None
    import cv2

    b = masks.shape[0]
    boxes, coords = [], []
    for i in range(b):
        h, w = int(input_sizes[i, 0]), int(input_sizes[i, 1])
        m = masks[i, 0, :h, :w].cpu().numpy() > 0.5
        boxes.append(box_from_mask(m, jitter=0.0, rng=0))
        if m.any():
            dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
            y, x = np.unravel_index(int(dist.argmax()), dist.shape)
        else:
            y, x = h // 2, w // 2
        coords.append([x, y])
    dev = masks.device
    if mode in ("box", "box+points", "mixed"):
        return None, None, torch.tensor(np.array(boxes), dtype=torch.float32, device=dev)
    return (torch.tensor(coords, dtype=torch.float32, device=dev)[:, None],
            torch.ones(b, 1, dtype=torch.int64, device=dev), None)


@torch.no_grad()
def predict_probs(sam, batch, cfg) -> torch.Tensor:
    """Probability maps B x 1 x S x S in the padded input frame."""
    pc, pl, boxes = eval_prompts(cfg, batch["mask"], batch["input_size"])
    low, iou = sam.forward_masks(batch["image"], pc, pl, boxes, None, multimask_output=False)
    return torch.sigmoid(F.interpolate(low.float(), size=batch["image"].shape[-2:], mode="bilinear", align_corners=False))


def evaluate(accelerator, sam, loader, cfg, adapter_name: Optional[str]) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
    """Metrics of `adapter_name` (None: the frozen core) on the eval loader, gathered over processes."""
    if adapter_name is not None or adapters.attached(sam):
        adapters.activate(sam, adapter_name)
    sam.eval()
    suite = MetricSuite(cfg["eval"]["metrics"] + ([cfg["eval"]["select"]] if cfg["eval"]["select"] not in cfg["eval"]["metrics"] else []))
    kept: Dict[str, np.ndarray] = {}
    n_samples = cfg["eval"]["samples"]
    for batch in loader:
        probs = predict_probs(sam, batch, cfg)
        probs, masks, sizes, idx = accelerator.gather_for_metrics(
            (probs, batch["mask"], batch["input_size"], batch["index"]))
        if accelerator.is_main_process:
            for p, m, s, i in zip(probs, masks, sizes, idx):
                h, w = int(s[0]), int(s[1])
                pm = p[0, :h, :w].cpu().numpy().astype(np.float64)
                gm = m[0, :h, :w].cpu().numpy() > 0.5
                suite.update(np.clip(pm, 0, 1), gm)
                if len(kept) < n_samples:
                    kept[str(int(i))] = pm
    results = suite.results() if accelerator.is_main_process else {}
    return results, kept


def write_overlays(sample_dir: Path, dataset, frozen: Dict[str, np.ndarray], adapted: Dict[str, np.ndarray]) -> None:
    """image | ground truth | frozen core | adapted, masks drawn in red over the image."""
    sample_dir.mkdir(parents=True, exist_ok=True)
    for key, pa in adapted.items():
        item = dataset[int(key)]
        h, w = pa.shape
        img = item["image"][:, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8)
        gt = item["mask"][0, :h, :w].numpy() > 0.5

        def over(m):
            o = img.copy()
            o[m] = (0.45 * o[m] + 0.55 * np.array([255, 40, 40])).astype(np.uint8)
            return o

        tiles = [img, over(gt)]
        if key in frozen:
            tiles.append(over(frozen[key] > 0.5))
        tiles.append(over(pa > 0.5))
        row = np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1)
        buf = _png_bytes(row)
        atomic_write_bytes(sample_dir / f"{item['name']}.png", buf)


def _png_bytes(arr: np.ndarray) -> bytes:
    import io
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def _better(metric: str, new: float, old: Optional[float]) -> bool:
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


# ---------------------------------------------------------------------------- checkpoints
def _rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": repr(random.getstate()),
          "numpy": json.dumps(_np_state())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _set_rng_state(st: Dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(st["torch"])
    random.setstate(ast.literal_eval(st["python"]))
    s = json.loads(st["numpy"])
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def trained_tensors(sam: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in sam.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, sam, optimizer, scheduler, step: int, epoch: int, batch_in_epoch: int,
                    best: Optional[float], keep: int) -> Path:
    """checkpoints/step_N/: trained tensors (safetensors), optimizer + scheduler + RNG (torch.save of
    plain tensors and numbers, read back with weights_only=True), position. Written to a temporary
    folder and renamed."""
    from safetensors.torch import save_file

    ck_root = run_dir / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ck_root))
    try:
        save_file(trained_tensors(sam), str(tmp / "trained.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / "state.pt")
        (tmp / "position.json").write_text(json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best": best}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = sorted(p for p in ck_root.glob("step_*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    cks = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "position.json").exists())
    return cks[-1] if cks else None


def load_checkpoint(path: Path, sam, optimizer, scheduler) -> Dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trained.safetensors"))
    params = dict(sam.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trainable:
        raise TrainingError(f"{path} does not match this run's trainable parameters (different recipe?); "
                            f"start a new output folder or remove {path.parent}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    st = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    pos = json.loads((path / "position.json").read_text())
    pos["rng"] = st["rng"]
    return pos


# ---------------------------------------------------------------------------- the run
def train(cfg: Dict[str, Any], out_dir: Optional[str] = None, data_root=None, base: Optional[str] = None,
          resume: bool = False, progress: bool = True, log=print) -> Dict[str, Any]:
    """Run a validated recipe; returns the metrics dict also written to metrics.json."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    t = cfg["train"]
    run_dir = Path(out_dir or cfg["output"]["dir"] or Path("runs") / cfg["name"])

    # -------- everything that can fail on user input is checked before anything is written
    set_seed(t["seed"])  # before the core is built: a randomly initialised core must be reproducible too
    sam = build_core(cfg, base)
    fp32_fingerprint = sam.fingerprint
    image_size = sam.image_size
    train_ds, eval_ds = build_datasets(cfg, image_size, data_root)
    loss_fn = CombinedLoss({k: v for k, v in cfg["loss"].items() if v > 0})
    if resume and latest_checkpoint(run_dir) is None:
        raise recipe_config.RecipeError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; drop --resume to start fresh")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise recipe_config.RecipeError(f"{run_dir} already holds checkpoints; pass --resume to continue or --out another folder")

    accelerator = Accelerator(
        mixed_precision=t["mixed_precision"],
        gradient_accumulation_steps=t["grad_accum"],
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    set_seed(t["seed"])
    is_main = accelerator.is_main_process

    name = cfg["adapter"]["name"]
    if t["full_core"]:
        for p in sam.parameters():
            p.requires_grad_(True)
    else:
        kinds = [adapters.config(k["kind"], **{kk: vv for kk, vv in k.items() if kk != "kind"}) for k in cfg["adapter"]["kinds"]]
        adapters.attach(sam, kinds, name=name, decoder=cfg["adapter"]["decoder"], decoder_r=cfg["adapter"]["decoder_r"])
        if accelerator.device.type == "cuda" and t["mixed_precision"] == "bf16":
            # the frozen core lives in bf16; adapters keep fp32 master weights
            for p in sam.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    if t["grad_checkpointing"]:
        sam.image_encoder.set_grad_checkpointing(True)
    set_encoder_attention(sam, t["attention"], accelerator.device, bf16=t["mixed_precision"] == "bf16")
    if t["compile"]:
        # the encoder's forward only: the decoder's prompt-dependent shapes would recompile often
        sam.image_encoder.forward_features = torch.compile(sam.image_encoder.forward_features)

    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
    bs = t["batch_size"]
    sampler = EpochSampler(len(train_ds), t["seed"])
    collate = _collate_with_index
    train_dl = DataLoader(_Indexed(train_ds), batch_size=bs, sampler=sampler, collate_fn=collate,
                          num_workers=cfg["data"]["num_workers"], drop_last=len(train_ds) >= bs)
    eval_dl = DataLoader(_Indexed(eval_ds), batch_size=cfg["eval"]["batch_size"], shuffle=False, collate_fn=collate,
                         num_workers=cfg["data"]["num_workers"])
    steps_per_epoch = max(1, math.ceil(len(train_dl) / accelerator.num_processes / t["grad_accum"]))
    total_steps = t["max_steps"] or steps_per_epoch * t["epochs"]
    epochs = math.ceil(total_steps / steps_per_epoch)
    warm = t["warmup_steps"]

    def lr_lambda(step):
        if step < warm:
            return (step + 1) / max(1, warm)
        if t["scheduler"] == "constant":
            return 1.0
        prog = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model = TrainStep(sam)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    sampler_ref = sampler  # ours, to set the epoch (prepare() wraps the batch sampler around it)

    step, start_epoch, skip, best = 0, 0, 0, None
    if resume:
        ck = latest_checkpoint(run_dir)
        pos = load_checkpoint(ck, sam, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                              scheduler.scheduler if hasattr(scheduler, "scheduler") else scheduler)
        step, start_epoch, skip, best = pos["step"], pos["epoch"], pos["batch_in_epoch"], pos["best"]
        _set_rng_state(pos["rng"])
        log(f"resumed from {ck} at step {step} (epoch {start_epoch}, batch {skip})")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # a run killed mid-write leaves only temporary names behind: clear them
        for stale in list(run_dir.glob(".*.tmp")) + list((run_dir / "checkpoints").glob(".tmp-*")):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        atomic_write_text(run_dir / "recipe.yaml", recipe_config.dump(cfg))
        accelerator.init_trackers("train")

    sampler_prompts = PromptSampler(cfg["prompts"]["mode"],
                                    n_pos=cfg["prompts"]["n_pos"], n_neg=cfg["prompts"]["n_neg"],
                                    box_jitter=cfg["prompts"]["box_jitter"], mixed_per="batch") \
        if cfg["prompts"]["mode"] != "none" else None
    rounds = cfg["prompts"]["correction_rounds"]
    metrics_log: Dict[str, Any] = {"baseline": {}, "adapted": {}, "history": []}
    baseline_kept: Dict[str, np.ndarray] = {}
    if cfg["eval"]["baseline"] and not t["full_core"] and not resume:
        res, baseline_kept = evaluate(accelerator, sam, eval_dl, cfg, None)
        adapters.activate(sam, name)
        metrics_log["baseline"] = {"eval": res}
        if is_main:
            log("frozen core:  " + _fmt(res))
    elif resume and (run_dir / "metrics.json").exists():
        metrics_log = json.loads((run_dir / "metrics.json").read_text())

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (progress and accelerator.is_local_main_process), desc="train")
    last_good = latest_checkpoint(run_dir)
    done = step >= total_steps
    for epoch in range(start_epoch, epochs):
        if done:
            break
        sampler_ref.set_epoch(epoch)
        train_ds.epoch = epoch
        model.train()
        # the prepared loader re-seeds its sampler with its own iteration count on every pass:
        # pin it to the epoch so a resumed process sees the same order
        train_dl.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batch_i = skip
        skip = 0
        for batch in loader:
            with accelerator.accumulate(model):
                prompts = sampler_prompts(batch["mask"], batch["input_size"], rng=np.random.default_rng([t["seed"], step, batch_i, accelerator.process_index])) \
                    if sampler_prompts else {"point_coords": None, "point_labels": None, "boxes": None}
                outs = model(batch["image"], prompts["point_coords"], prompts["point_labels"], prompts["boxes"],
                             gt=batch["mask"], rounds=rounds, multimask=cfg["prompts"]["multimask"],
                             click_seed=hash((t["seed"], step, batch_i)) % (2**31))
                loss = 0.0
                for low, iou in outs:
                    logits = F.interpolate(low.float(), size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
                    if logits.shape[1] > 1:  # multimask: each sample trains its best candidate, as SAM does
                        logits, iou = pick_multimask(logits, iou, batch["mask"], loss_fn)
                    l, terms = loss_fn(logits, batch["mask"], iou.float().reshape(-1))
                    loss = loss + l
                loss = loss / len(outs)
                if not torch.isfinite(loss):
                    msg = f"loss became {loss.item()} at step {step}"
                    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                    raise TrainingError(f"{msg}; {kept}; lower train.lr or check the data")
                accelerator.backward(loss)
                if accelerator.sync_gradients and t["max_grad_norm"]:
                    accelerator.clip_grad_norm_(params, t["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            batch_i += 1
            if accelerator.sync_gradients:
                step += 1
                bar.update(1)
                if step % t["log_every"] == 0 or step == 1:
                    accelerator.log({"loss": loss.item(), "lr": scheduler.get_last_lr()[0], **{f"loss/{k}": v.item() for k, v in terms.items()}}, step=step)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if t["checkpoint_every"] and step % t["checkpoint_every"] == 0 and step < total_steps:
                    accelerator.wait_for_everyone()
                    if is_main:
                        last_good = save_checkpoint(run_dir, sam, _inner(optimizer), _inner(scheduler), step, epoch, batch_i, best, t["keep_checkpoints"])
                if step >= total_steps:
                    done = True
                    break
        # -------- evaluation and export at the end of each epoch
        last_epoch = done or epoch == epochs - 1
        if (epoch + 1) % cfg["eval"]["every_epochs"] == 0 or last_epoch:
            res, kept = evaluate(accelerator, sam, eval_dl, cfg, None if t["full_core"] else name)
            model.train()
            if is_main:
                log(f"epoch {epoch + 1}/{epochs} step {step}: " + _fmt(res))
                metrics_log["history"].append({"epoch": epoch + 1, "step": step, "eval": res})
                accelerator.log({f"eval/{k}": v for k, v in res.items()}, step=step)
                sel = cfg["eval"]["select"]
                if _better(sel, res[sel], best):
                    best = res[sel]
                    metrics_log["adapted"] = {"eval": res, "epoch": epoch + 1, "step": step}
                    export(run_dir, sam, cfg, fp32_fingerprint, res)
                write_overlays(run_dir / "samples" / f"epoch_{epoch + 1:03d}", eval_ds, baseline_kept, kept)
                atomic_write_text(run_dir / "metrics.json", json.dumps(metrics_log, indent=2))
        accelerator.wait_for_everyone()
        if is_main and not done:
            last_good = save_checkpoint(run_dir, sam, _inner(optimizer), _inner(scheduler), step, epoch + 1, 0, best, t["keep_checkpoints"])
    bar.close()
    accelerator.wait_for_everyone()
    if is_main:
        last_good = save_checkpoint(run_dir, sam, _inner(optimizer), _inner(scheduler), step, epochs, 0, best, t["keep_checkpoints"])
    accelerator.end_training()
    return metrics_log


def _inner(obj):
    return getattr(obj, "optimizer", None) or getattr(obj, "scheduler", None) or obj


def export(run_dir: Path, sam, cfg, fingerprint: str, res: Dict[str, float]) -> Path:
    """Best adapter (or, for full-core training, the core) with its metrics and resolved recipe."""
    if cfg["train"]["full_core"]:
        from safetensors.torch import save_file

        sd = {k: v.detach().float().cpu().contiguous() for k, v in sam.state_dict().items()}
        with atomic_file(run_dir / "core.safetensors") as tmp:
            save_file(sd, tmp, metadata={"format": "samadapt.core/1", "arch": sam.arch, "metrics": json.dumps(res)})
        return run_dir / "core.safetensors"
    return adapters.save(sam, run_dir / "adapter.safetensors", name=cfg["adapter"]["name"], dtype=cfg["output"]["dtype"],
                         base_fingerprint=fingerprint, domain=cfg["domain"], prompt_mode=cfg["prompts"]["mode"],
                         metrics={"eval": res}, recipe=recipe_config.dump(cfg))


def _fmt(res: Dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in res.items())


class _Indexed(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item["index"] = torch.tensor(i)
        return item


def _collate_with_index(batch):
    from .data import collate_batch

    return collate_batch(batch)
