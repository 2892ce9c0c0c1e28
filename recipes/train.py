"""Accelerate training of adapters on a frozen SAM core: the loop of `samadapt train`.

`train` reads top to bottom like Accelerate's `complete_nlp_example.py`: seed -> model -> trainable
params only -> `prepare` -> `accumulate` -> `backward` -> `gather_for_metrics` (in `evaluate`), and the
model is unwrapped before anything is saved. `accelerate launch` settings are honoured: its mixed
precision wins over the recipe's; the group it asks for is formed in `distributed`. Checkpoints
(adapter-only, the same files under every strategy) and resume live in `checkpointing`, the model in
`model`, evaluation in `evaluate`. Rank 0 writes every file.
"""
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from samadapt import adapters
from samadapt.adapters.io import atomic_file

from . import config as recipe_config
from .checkpointing import (
    atomic_write_text,
    check_resume,
    clear_stale_temporaries,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .data import collate_batch
from .data.pipeline import IndexedDataset, build_datasets, build_keep_prompts_data, describe_datasets
from .data.prompts import PromptSampler, one_component
from .distributed import build_accelerator, describe, full_parameters, peer_failures
from .errors import RecipeError
from .evaluate import evaluate, format_metrics, is_better, write_overlays
from .loop import EpochSampler, LossWatch, StepRate, to_device
from .losses import CombinedLoss, pick_multimask
from .model import TrainStep, adapt_core, build_core
from .rundir import check_writable, run_lock


# ---------------------------------------------------------------------------- schedule and precision
def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int):
    """The learning-rate schedule of `train.scheduler`, from `torch.optim.lr_scheduler`.

    A linear warmup over `warmup_steps` steps (factor `(step + 1) / warmup_steps`), then `cosine`
    (decay to 0 at `total_steps`) or `constant`.

    Args:
        optimizer: the optimizer whose learning rate is scheduled.
        kind: `cosine` or `constant`.
        warmup_steps: steps of linear warmup (0: none).
        total_steps: the run's length in scheduler steps.

    Returns:
        A torch scheduler.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = build_scheduler(opt, "cosine", warmup_steps=2, total_steps=6)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(sched.get_last_lr()[0], 4)); opt.step(); sched.step()
        >>> lrs
        [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464]
    """
    from torch.optim import lr_scheduler

    if kind not in ("cosine", "constant"):
        raise RecipeError(f"train.scheduler={kind!r} is not one of ['cosine', 'constant']")
    if kind == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=0.0)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps <= 0:
        return main
    if warmup_steps == 1:  # factor (0 + 1) / 1 = 1 for one step, then the main schedule starts
        warm = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        warm = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0,
                                     total_iters=warmup_steps - 1)
    return lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])


def launched_mixed_precision(recipe_value: str, warn=None) -> str:
    """The mixed precision a run uses: `accelerate launch --mixed_precision` (its environment variable
    `ACCELERATE_MIXED_PRECISION`) wins over the recipe's `train.mixed_precision`, with a warning line
    when they disagree; without a launcher the recipe decides.

    Args:
        recipe_value: `train.mixed_precision`.
        warn: called with the warning line (default: print it to stderr).

    Returns:
        `no`, `bf16` or `fp16`.

    Example:
        >>> import os
        >>> os.environ.pop("ACCELERATE_MIXED_PRECISION", None) and None
        >>> launched_mixed_precision("bf16")
        'bf16'
    """
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if not launched or launched == recipe_value:
        return recipe_value
    (warn or (lambda line: print(line, file=sys.stderr)))(
        f"warning: accelerate launch says --mixed_precision {launched} but the recipe says "
        f"train.mixed_precision={recipe_value}; using {launched} (the launch setting wins)")
    return launched


