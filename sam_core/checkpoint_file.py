"""The weights file a core was loaded from (`load_sam` records it as `sam.checkpoint`): its name and sha256,
which adapter files record next to the core's fingerprint.
"""
import hashlib
import os
import threading
from pathlib import Path
from typing import Optional, Union


class CheckpointFile:
    """The weights file a core was loaded from: its name, and its sha256 (hashed on first use, once).

    Adapter files record both next to the core's fingerprint, so a user holding several checkpoints can
    tell which one an adapter needs. Hashing is deferred because most loads (predict, serve) never save an
    adapter, and a vit_h file is 2.5 GB; if the file changed on disk since the core was read, `sha256`
    is None rather than the hash of other weights.

    Args:
        path: the weights file (for a transformers folder, its `model.safetensors` / `pytorch_model.bin`).
        name: the name to record (default: the file's name; `<folder>/<file>` for a folder).

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "w.bin")
        >>> _ = open(p, "wb").write(b"abc")
        >>> c = CheckpointFile(p)
        >>> c.name, c.sha256[:12]
        ('w.bin', 'ba7816bf8f01')
    """

    def __init__(self, path: Union[str, os.PathLike], name: Optional[str] = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        st = self.path.stat()
        self._stat = (st.st_size, st.st_mtime_ns)
        self._sha256: Optional[str] = None
        self._lock = threading.Lock()

    @property
    def sha256(self) -> Optional[str]:
        """Hex sha256 of the file as it was loaded (None if it has changed or gone since)."""
        with self._lock:
            if self._sha256 is None:
                try:
                    st = self.path.stat()
                    if (st.st_size, st.st_mtime_ns) != self._stat:
                        return None
                    h = hashlib.sha256()
                    with open(self.path, "rb") as f:
                        for chunk in iter(lambda: f.read(8 * 2**20), b""):
                            h.update(chunk)
                    self._sha256 = h.hexdigest()
                except OSError:
                    return None
            return self._sha256

    def __deepcopy__(self, memo):
        return self  # a record of one file: a copied model came from the same file

    def __getstate__(self):  # picklable (the lock is not): a model sent to another process keeps its record
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CheckpointFile({self.name!r})"


def checkpoint_file(source: Union[str, os.PathLike]) -> Optional[CheckpointFile]:
    """The single weights file `source` names (a file, or a folder with one unsharded weights file)."""
    path = Path(source)
    if path.is_file():
        return CheckpointFile(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if path.is_dir() and (path / name).is_file() and not any(path.glob("*.index.json")):
            return CheckpointFile(path / name, name=f"{path.name}/{name}")
    return None
