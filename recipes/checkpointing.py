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
import errno
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from samadapt.adapters.io import atomic_file

from .errors import RecipeError, TrainingError

LOCK_NAME = ".lock"
RUN_MARKER = ".samadapt-run"  # written first into every run directory: the folder's files are ours
# What a run (or the demo / a comparison around it) writes into its run directory; only these are ever
# replaced or removed, and only in a folder that holds RUN_MARKER. Sub-folders holding it are runs too.
RUN_OUTPUTS = ("adapter.safetensors", "metrics.json", "recipe.yaml", "checkpoints", "samples", "logs",
               "compare.json", "demo.png", LOCK_NAME, RUN_MARKER)


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
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise TrainingError(f"{run_dir} is in use by another run ({holder}); wait for it to finish or pass "
                                "--out another folder") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
            (run_dir / RUN_MARKER).touch()
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(run_dir: Path) -> Optional[str]:
    """Who holds `run_dir`'s lock now ("pid N on HOST"), or None when no live run holds it.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with run_lock(d):
        ...     lock_holder(d).startswith("pid ")
        True
        >>> lock_holder(d) is None
        True
    """
    path = run_dir / LOCK_NAME
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(path, "r")
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "unknown"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _ours(entry: Path, marked: bool) -> bool:
    """Whether a run wrote `entry`: a nested run folder, or, in a marked run folder, a known output or the
    temporary of an atomic write.
    """
    if entry.is_dir() and not entry.is_symlink() and (entry / RUN_MARKER).exists():
        return True
    return marked and (entry.name in RUN_OUTPUTS or entry.name.startswith(".") and entry.name.endswith(".tmp"))


def foreign_files(run_dir: Path) -> list:
    """The entries of `run_dir` that no samadapt run wrote (sorted names). Without a run marker only
    nested run folders count as a run's.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "NOTES.txt").write_text("mine")
        4
        >>> foreign_files(d), foreign_files(d / "missing")
        (['NOTES.txt'], [])
    """
    if not run_dir.is_dir():
        return []
    marked = (run_dir / RUN_MARKER).exists()
    return sorted(e.name for e in run_dir.iterdir() if not _ours(e, marked))


def refuse_foreign(run_dir: Path, what: str = "the run") -> None:
    """Refuse a run directory that holds files samadapt did not write there (nothing of the user's is
    ever overwritten or removed).

    Raises:
        RecipeError: naming up to three of those files and the fix.
    """
    foreign = foreign_files(run_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RecipeError(f"{run_dir} holds files that {what} did not write ({shown}); give an empty or new --out "
                          "(nothing there was changed)")


def clear_run(run_dir: Path) -> None:
    """Remove what earlier runs wrote into `run_dir` (their outputs and nested run folders), so a new run
    starts fresh; refuses a folder holding anything else, and removes nothing then.

    Raises:
        RecipeError: the folder holds files that are not a run's.
    """
    refuse_foreign(run_dir, "samadapt")
    if not run_dir.is_dir():
        return
    for e in sorted(run_dir.iterdir()):
        if e.name in (LOCK_NAME, RUN_MARKER):
            continue  # the lock may be held by a live run: never replace it under that run
        shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()


def check_writable(path: Path, what: str = "--out") -> None:
    """Check that a folder can be created or written before any work starts.

    The folder itself is tried with a probe file when it exists; otherwise its nearest existing parent
    must be a writable folder (nothing is created here).

    Raises:
        RecipeError: a file stands where the folder should be, or the place is read-only, not writable
            or out of space; the message names the path and the fix.

    Example:
        >>> import tempfile, pathlib
        >>> check_writable(pathlib.Path(tempfile.mkdtemp()) / "new" / "run")
    """
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise RecipeError(f"{what} {path}: {probe_dir} is a file, not a folder; give a folder path")
    if probe_dir == path:
        probe = path / f".write-test-{os.getpid()}.tmp"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RecipeError(f"{what} {path} is not writable ({os_problem(e)})") from None
    elif not os.access(probe_dir, os.W_OK | os.X_OK):
        reason = "read-only filesystem" if _read_only(probe_dir) else "permission denied"
        raise RecipeError(f"{what} {path} cannot be created in {probe_dir} ({reason}); choose a folder you can "
                          "write")


def check_writable_file(path: Path, what: str) -> None:
    """Check before any work that a file can be written at `path` (not a folder; its folder writable).

    Raises:
        RecipeError: naming the path and the fix.

    Example:
        >>> import tempfile, pathlib
        >>> check_writable_file(pathlib.Path(tempfile.mkdtemp()) / "metrics.json", "--json")
    """
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{what} {path} is a folder; give a file path such as {path / 'metrics.json'}")
    check_writable(path.parent, what)


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


OS_FIXES = {
    errno.ENOSPC: "free some space or choose another output folder",
    errno.EDQUOT: "free some space (disk quota) or choose another output folder",
    errno.EROFS: "the filesystem is read-only: choose a writable output folder",
    errno.EACCES: "no permission: choose a folder you can write",
    errno.EPERM: "no permission: choose a folder you can write",
}


def os_problem(e: OSError) -> str:
    """An OS error as `what happened; the fix` (ENOSPC, EROFS, EACCES, ...), for one `error:` line.

    Example:
        >>> import errno
        >>> os_problem(OSError(errno.ENOSPC, "No space left on device"))
        'No space left on device; free some space or choose another output folder'
    """
    text = e.strerror or str(e)
    fix = OS_FIXES.get(e.errno)
    return f"{text}; {fix}" if fix else text


def disk_full(e: BaseException, where: Path) -> bool:
    """Whether a failed write was the disk filling up: ENOSPC itself, or torch's zip writer's error
    ("unexpected pos ...", "file write failed") with no space left at `where`.
    """
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError) and any(s in str(e) for s in ("unexpected pos", "write failed")):
        try:
            return shutil.disk_usage(where).free < 1 << 20
        except OSError:
            return False
    return False


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
    refuse_foreign(run_dir)


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
    except BaseException as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e, ck_root):  # torch's writer says "unexpected pos 64 vs 0": say what happened
            last = latest_checkpoint(run_dir)
            kept = f"; {last} is intact: free space and rerun with --resume" if last else ""
            raise OSError(errno.ENOSPC, f"No space left on device while writing checkpoint step {step}{kept}",
                          str(ck_root)) from None
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
