"""The run directory: its lock, atomic writes, checkpoints (write, read, rotation) and resume.

A checkpoint `checkpoints/step_N/` holds only what is trained (the adapter tensors, as safetensors),
the optimizer, the scheduler, every RNG state and the data position, and resumes exactly. Every file
is written to a temporary name and renamed, so a killed run leaves whole files or none.

Why not Accelerate's `save_state`/`load_state` (kept out, not yet tried against the exact-resume test):
`save_state` writes every prepared model's full state dict (the frozen core too: hundreds of MB per
checkpoint for `vit_b`), so it needs a `register_save_state_pre_hook` that drops the model, and
`load_state` then a matching hook, since it loads one weight file per prepared model; its RNG file
stores NumPy state as a pickle read by allow-listing NumPy globals in `torch.load`, where ours is plain
tensors and strings read with `weights_only=True`; and the data position and the best metric still
need a file of their own. The scheme here keeps the same ingredients (trained tensors, optimizer and
scheduler `state_dict()`s, RNG states, the position for `skip_first_batches`) in files checked on load.
"""
import ast
import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
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


# ---------------------------------------------------------------------------- RNG states
def rng_state() -> Dict[str, Any]:
    """Every RNG's state (torch, CUDA, Python, NumPy) as tensors and strings `torch.load` reads with
    `weights_only=True`.

    Example:
        >>> st = rng_state(); x = torch.rand(1); set_rng_state(st); torch.equal(x, torch.rand(1))
        True
    """
    s = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": repr(random.getstate()),
          "numpy": json.dumps([s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(st["torch"])
    random.setstate(ast.literal_eval(st["python"]))
    s = json.loads(st["numpy"])
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------- checkpoints
def trained_tensors(sam: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the parameters that train (`requires_grad`), by name: what a checkpoint stores."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in sam.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, sam: nn.Module, optimizer, scheduler, step: int, epoch: int, batch_in_epoch: int,
                    best: Optional[float], keep: int) -> Path:
    """Write `checkpoints/step_N/` and keep the newest `keep` checkpoints.

    It holds the trained tensors (safetensors), optimizer + scheduler + RNG (`torch.save` of plain
    tensors and numbers, read back with `weights_only=True`) and the position; written to a temporary
    folder and renamed.

    Args:
        run_dir: the run directory.
        sam: the (unwrapped) core with its adapters.
        optimizer: the plain torch optimizer (not Accelerate's wrapper).
        scheduler: the plain torch scheduler.
        step: optimizer steps done.
        epoch: the epoch to continue in.
        batch_in_epoch: batches of that epoch already consumed.
        best: the best selection metric so far (None: none yet).
        keep: how many checkpoints to keep (0: all).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    ck_root = run_dir / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ck_root))
    try:
        save_file(trained_tensors(sam), str(tmp / "trained.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "state.pt")
        position = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best": best}
        (tmp / "position.json").write_text(json.dumps(position))
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
    """The newest complete checkpoint folder of `run_dir`, or None."""
    cks = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "position.json").exists())
    return cks[-1] if cks else None


def load_checkpoint(path: Path, sam: nn.Module, optimizer, scheduler) -> Dict[str, Any]:
    """Load a checkpoint into `sam`, the optimizer and the scheduler (plain torch objects).

    Returns:
        The position (`step`, `epoch`, `batch_in_epoch`, `best`) and `rng`, the states for `set_rng_state`.

    Raises:
        TrainingError: the checkpoint's tensors are not this run's trainable parameters.
    """
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