# ---------------------------------------------------------------------------- export
def export(run_dir: Path, sam, cfg: Dict[str, Any], fingerprint: str, res: Dict[str, float]) -> Path:
    """Write the best adapter (or, for full-core training, the core) with its metrics and resolved recipe.

    Args:
        run_dir: the run directory.
        sam: the unwrapped core.
        cfg: the validated recipe.
        fingerprint: the fp32 core's fingerprint (the adapter's `base`).
        res: the evaluation metrics of this state.

    Returns:
        The file written.
    """
    if cfg["train"]["full_core"]:
        from safetensors.torch import save_file

        sd = {k: v.detach().float().cpu().contiguous() for k, v in sam.state_dict().items()}
        with atomic_file(run_dir / "core.safetensors") as tmp:
            save_file(sd, tmp, metadata={"format": "samadapt.core/1", "arch": sam.arch, "metrics": json.dumps(res)})
        return run_dir / "core.safetensors"
    return adapters.save(sam, run_dir / "adapter.safetensors", name=cfg["adapter"]["name"],
                         dtype=cfg["output"]["dtype"], base_fingerprint=fingerprint, domain=cfg["domain"],
                         prompt_mode=cfg["prompts"]["mode"], metrics={"eval": res}, recipe=recipe_config.dump(cfg))


