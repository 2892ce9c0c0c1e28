"""The run directory: its lock, atomic writes, checkpoints (write, read, rotation) and resume.

A checkpoint `checkpoints/step_N/` is Accelerate's `save_state` folder (optimizer, scheduler, every
process's RNG states, the grad scaler) with one change made by a save hook: in place of the prepared
model's full state dict (the frozen core too: hundreds of MB for `vit_b`) it holds only what trains,
`trained.safetensors`; a load hook reads that back and checks it is this run's trainable set.
`position.json` (step, epoch, batch in epoch for `skip_first_batches`, best metric) is written last, and
the folder is written under a temporary name and renamed, so a killed run leaves whole checkpoints or
none. Resume is exact (tests/test_recipes.py: after SIGKILL, and with randomness after the resume point).
Under FSDP Accelerate saves the sharded model itself before any hook runs, so there the core is saved too.
"""
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from samadapt.adapters.io import atomic_file

from .errors import RecipeError, TrainingError

LOCK_NAME = ".lock"


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


# ---------------------------------------------------------------------------- the run directory
@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold `run_dir/.lock` (an advisory `flock`) while a run uses the directory, so that a second
    run on the same folder stops with an error instead of interleaving checkpoints. The kernel drops
    the lock when the process dies, so a killed run never leaves the folder locked.

    Args:
        run_dir: the run directory (created if missing).

    Yields:
        The lock file's path.

    Raises:
        TrainingError: another process holds the lock.

    Example:
        >>> import tempfile, pathlib
        >>> with run_lock(pathlib.Path(tempfile.mkdtemp())) as lock:
        ...     lock.name
        '.lock'
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, run unlocked
        yield path
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TrainingError(f"{run_dir} is in use by another run; wait for it to finish or pass --out "
                                "another folder") from None
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear_stale_temporaries(run_dir: Path) -> None:
    """Remove the temporary names a run killed mid-write leaves behind (never a finished file)."""
    for stale in list(run_dir.glob(".*.tmp")) + list((run_dir / "checkpoints").glob(".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()


def check_resume(run_dir: Path, resume: bool) -> None:
    """Refuse `--resume` without a checkpoint, and a fresh run over a folder that holds checkpoints.

    Raises:
        RecipeError: with the fix (drop `--resume`, pass it, or another `--out`).

    Example:
        >>> import tempfile, pathlib
        >>> check_resume(pathlib.Path(tempfile.mkdtemp()), resume=False)  # an empty folder: fine
    """
    if resume and latest_checkpoint(run_dir) is None:
        raise RecipeError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; drop --resume to start fresh")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise RecipeError(f"{run_dir} already holds checkpoints; pass --resume to continue or --out another folder")


# ---------------------------------------------------------------------------- checkpoints
def trained_tensors(sam: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the parameters that train (`requires_grad`), by name: what a checkpoint stores."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in sam.named_parameters() if p.requires_grad}


TRAINED = "trained.safetensors"


def adapter_only_checkpoints(accelerator, sam: nn.Module) -> None:
    """Register the `save_state`/`load_state` hooks that keep checkpoints adapter-only.

    Args:
        accelerator: the run's `accelerate.Accelerator` (after `prepare`).
        sam: the unwrapped core whose trainable parameters are checkpointed.
    """
    from safetensors.torch import save_file

    def save_trained(models, weights, output_dir):
        weights.clear()  # the prepared model's full state dict, frozen core included: not saved
        if accelerator.is_main_process:
            save_file(trained_tensors(sam), str(Path(output_dir) / TRAINED))

    def load_trained(models, input_dir):
        from safetensors.torch import load_file

        path = Path(input_dir)
        tensors = load_file(str(path / TRAINED))
        params = dict(sam.named_parameters())
        if set(tensors) != {n for n, p in params.items() if p.requires_grad}:
            raise TrainingError(f"{path} does not match this run's trainable parameters (different recipe?); "
                                f"start a new output folder or remove {path.parent}")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        models.clear()  # loaded above: Accelerate has no full state dict to load

    accelerator.register_save_state_pre_hook(save_trained)
    accelerator.register_load_state_pre_hook(load_trained)


def save_checkpoint(accelerator, run_dir: Path, step: int, epoch: int, batch_in_epoch: int, best: Optional[float],
                    keep: int) -> Path:
    """Write `checkpoints/step_N/` with `accelerator.save_state` and keep the newest `keep` checkpoints.

    Every process calls it (each saves its RNG states); the main process writes the rest, adds
    `position.json` and renames the temporary folder into place.

    Args:
        accelerator: the run's accelerator, with `adapter_only_checkpoints` registered.
        run_dir: the run directory.
        step: optimizer steps done.
        epoch: the epoch to continue in.
        batch_in_epoch: batches of that epoch already consumed.
        best: the best selection metric so far (None: none yet).
        keep: how many checkpoints to keep (0: all).

    Returns:
        The checkpoint folder.
    """
    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step_{step:08d}"
    tmp = ck_root / f".tmp-step_{step:08d}"  # one name for every process
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        ck_root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            position = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best": best}
            (tmp / "position.json").write_text(json.dumps(position))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        old = sorted(p for p in ck_root.glob("step_*") if p.is_dir())
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder of `run_dir`, or None."""
    cks = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "position.json").exists())
    return cks[-1] if cks else None


def load_checkpoint(accelerator, path: Path) -> Dict[str, Any]:
    """Restore a checkpoint with `accelerator.load_state`: trained tensors, optimizer, scheduler, RNG states.

    Returns:
        The position: `step`, `epoch`, `batch_in_epoch`, `best`.

    Raises:
        TrainingError: the checkpoint's tensors are not this run's trainable parameters.
    """
    accelerator.load_state(str(path))
    return json.loads((path / "position.json").read_text())
