"""Training and evaluating K-class adapters on volumes (recipes with `volume.enabled`, e.g. `organs`).

The loop reads like `train.py`'s, smaller: seed -> core -> adapters + the class head (names from
dataset.json) -> trainable parameters only -> `prepare` -> per batch either the promptless K-class
forward (cross-entropy + Dice, `volume.ce` / `volume.dice`, SAMed's 0.2 / 0.8) or, with probability
`prompts.keep_prompts`, a box or click on one organ through SAM's own prompt path (the `loss` section's
terms), so the same adapter keeps answering prompts with class-agnostic masks -> AdamW with warm-up
(`build_scheduler`) -> evaluation on held-out volumes (per class and per volume: Dice, IoU, HD95, NSD at
`volume.nsd_tolerance` mm) -> the best state exported with its classes and intensity settings.

Held-out volumes: `labelsTs/` when the dataset has it, else `data.val_fraction` of the labelled cases
(seeded). Checkpoints and `--resume` work as for `train.py`'s runs (`checkpointing`); the sampler's
generator state at the epoch's start travels in the checkpoint, so the slice order continues exactly.
"""
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from samadapt import adapters

from . import config as recipe_config
from .data.medical import (
    PHANTOM_CLASSES,
    Case,
    SliceDataset,
    VolumeCache,
    collate_slices,
    find_volume_dataset,
    write_phantom_dataset,
)
from .errors import RecipeError
from .predict_volume import segment_volume
from .volume_eval import evaluate_volumes, format_class_table, prompt_ious