def hparams(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The recipe as flat `section/key` hyperparameters for TensorBoard (lists and None as text).

    Example:
        >>> from samadapt.recipes.config import load_recipe
        >>> h = hparams(load_recipe("demo"))
        >>> h["train/lr"], h["adapter/decoder"], h["adapter/kinds"][:23]
        (0.003, 'full', "[{'kind': 'sam_adapter'")
    """
    out: Dict[str, Any] = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + "/")
            elif isinstance(v, (bool, int, float, str)):
                out[key] = v
            else:
                out[key] = str(v)

    walk(cfg, "")
    return out


def evaluate_aside(accelerator, sam, eval_dl, cfg: Dict[str, Any], adapter_name: Optional[str]):
    """`evaluate`, with the random state put back afterwards: iterating a loader draws from torch's
    generator, so without this the evaluation schedule (`eval.every_epochs`, `eval.baseline`) would
    change the training's later draws (dropout), and a run that stopped at an epoch it evaluated would
    continue differently from one that ran through it without evaluating.
    """
    devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return evaluate(accelerator, sam, eval_dl, cfg, adapter_name)


def log_overlays(accelerator, rows: Dict[str, np.ndarray], step: int) -> None:
    """The evaluation's overlay rows (image | ground truth | frozen | adapted) as TensorBoard images."""
    tracker = accelerator.get_tracker("tensorboard", unwrap=False)
    if hasattr(tracker, "log_images"):
        tracker.log_images({f"samples/{name}": row[None] for name, row in rows.items()}, step=step,
                           dataformats="NHWC")


# ---------------------------------------------------------------------------- the run
def train(cfg: Dict[str, Any], out_dir: Optional[str] = None, data_root=None, base: Optional[str] = None,
          resume: bool = False, progress: bool = True, log=print, allow_random_base: bool = False) -> Dict[str, Any]:
    """Run a validated recipe.

    Args:
        cfg: the validated recipe (`config.load_recipe`).
        out_dir: the run directory (default `output.dir` or `runs/<name>`).
        data_root: dataset folder(s), overriding `data.root`.
        base: a SAM checkpoint, overriding `base.checkpoint`.
        resume: continue from the run directory's latest checkpoint.
        progress: show a progress bar.
        log: where progress lines go.
        allow_random_base: train on a randomly initialised full-size core when no checkpoint is given
            (`--allow-random-base`; otherwise that is refused naming `--base`).

    Returns:
        The metrics dict also written to `metrics.json` (`baseline`, `adapted`, `history`).

    Raises:
        RecipeError: bad data, or a resume that does not fit the run directory.
        TrainingError: the loss became non-finite, or the run directory is in use.

    Example (shell):
        samadapt train demo --out runs/demo
    """
    from accelerate.utils import ProjectConfiguration, set_seed

    cfg = recipe_config.validate(cfg)  # the CLI's checks for Python callers too (a validated recipe passes unchanged)
    t = cfg["train"]
    run_dir = Path(out_dir or cfg["output"]["dir"] or Path("runs") / cfg["name"])

    # -------- everything that can fail on user input is checked before anything is written
    check_writable(run_dir)
    check_resume(run_dir, resume)
    set_seed(t["seed"])  # before the core is built: a randomly initialised core must be reproducible too
    sam = build_core(cfg, base, allow_random_base=allow_random_base)
    fp32_fingerprint = sam.fingerprint
    train_ds, eval_ds = build_datasets(cfg, sam.image_size, data_root)
    data_lines = describe_datasets(cfg, train_ds, eval_ds, data_root)
    keep_data = build_keep_prompts_data(cfg, sam.image_size) if cfg["prompts"]["keep_prompts"] > 0 else None
    loss_fn = CombinedLoss({k: v for k, v in cfg["loss"].items() if v > 0})
    mixed_precision = launched_mixed_precision(t["mixed_precision"])
    t["mixed_precision"] = mixed_precision  # recipe.yaml and the adapter record what the run used

    accelerator = build_accelerator(  # forms the group the launch asked for (distributed.py)
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t["grad_accum"],
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    set_seed(t["seed"])
    is_main = accelerator.is_main_process

    # -------- model, trainable params only
    name = cfg["adapter"]["name"]
    adapt_core(sam, cfg, accelerator.device, mixed_precision)
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
    bs = t["batch_size"]
    sampler = EpochSampler(len(train_ds), t["seed"])
    # pinned host batches on CUDA: the loop's copies to the device are asynchronous (`to_device`)
    train_dl = DataLoader(IndexedDataset(train_ds), batch_size=bs, sampler=sampler, collate_fn=collate_batch,
                          num_workers=cfg["data"]["num_workers"], drop_last=len(train_ds) >= bs,
                          pin_memory=accelerator.device.type == "cuda")
    eval_dl = DataLoader(IndexedDataset(eval_ds), batch_size=cfg["eval"]["batch_size"], shuffle=False,
                         collate_fn=collate_batch, num_workers=cfg["data"]["num_workers"])
    steps_per_epoch = max(1, math.ceil(len(train_dl) / accelerator.num_processes / t["grad_accum"]))
    total_steps = t["max_steps"] or steps_per_epoch * t["epochs"]
    epochs = math.ceil(total_steps / steps_per_epoch)
    # not prepared: Accelerate's scheduler steps num_processes times per optimizer step, and a schedule
    # counted in those ticks runs half a step off a single process's (warmup 1/2W instead of 1/W at first)
    scheduler = build_scheduler(optimizer, t["scheduler"], t["warmup_steps"], total_steps)

    # -------- prepare
    model = TrainStep(sam)
    # the training batches stay on the host until the loop copies them (`to_device`): prompts are drawn
    # from the host copy, so nothing is read back from the device; prepared first, as it always was
    # (the order of a checkpoint's loader states)
    train_dl = accelerator.prepare_data_loader(train_dl, device_placement=False)
    model, optimizer, eval_dl = accelerator.prepare(model, optimizer, eval_dl)
    # FSDP2 replaces the parameters by sharded ones: clip the gradients the optimizer steps
    params = [p for p in model.parameters() if p.requires_grad]
    dist = describe(accelerator, model)
    if is_main:
        for line in data_lines:
            log(line)
        log(f"distributed: {dist['strategy']}, {dist['num_processes']} processes on {dist['num_machines']} "
            f"machines (backend {dist['backend']})")

    # -------- the run directory is locked from the resume on (rank 0 writes every file)
    with run_lock(run_dir) if is_main else contextlib.nullcontext():
        if is_main:
            check_resume(run_dir, resume, locked=True)  # again under the lock: another run may have started meanwhile
        step, start_epoch, skip, best = 0, 0, 0, None
        if resume:
            ck = latest_checkpoint(run_dir)
            pos = load_checkpoint(accelerator, model, optimizer, scheduler, ck)  # trained, optimizer, RNG
            step, start_epoch, skip, best = pos["step"], pos["epoch"], pos["batch_in_epoch"], pos["best"]
            log(f"resumed from {ck} at step {step} (epoch {start_epoch}, batch {skip})")
        with peer_failures(accelerator, lambda: latest_checkpoint(run_dir)):  # a dead peer: one clear line
            metrics_log = _run(accelerator, model, optimizer, scheduler, train_dl, eval_dl, train_ds, eval_ds,
                               sampler, loss_fn, params, cfg, run_dir, name, fp32_fingerprint, resume, progress,
                               log, step, start_epoch, skip, best, total_steps, epochs, keep_data, dist)
    if is_main:
        for f in ("core.safetensors" if t["full_core"] else "adapter.safetensors", "metrics.json", "recipe.yaml",
                  "checkpoints", "samples", "logs"):
            p = run_dir / f
            if p.is_file():
                log(f"wrote {p}  ({p.stat().st_size:,} bytes)")
            elif p.is_dir():
                log(f"wrote {p}{os.sep}  ({sum(1 for _ in p.rglob('*') if _.is_file())} files)")
    return metrics_log


def _run(accelerator, model, optimizer, scheduler, train_dl, eval_dl, train_ds, eval_ds, sampler, loss_fn, params,
         cfg, run_dir, name, fp32_fingerprint, resume, progress, log, step, start_epoch, skip, best, total_steps,
         epochs, keep_data=None, dist=None) -> Dict[str, Any]:
    """The epochs of `train`, run while the run directory is locked."""
    from tqdm.auto import tqdm

    t = cfg["train"]
    is_main = accelerator.is_main_process
    sam = accelerator.unwrap_model(model).sam  # what is saved and evaluated: the unwrapped core

    def checkpoint(epoch_, batch_):  # every process: each saves its own RNG states
        watch.check(last_good)  # never a checkpoint of the state a non-finite step left
        rate.pause()  # the write is not training time
        return save_checkpoint(accelerator, model, optimizer, scheduler, run_dir, step, epoch_, batch_, best,
                               t["keep_checkpoints"])

    if is_main:
        clear_stale_temporaries(run_dir)  # a run killed mid-write leaves only temporary names behind
        atomic_write_text(run_dir / "recipe.yaml", recipe_config.dump(cfg))
        accelerator.init_trackers("train", config=hparams(cfg))

    p = cfg["prompts"]
    sampler_prompts = PromptSampler(p["mode"], n_pos=p["n_pos"], n_neg=p["n_neg"], box_jitter=p["box_jitter"],
                                    mixed_per="batch") if p["mode"] != "none" else None
    no_prompts = {"point_coords": None, "point_labels": None, "boxes": None}
    keep_sampler = PromptSampler("mixed", n_pos=1, n_neg=0, box_jitter=p["box_jitter"],
                                 mixed_per="batch") if p["keep_prompts"] > 0 else None
    rounds = p["correction_rounds"]
    metrics_log: Dict[str, Any] = {"baseline": {}, "adapted": {}, "history": []}
    baseline_kept: Dict[str, np.ndarray] = {}
    if cfg["eval"]["baseline"] and not t["full_core"] and not resume:
        with full_parameters(model):  # FSDP2: the full core on every process while it evaluates
            res, baseline_kept = evaluate_aside(accelerator, sam, eval_dl, cfg, None)
        adapters.activate(sam, name)
        metrics_log["baseline"] = {"eval": res}
        if is_main:
            log("frozen core:  " + format_metrics(res))
    elif resume and (run_dir / "metrics.json").exists():
        metrics_log = json.loads((run_dir / "metrics.json").read_text())
    metrics_log["distributed"] = {k: v for k, v in (dist or describe(accelerator)).items() if k != "backend"}

    bar = tqdm(total=total_steps, initial=step, disable=not (progress and accelerator.is_local_main_process),
               desc="train")
    last_good = latest_checkpoint(run_dir)
    watch = LossWatch()  # the loop reads from the device only at its log steps, checkpoints and evaluations
    rate = StepRate(t["batch_size"] * t["grad_accum"] * accelerator.num_processes, warmup=step + 5)
    device = accelerator.device
    done = step >= total_steps
    for epoch in range(start_epoch, epochs):
        if done:
            break
        sampler.set_epoch(epoch)
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
        for host in loader:  # on the host: prompts are drawn here, then everything is copied over
            with accelerator.accumulate(model):
                rng = np.random.default_rng([t["seed"], step, batch_i, accelerator.process_index])
                target = host["mask"]
                if sampler_prompts is not None:
                    prompts = sampler_prompts(target, host["input_size"], rng=rng)
                elif keep_sampler is not None and rng.random() < p["keep_prompts"]:
                    if keep_data is not None:  # a prompted batch of the keep_prompts data instead
                        pick = rng.integers(0, len(keep_data), size=host["image"].shape[0])
                        host = collate_batch([keep_data[int(j)] for j in pick])
                        target = host["mask"]
                    else:  # one object of this batch's own masks
                        target = one_component(target, rng)
                    prompts = keep_sampler(target, host["input_size"], rng=rng)
                else:
                    prompts = no_prompts
                batch = to_device(host, device)
                # training masks come as uint8 (a quarter of the bytes): the losses take them as float
                target = (batch["mask"] if target is host["mask"] else to_device(target, device)).float()
                prompts = to_device(prompts, device)
                outs = model(batch["image"], prompts["point_coords"], prompts["point_labels"], prompts["boxes"],
                             gt=target, rounds=rounds, multimask=p["multimask"],
                             click_seed=hash((t["seed"], step, batch_i)) % (2**31))
                loss = 0.0
                for low, iou in outs:
                    logits = F.interpolate(low.float(), size=target.shape[-2:], mode="bilinear",
                                           align_corners=False)
                    if logits.shape[1] > 1:  # multimask: each sample trains its best candidate, as SAM does
                        logits, iou = pick_multimask(logits, iou, target, loss_fn)
                    part, terms = loss_fn(logits, target, iou.float().reshape(-1))
                    loss = loss + part
                loss = loss / len(outs)
                watch.see(loss, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t["max_grad_norm"]:
                    accelerator.clip_grad_norm_(params, t["max_grad_norm"])
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()  # once per optimizer step, whatever the number of processes
                optimizer.zero_grad()
            batch_i += 1
            if accelerator.sync_gradients:
                step += 1
                bar.update(1)
                if step % t["log_every"] == 0 or step == 1:
                    watch.check(last_good)  # reads back: the step's work is done
                    rate.mark(step)
                    scalars = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                               **{f"loss/{k}": v.item() for k, v in terms.items()}}
                    accelerator.log(scalars, step=step)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if t["checkpoint_every"] and step % t["checkpoint_every"] == 0 and step < total_steps:
                    last_good = checkpoint(epoch, batch_i)
                if step >= total_steps:
                    done = True
                    break
        # -------- evaluation and export at the end of each epoch
        watch.check(last_good)
        rate.pause()
        last_epoch = done or epoch == epochs - 1
        if (epoch + 1) % cfg["eval"]["every_epochs"] == 0 or last_epoch:
            with full_parameters(model):  # FSDP2: full tensors to evaluate and export, never one rank's shard
                res, kept = evaluate_aside(accelerator, sam, eval_dl, cfg, None if t["full_core"] else name)
                model.train()
                if is_main:
                    log(f"epoch {epoch + 1}/{epochs} step {step}: " + format_metrics(res))
                    metrics_log["history"].append({"epoch": epoch + 1, "step": step, "eval": res})
                    accelerator.log({f"eval/{k}": v for k, v in res.items()}, step=step)
                    sel = cfg["eval"]["select"]
                    if is_better(sel, res[sel], best):
                        best = res[sel]
                        metrics_log["adapted"] = {"eval": res, "epoch": epoch + 1, "step": step}
                        export(run_dir, sam, cfg, fp32_fingerprint, res)
                    rows = write_overlays(run_dir / "samples" / f"epoch_{epoch + 1:03d}", eval_ds, baseline_kept, kept)
                    log_overlays(accelerator, rows, step)
                    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics_log, indent=2))
        accelerator.wait_for_everyone()
        if not done:
            last_good = checkpoint(epoch + 1, 0)
    bar.close()
    last_good = checkpoint(epochs, 0)
    speed = rate.result()
    if speed:
        if device.type == "cuda":  # the run's peak, evaluation included
            speed["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
        metrics_log["speed"] = speed
        if is_main:
            log(f"training: {speed['images_per_s']:.2f} images/s over {speed['steps']} steps (data loading "
                f"included; the first {speed['warmup_steps']} steps, evaluations and checkpoints left out)")
            atomic_write_text(run_dir / "metrics.json", json.dumps(metrics_log, indent=2))
    accelerator.end_training()
    return metrics_log
