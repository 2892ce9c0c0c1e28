"""Atomic writes, checkpoints (write, read, rotation) and resume; the run directory itself is `rundir`.

A checkpoint `checkpoints/step_N/` holds only what trains (`trained.safetensors`, never the frozen
core: hundreds of MB for `vit_b`), the optimizer state by parameter name, the scheduler, every process's
random states and `position.json` (step, epoch, batch in epoch for `skip_first_batches`, best metric),
written last. It is not Accelerate's `save_state` folder: under FSDP that saves the sharded model and an
FSDP-specific optimizer file before any hook runs, which another strategy cannot read; these files are the
same under every strategy (a DDP checkpoint resumes under FSDP2 and back: tests/test_distributed.py). The
folder is written under a temporary name and renamed, so a killed run leaves whole checkpoints or none.
Resume is exact (tests/test_recipes.py: after SIGKILL, and with randomness after the resume point).
"""
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from samadapt.adapters.io import atomic_file

from .errors import RecipeError, TrainingError
from .rundir import (  # noqa: F401 -- the run-directory checks were defined here first; callers import them here
    LOCK_NAME,
    OS_FIXES,
    RUN_MARKER,
    RUN_OUTPUTS,
    check_writable,
    check_writable_file,
    clear_run,
    disk_full,
    foreign_files,
    lock_holder,
    os_problem,
    refuse_foreign,
    run_lock,
)


# ---------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name next to `path` and rename it into place.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write_bytes(p, b"hi"); p.read_bytes()
        b'hi'
    """
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write_text(p, "hi"); p.read_text()
        'hi'
    """
    atomic_write_bytes(path, text.encode())


def clear_stale_temporaries(run_dir: Path) -> None:
    """Remove the temporary names a run killed mid-write leaves behind (never a finished file)."""
    for stale in list(run_dir.glob(".*.tmp")) + list((run_dir / "checkpoints").glob(".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()


def check_resume(run_dir: Path, resume: bool, locked: bool = False) -> None:
    """Refuse a folder another run is using, `--resume` without a checkpoint, and a fresh run over a folder
    that holds a run or files samadapt did not write.

    Args:
        run_dir: the run directory.
        resume: whether the run continues from a checkpoint.
        locked: this process holds the folder's lock already (skip the in-use check).

    Raises:
        TrainingError: another live run holds the folder (its pid and host are named).
        RecipeError: with the fix (drop `--resume`, pass it, or another `--out`).

    Example:
        >>> import tempfile, pathlib
        >>> check_resume(pathlib.Path(tempfile.mkdtemp()), resume=False)  # an empty folder: fine
    """
    holder = None if locked else lock_holder(run_dir)  # locked: this process holds it
    if holder:
        raise TrainingError(f"{run_dir} is in use by another run ({holder}); wait for it to finish or pass --out "
                            "another folder")
    if resume and latest_checkpoint(run_dir) is None:
        raise RecipeError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; drop --resume to start fresh")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise RecipeError(f"{run_dir} already holds checkpoints; pass --resume to continue or --out another folder")
    if not resume and (run_dir / "adapter.safetensors").exists():
        raise RecipeError(f"{run_dir} already holds a trained adapter.safetensors; --out another folder (or remove "
                          "that run yourself)")
    if not resume:
        refuse_foreign(run_dir)


# ---------------------------------------------------------------------------- checkpoints
def trained_tensors(sam: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the parameters that train (`requires_grad`), by name: what a checkpoint stores."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in sam.named_parameters() if p.requires_grad}


TRAINED = "trained.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"


def _rng_state() -> Dict[str, Any]:
    """This process's random states (torch, CUDA, numpy, python) as tensors and numbers only, so the
    file loads with `torch.load(weights_only=True)`.
    """
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, _ = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "numpy_pos": int(pos),
            "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
            "python": torch.tensor(py_state, dtype=torch.int64), "python_version": int(version)}


def _set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), None))