# ---------------------------------------------------------------------------- data
def norm_settings(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The `normalise` keyword arguments of a recipe's `volume` section.

    Example:
        >>> from samadapt.recipes.config import load_recipe
        >>> norm_settings(load_recipe("organs"))["window"]
        'abdomen'
    """
    v = cfg["volume"]
    return {"mode": v["normalise"], "window": v["window"], "level": v["level"], "width": v["width"],
            "percentiles": (v["percentile_low"], v["percentile_high"])}


def volume_data(cfg: Dict[str, Any], data_root=None, work_dir: Optional[Path] = None, write: bool = True):
    """The dataset a volume recipe names: (train cases, held-out cases, classes, modality, cache).

    Phantoms (`volume.phantoms_train` > 0) are written under `work_dir/phantoms` first (with `write`
    false they are read from there: the other processes of a group, after the main one wrote them).

    Raises:
        RecipeError: no data given.
        VolumeError: the layout or a file is unusable (one line naming the file and the fix).
    """
    v = cfg["volume"]
    root = data_root or cfg["data"]["root"]
    if isinstance(root, (list, tuple)):
        if len(root) != 1:
            raise RecipeError(f"a volume recipe reads one dataset folder, got {len(root)}: {list(root)}")
        root = root[0]
    if v["phantoms_train"] > 0 and root is None:
        root = Path(work_dir or ".") / "phantoms"
        if write:
            root = write_phantom_dataset(root, n_train=v["phantoms_train"], n_test=v["phantoms_test"],
                                         seed=cfg["train"]["seed"], name="")
    if root is None:
        raise RecipeError("no volumes: give --data DIR (nnU-Net/MSD layout or image/label NIfTI pairs) or set "
                          "volume.phantoms_train for synthetic CT phantoms")
    ds = find_volume_dataset(root, v["layout"])
    train_cases, held = list(ds.train), []
    labelled_test = Path(ds.root) / "labelsTs"
    if ds.test and labelled_test.is_dir():
        held = [Case(c.case_id, c.images, labelled_test / f"{c.case_id}.nii.gz") for c in ds.test
                if (labelled_test / f"{c.case_id}.nii.gz").is_file()]
    if not held:
        rng = random.Random(cfg["train"]["seed"])
        order = list(range(len(train_cases)))
        rng.shuffle(order)
        n = max(1, int(round(cfg["data"]["val_fraction"] * len(train_cases)))) if len(train_cases) > 1 else 0
        held = [train_cases[i] for i in sorted(order[:n])]
        train_cases = [train_cases[i] for i in sorted(order[n:])]
    cache = VolumeCache(norm_settings(cfg), ds.modality, list(ds.classes))
    return train_cases, held, ds.classes, ds.modality, cache


# ---------------------------------------------------------------------------- losses
def multiclass_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - the mean over classes of the soft Dice of softmax(logits) against one-hot labels (SAMed's DiceLoss:
    every class, background included).

    Example:
        >>> lab = torch.tensor([[[0, 1], [1, 0]]])
        >>> round(multiclass_dice_loss(F.one_hot(lab, 2).permute(0, 3, 1, 2).float() * 50, lab).item(), 4)
        0.0
    """
    k = logits.shape[1]
    p = logits.float().softmax(dim=1)
    onehot = F.one_hot(labels.long(), k).permute(0, 3, 1, 2).float()
    inter = (p * onehot).sum(dim=(0, 2, 3))
    denom = p.square().sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


class SemanticStep(nn.Module):
    """The training forward as one module call (DDP sees one forward per backward): promptless K-class
    logits, or SAM's prompted decode when prompts are given.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, images, point_coords=None, point_labels=None, boxes=None, prompted: bool = False):
        sam = self.sam
        emb = sam.encode_image(sam.preprocess(images))
        if prompted:
            return sam.decode(emb, point_coords, point_labels, boxes)
        return adapters.semantic_logits(sam, emb), None


def _one_organ(labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Per sample, the mask of one connected piece of one class present (B x 1 x S x S float), for prompts."""
    import cv2

    out = torch.zeros(labels.shape[0], 1, *labels.shape[-2:])
    for i, lab in enumerate(labels.cpu().numpy()):
        present = [c for c in np.unique(lab) if c != 0]
        if not present:
            continue
        m = (lab == rng.choice(present)).astype(np.uint8)
        n, comp = cv2.connectedComponents(m)
        if n > 2:
            sizes = np.bincount(comp.ravel())[1:]
            m = (comp == 1 + int(rng.choice(len(sizes), p=sizes / sizes.sum()))).astype(np.uint8)
        out[i, 0] = torch.from_numpy(m.astype(np.float32))
    return out


# ---------------------------------------------------------------------------- the run
def attach_with_head(sam, cfg: Dict[str, Any], classes: Dict[int, str]) -> str:
    """The recipe's adapter kinds plus the class head (names and values from the dataset), attached."""
    kinds = [adapters.config(k["kind"], **{kk: vv for kk, vv in k.items() if kk != "kind"})
             for k in cfg["adapter"]["kinds"]]
    kinds.append(adapters.config("classes", names=[classes[k] for k in sorted(classes)], values=sorted(classes)))
    name = cfg["adapter"]["name"]
    adapters.attach(sam, kinds, name=name, decoder=cfg["adapter"]["decoder"], decoder_r=cfg["adapter"]["decoder_r"])
    return name


def volume_meta(cfg: Dict[str, Any], modality: str) -> Dict[str, Any]:
    """The intensity settings an adapter file records, so `predict` prepares volumes as training did."""
    v = cfg["volume"]
    return {k: v[k] for k in ("normalise", "window", "level", "width", "percentile_low", "percentile_high",
                              "channels")} | {"modality": modality}


def train_volumes(cfg: Dict[str, Any], out_dir: Optional[str] = None, data_root=None, base: Optional[str] = None,
                  resume: bool = False, progress: bool = True, log=print,
                  allow_random_base: bool = False) -> Dict[str, Any]:
    """Run a validated volume recipe (see the module docstring); writes `adapter.safetensors`,
    `metrics.json` (with per-volume metrics), `recipe.yaml`, `per_volume.json` and checkpoints (every
    `train.checkpoint_every` steps and at each epoch's end) in the run directory.

    Args:
        cfg: the validated recipe (`volume.enabled`).
        out_dir: the run directory (default `output.dir` or `runs/<name>`).
        data_root: the dataset folder, overriding `data.root`.
        base: a SAM checkpoint, overriding `base.checkpoint`.
        resume: continue from the run directory's latest checkpoint; the result equals a run that was
            never stopped (the slice order, the random states and the evaluation history are restored).
        progress: show a progress bar.
        log: where progress lines go.
        allow_random_base: train on a randomly initialised full-size core (`--allow-random-base`).

    Raises:
        RecipeError: bad data, or a resume that does not fit the run directory.
        TrainingError: the loss became non-finite, or the run directory is in use.
    """
    import contextlib

    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .checkpointing import (
        atomic_write_text,
        check_resume,
        check_writable,
        clear_stale_temporaries,
        latest_checkpoint,
        load_checkpoint,
        run_lock,
        save_checkpoint,
    )
    from .data.prompts import PromptSampler
    from .distributed import build_accelerator, describe, full_parameters, peer_failures
    from .loop import LossWatch
    from .losses import CombinedLoss
    from .model import build_core
    from .train import build_scheduler, launched_mixed_precision

    cfg = recipe_config.validate(cfg)
    t, p = cfg["train"], cfg["prompts"]
    run_dir = Path(out_dir or cfg["output"]["dir"] or Path("runs") / cfg["name"])
    check_writable(run_dir)
    check_resume(run_dir, resume)
    set_seed(t["seed"])
    sam = build_core(cfg, base, allow_random_base=allow_random_base)
    fingerprint = sam.fingerprint
    t["mixed_precision"] = launched_mixed_precision(t["mixed_precision"])
    # the group `accelerate launch` asked for (distributed.py); rank 0 writes every file
    accelerator = build_accelerator(mixed_precision=t["mixed_precision"], gradient_accumulation_steps=t["grad_accum"])
    is_main = accelerator.is_main_process
    with accelerator.main_process_first():  # phantoms: written once, by the main process
        train_cases, held, classes, modality, cache = volume_data(cfg, data_root, run_dir, write=is_main)
    train_ds = SliceDataset(train_cases, cache, classes, sam.image_size, cfg["volume"]["channels"],
                            cfg["volume"]["empty_share"], seed=t["seed"])
    if is_main:
        log(f"volumes: {len(train_cases)} training ({train_ds.n_foreground} slices with organs + "
            f"{train_ds.n_empty} empty), {len(held)} held out; classes {classes}")
    set_seed(t["seed"])
    name = attach_with_head(sam, cfg, classes)
    params = [q for q in sam.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
    g = torch.Generator().manual_seed(t["seed"])  # the slice order: its state at an epoch's start decides it
    dl = torch.utils.data.DataLoader(train_ds, batch_size=t["batch_size"], shuffle=True, generator=g,
                                     collate_fn=collate_slices, drop_last=len(train_ds) >= t["batch_size"])
    # each process takes every num_processes-th batch (the prepared loader): that many steps make its epoch
    steps_per_epoch = max(1, math.ceil(len(dl) / accelerator.num_processes / t["grad_accum"]))
    total = t["max_steps"] or steps_per_epoch * t["epochs"]
    scheduler = build_scheduler(optimizer, t["scheduler"], t["warmup_steps"], total)
    model, optimizer, dl = accelerator.prepare(SemanticStep(sam), optimizer, dl)
    params = [q for q in model.parameters() if q.requires_grad]  # FSDP2 replaces them by sharded ones
    dist = describe(accelerator, model)
    prompt_loss = CombinedLoss({k: w for k, w in cfg["loss"].items() if w > 0})
    sampler = PromptSampler("mixed", n_pos=1, n_neg=0, box_jitter=p["box_jitter"], mixed_per="batch")
    v = cfg["volume"]
    metrics_log: Dict[str, Any] = {"classes": {str(k): n for k, n in classes.items()}, "history": []}
    if is_main:
        log(f"distributed: {dist['strategy']}, {dist['num_processes']} processes on {dist['num_machines']} "
            f"machines (backend {dist['backend']})")
    with run_lock(run_dir) if is_main else contextlib.nullcontext(), \
            peer_failures(accelerator, lambda: latest_checkpoint(run_dir)):
        if is_main:
            check_resume(run_dir, resume, locked=True)  # again under the lock: another run may have started
            clear_stale_temporaries(run_dir)
        step, start_epoch, skip, best, spent = 0, 0, 0, None, 0.0
        if resume:
            ck = latest_checkpoint(run_dir)
            pos = load_checkpoint(accelerator, model, optimizer, scheduler, ck)  # trained, optimizer, RNG
            step, start_epoch, skip, best = pos["step"], pos["epoch"], pos["batch_in_epoch"], pos["best"]
            g.set_state((pos["loop"] or {})["generator"])
            if (run_dir / "metrics.json").is_file():
                metrics_log = json.loads((run_dir / "metrics.json").read_text())
                spent = metrics_log.get("train_seconds", 0.0)
            if is_main:
                log(f"resumed from {ck} at step {step} (epoch {start_epoch}, batch {skip})")
        else:
            if is_main:
                atomic_write_text(run_dir / "recipe.yaml", recipe_config.dump(cfg))
            if cfg["eval"]["baseline"]:
                # the adapter as attached changes nothing: the frozen core, its promptless mask for every class
                with full_parameters(model):  # every process evaluates (the same weights); rank 0 writes
                    metrics_log["baseline"] = evaluate_volumes(sam, held, cache, classes, cfg, name)
                if is_main:
                    log("frozen core (untrained head) mean Dice: %.3f" % metrics_log["baseline"]["mean"]["dice"])
        metrics_log["distributed"] = {k: v for k, v in dist.items() if k != "backend"}
        t0 = time.time()
        watch = LossWatch()  # read at log steps, checkpoints and evaluations only
        last_good = latest_checkpoint(run_dir)

        def checkpoint(epoch_, batch_, epoch_start):  # every process (each saves its random states)
            watch.check(last_good)
            metrics_log["train_seconds"] = round(spent + time.time() - t0, 1)
            if is_main:
                atomic_write_text(run_dir / "metrics.json", json.dumps(metrics_log, indent=2))
            return save_checkpoint(accelerator, model, optimizer, scheduler, run_dir, step, epoch_, batch_, best,
                                   t["keep_checkpoints"], loop={"generator": epoch_start})

        bar = tqdm(total=total, initial=step, disable=not (progress and accelerator.is_local_main_process),
                   desc="train")
        epochs = math.ceil(total / steps_per_epoch)
        for epoch in range(start_epoch, epochs):
            if step >= total:
                break
            model.train()
            epoch_start = g.get_state()  # the sampler draws this epoch's order from g when iteration starts
            loader = accelerator.skip_first_batches(dl, skip) if skip else dl
            for batch_i, batch in enumerate(loader, start=skip):
                rng = np.random.default_rng([t["seed"], step, batch_i])
                with accelerator.accumulate(model):
                    images = batch["image"].float()
                    labels = batch["labels"]
                    if p["keep_prompts"] > 0 and rng.random() < p["keep_prompts"] and (labels > 0).any():
                        target = _one_organ(labels, rng).to(images.device)
                        pr = sampler(target, batch["input_size"], rng=rng)
                        low, iou = model(images, pr["point_coords"], pr["point_labels"], pr["boxes"], prompted=True)
                        logits = F.interpolate(low.float(), size=target.shape[-2:], mode="bilinear",
                                               align_corners=False)
                        loss, _ = prompt_loss(logits, target, iou.float().reshape(-1))
                    else:
                        low, _ = model(images)
                        logits = F.interpolate(low.float(), size=labels.shape[-2:], mode="bilinear",
                                               align_corners=False)
                        loss = (v["ce"] * F.cross_entropy(logits, labels.long())
                                + v["dice"] * multiclass_dice_loss(logits, labels))
                    watch.see(loss, step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t["max_grad_norm"]:
                        accelerator.clip_grad_norm_(params, t["max_grad_norm"])
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    step += 1
                    bar.update(1)
                    if step % t["log_every"] == 0:
                        watch.check(last_good)
                        bar.set_postfix(loss=f"{loss.item():.4f}")
                    if t["checkpoint_every"] and step % t["checkpoint_every"] == 0 and step < total:
                        last_good = checkpoint(epoch, batch_i + 1, epoch_start)
                if step >= total:
                    break
            skip = 0
            watch.check(last_good)
            last = step >= total or epoch == epochs - 1
            if (epoch + 1) % cfg["eval"]["every_epochs"] == 0 or last:
                with full_parameters(model):  # every process evaluates the same weights; rank 0 writes
                    res = evaluate_volumes(sam, held, cache, classes, cfg, name)
                    model.train()
                    metrics_log["history"].append({"epoch": epoch + 1, "step": step, "mean": res["mean"]})
                    if is_main:
                        log(f"epoch {epoch + 1}/{epochs} step {step}: mean Dice {res['mean']['dice']:.3f}")
                    if best is None or res["mean"]["dice"] > best:
                        best = res["mean"]["dice"]
                        metrics_log["adapted"] = res
                        if is_main:
                            adapters.save(sam, run_dir / "adapter.safetensors", name=name,
                                          dtype=cfg["output"]["dtype"], base_fingerprint=fingerprint,
                                          domain=cfg["domain"], prompt_mode="none",
                                          classes={str(k): n for k, n in classes.items()},
                                          volume=volume_meta(cfg, modality),
                                          metrics={"eval": {f"{k}_mean": x for k, x in res["mean"].items()}},
                                          recipe=recipe_config.dump(cfg))
                            atomic_write_text(run_dir / "per_volume.json", json.dumps(res["per_volume"], indent=2))
            # the next epoch's order is drawn from g's state now
            last_good = checkpoint(epoch + 1, 0, g.get_state())
        bar.close()
        metrics_log["train_seconds"] = round(spent + time.time() - t0, 1)
        if is_main:
            atomic_write_text(run_dir / "metrics.json", json.dumps(metrics_log, indent=2))
        accelerator.wait_for_everyone()
    adapters.activate(sam, name)
    return metrics_log


def run_volume_eval(args, cfg: Dict[str, Any]) -> int:
    """`samadapt eval` for volume recipes: a per-class table (frozen core with the untrained head, and the
    adapter) and per-volume metrics written to `--json` (default: printed only).
    """
    from .checkpointing import atomic_write_text
    from .model import build_core

    sam = build_core(cfg, args.base, allow_random_base=bool(getattr(args, "allow_random_base", False)))
    work = Path(args.json).parent if args.json else Path(".")
    _, held, classes, modality, cache = volume_data(cfg, args.data, work)
    rows: Dict[str, Dict[str, Any]] = {}
    if args.adapter:
        loaded = adapters.load(sam, args.adapter)
        if not adapters.has_class_head(sam, loaded):
            raise RecipeError(f"{args.adapter} has no class head; volume recipes evaluate multi-class adapters")
        from .predict_volume import adapter_volume_settings

        file_classes = adapter_volume_settings(adapters.inspect(args.adapter))["classes"]
        if file_classes and file_classes != classes:
            raise RecipeError(f"{args.adapter} was trained for classes {file_classes}, the data has {classes}")
        rows["adapted"] = evaluate_volumes(sam, held, cache, classes, cfg, loaded)
    else:
        rows["frozen core"] = evaluate_volumes(sam, held, cache, classes, cfg, attach_with_head(sam, cfg, classes))
    names = [classes[k] for k in sorted(classes) if k != 0]
    print(f"{len(held)} held-out volumes")
    for metric in next(iter(rows.values()))["mean"]:
        print(format_class_table(rows, names, metric))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(rows, indent=2))
        print(f"per-volume metrics: {args.json}")
    return 0


__all__ = ["train_volumes", "evaluate_volumes", "run_volume_eval", "segment_volume", "multiclass_dice_loss",
           "PHANTOM_CLASSES", "format_class_table", "prompt_ious", "volume_data", "attach_with_head", "norm_settings"]
