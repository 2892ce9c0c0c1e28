"""The run directory: its marker and lock, which files in it are a run's, and checks before a run writes.

A run directory holds `RUN_MARKER` (written first) and `.lock` (an advisory `flock` naming its holder's pid
and host) beside the run's outputs (`RUN_OUTPUTS`). Only those are ever replaced or removed, and only in a
marked folder: a folder holding anything else is refused (`refuse_foreign`), so no user file is touched.
Output places are checked writable before any work (`check_writable`), and OS errors become one line with
the fix (`os_problem`).
"""
import contextlib
import errno
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator, Optional

from .errors import RecipeError, TrainingError

LOCK_NAME = ".lock"
RUN_MARKER = ".samadapt-run"  # written first into every run directory: the folder's files are ours
# What a run (or the demo / a comparison around it) writes into its run directory; only these are ever
# replaced or removed, and only in a folder that holds RUN_MARKER. Sub-folders holding it are runs too.
RUN_OUTPUTS = ("adapter.safetensors", "metrics.json", "recipe.yaml", "checkpoints", "samples", "logs",
               "compare.json", "demo.png", "per_volume.json", "phantoms", LOCK_NAME, RUN_MARKER)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold `run_dir/.lock` (an advisory `flock`) while a run uses the directory, so that a second
    run on the same folder stops with an error instead of interleaving checkpoints. The kernel drops
    the lock when the process dies, so a killed run never leaves the folder locked; its forked data
    loader workers share the lock and may outlive it for a few seconds, so when the run the lock file
    names has ended the next run waits for them (`ORPHAN_WAIT_S`) instead of calling it alive.

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
            if not _wait_for_orphans(f, holder, fcntl):
                if _ended(holder):
                    raise TrainingError(
                        f"{run_dir} is still locked by processes the ended run ({holder}) started (its data "
                        f"loader workers); wait for them to exit (`fuser {path}` lists them), then run again"
                    ) from None
                raise TrainingError(f"{run_dir} is in use by another run ({holder}); wait for it to finish or "
                                    "pass --out another folder") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
            (run_dir / RUN_MARKER).touch()
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


ORPHAN_WAIT_S = 20.0  # a killed run's data loader workers notice within about 5 s (torch checks its parent)


def _ended(holder: str) -> bool:
    """Whether the lock file names a process of this host that no longer exists.

    Example:
        >>> import os, socket
        >>> _ended(f"pid {os.getpid()} on {socket.gethostname()}"), _ended("pid 1 on another-host")
        (False, False)
    """
    parts = holder.split()
    if len(parts) != 4 or parts[0] != "pid" or parts[2] != "on" or not parts[1].isdigit():
        return False
    if parts[3] != socket.gethostname():
        return False  # another machine sharing the folder: its pids mean nothing here
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _wait_for_orphans(f, holder: str, fcntl) -> bool:
    """A run killed outright (SIGKILL, out of memory) leaves its forked data loader workers for a few
    seconds, and they share its `flock`: when the holder named in the file has ended, wait for them
    (up to `ORPHAN_WAIT_S`) instead of calling a dead run alive. Returns whether the lock was taken.
    """
    import time

    if not _ended(holder):
        return False
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            continue
    return False


def lock_holder(run_dir: Path) -> Optional[str]:
    """Who holds `run_dir`'s lock now ("pid N on HOST"), or None when no live run holds it (also when
    only the forked workers of a run that has ended still hold it: `run_lock` waits for those).

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
            holder = f.read().strip() or "unknown"
            return None if _ended(holder) else holder
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
