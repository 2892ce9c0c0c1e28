"""Atomic file writes for adapter files and everything else samadapt writes: a temporary name beside the
destination, flushed, then renamed, so a crash never leaves a half-written file.
"""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_file(path: Union[str, os.PathLike], fsync: bool = True) -> Iterator[str]:
    """Yield a temporary name beside `path`; when the block succeeds the file is flushed to disk
    (`fsync`), given the umask's mode and renamed onto `path`; on any error it is removed. A crash
    never leaves a half-written `path`.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> with atomic_file(p) as tmp:
        ...     _ = open(tmp, "w").write("done")
        >>> open(p).read()
        'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        _share_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _share_mode(path: str) -> None:
    """Mkstemp makes owner-only files; adapter files are meant to be shared: use the umask's mode."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