def save_checkpoint(accelerator, model, optimizer, scheduler, run_dir: Path, step: int, epoch: int,
                    batch_in_epoch: int, best: Optional[float], keep: int,
                    loop: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write `checkpoints/step_N/` and keep the newest `keep` checkpoints.

    The same files under every strategy (single process, DDP, FSDP2), so a checkpoint resumes under
    another one: `trained.safetensors` (the full trainable tensors by name, gathered from FSDP shards),
    `optimizer.pt` (its state as full tensors by parameter name), `scheduler.pt`, `rng.pt` (every
    process's random states) and, last, `position.json`. Only rank 0 writes (the others send it their
    part), so ranks on other machines need no shared disk. Every process must call it.

    Args:
        accelerator: the run's accelerator.
        model: the prepared model.
        optimizer: the prepared optimizer.
        scheduler: the prepared scheduler.
        run_dir: the run directory.
        step: optimizer steps done.
        epoch: the epoch to continue in.
        batch_in_epoch: batches of that epoch already consumed.
        best: the best selection metric so far (None: none yet).
        keep: how many checkpoints to keep (0: all).
        loop: tensors a loop needs to continue exactly (e.g. its sampler's generator state at the start
            of `epoch`), kept beside the scheduler and given back by `load_checkpoint` as `loop`.

    Returns:
        The checkpoint folder.
    """
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    from .distributed import full_parameters, optimizer_state

    sam = accelerator.unwrap_model(model).sam
    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step_{step:08d}"
    tmp = ck_root / f".tmp-step_{step:08d}"
    with full_parameters(model):  # collectives first, on every process
        trained = trained_tensors(sam) if accelerator.is_main_process else {}
    osd = optimizer_state(model, getattr(optimizer, "optimizer", optimizer))
    rngs = gather_object([_rng_state()]) if accelerator.num_processes > 1 else [_rng_state()]
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(trained, str(tmp / TRAINED))
            torch.save(osd, tmp / OPTIMIZER)
            extra = {"scheduler": getattr(scheduler, "scheduler", scheduler).state_dict()}
            if loop:
                extra["loop"] = dict(loop)
            if accelerator.scaler is not None:
                extra["scaler"] = accelerator.scaler.state_dict()
            torch.save(extra, tmp / SCHEDULER)
            torch.save(rngs, tmp / RNG)
            position = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best": best,
                        "num_processes": accelerator.num_processes}
            (tmp / "position.json").write_text(json.dumps(position))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException as e:
            full = disk_full(e, ck_root)  # before the partial checkpoint is removed and frees its space
            shutil.rmtree(tmp, ignore_errors=True)
            if full:  # torch's writer says "unexpected pos 64 vs 0": say what happened
                last = latest_checkpoint(run_dir)
                kept = f"; {last} is intact: free space and rerun with --resume" if last else ""
                raise OSError(errno.ENOSPC, f"No space left on device while writing checkpoint step {step}{kept}",
                              str(ck_root)) from None
            raise
        old = sorted(p for p in ck_root.glob("step_*") if p.is_dir())
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()  # no process runs ahead of a checkpoint that is not yet in place
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder of `run_dir`, or None."""
    cks = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "position.json").exists())
    return cks[-1] if cks else None


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path) -> Dict[str, Any]:
    """Restore `save_checkpoint`'s folder under this run's strategy: trained tensors, optimizer (sharded as
    this run shards), scheduler, grad scaler and this process's random states. Rank 0 reads the files and
    sends the others their part. Every process must call it.

    Returns:
        The position: `step`, `epoch`, `batch_in_epoch`, `best`, and `loop` (what `save_checkpoint` was
        given as `loop`, or None).

    Raises:
        TrainingError: the checkpoint's tensors are not this run's trainable parameters.
    """
    from safetensors.torch import load_file

    from .distributed import load_optimizer_state

    sam = accelerator.unwrap_model(model).sam
    main = accelerator.is_main_process
    names = sorted(n for n, p in sam.named_parameters() if p.requires_grad)
    tensors = load_file(str(path / TRAINED)) if main else {}
    shapes = {n: tuple(p.shape) for n, p in sam.named_parameters() if p.requires_grad}  # DTensor: global shape
    if main:
        wrong = [f"{n} {tuple(tensors[n].shape)} vs {shapes[n]}" for n in names
                 if n in tensors and tuple(tensors[n].shape) != shapes[n]]
        if sorted(tensors) != names:
            ok = ["different tensor names (another adapter recipe?)"]
        else:
            ok = [f"shapes differ, e.g. {wrong[0]} (a changed setting such as LoRA r?)" if wrong else ""]
    else:
        ok = [None]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(ok, src=0)
    if ok[0]:
        raise TrainingError(f"{path} does not match this run's trainable parameters: {ok[0]}; resume with the "
                            f"recipe it was saved with ({path.parent.parent / 'recipe.yaml'}) or start a new --out")
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(sam.named_parameters())
    with torch.no_grad():
        for n in names:  # rank 0's values on every process; FSDP2 shards get their piece of them
            p = params[n]
            t = tensors[n] if main else torch.empty(p.shape, dtype=p.dtype)
            if isinstance(p, DTensor):  # written into the shards: an unsharded copy is not written back
                p.copy_(distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=0))
                continue
            t = t.to(p.device, p.dtype)
            if accelerator.num_processes > 1:
                torch.distributed.broadcast(t, src=0)
            p.copy_(t)
    osd = torch.load(path / OPTIMIZER, weights_only=True) if main else {}
    load_optimizer_state(model, getattr(optimizer, "optimizer", optimizer), osd)
    extra = [torch.load(path / SCHEDULER, weights_only=True), torch.load(path / RNG, weights_only=True),
             json.loads((path / "position.json").read_text())] if main else [None, None, None]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(extra, src=0)
    sched, rngs, position = extra
    getattr(scheduler, "scheduler", scheduler).load_state_dict(sched["scheduler"])
    if accelerator.scaler is not None and "scaler" in sched:
        accelerator.scaler.load_state_dict(sched["scaler"])
    # the same process count continues exactly; another count continues with rank 0's states where a
    # process has none (the data order is (seed, epoch)-determined either way)
    rank = accelerator.process_index
    _set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return dict(position, loop=sched.get("loop"))
