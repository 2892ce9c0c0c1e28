"""Where an adapter file comes from: a local path, an `http(s)://` URL, or `hf://org/repo/file[@revision]`.

Remote files are fetched through huggingface_hub, so they get its cache, its offline mode
(`HF_HUB_OFFLINE=1`), its endpoint (`HF_ENDPOINT`) and its tokens from the usual places (`HF_TOKEN`,
`hf auth login`); a token is sent only to the Hub endpoint, never to a plain URL, and never printed.
A `sha256` pin refuses a file whose hash differs, naming both hashes. A catalogue file (YAML or JSON)
maps adapter names to such sources for `AdapterBank` and `samadapt serve`.
"""
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .base import AdapterError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SourceError(AdapterError):
    """An adapter source could not be read or fetched (malformed, not found, offline and not cached)."""


class HashMismatchError(AdapterError):
    """The file's sha256 differs from the pinned one."""


def is_remote(source: Any) -> bool:
    """Whether `source` is a URL (`http://`, `https://`) or a Hub source (`hf://`), not a local path.

    Example:
        >>> is_remote("hf://org/repo/a.safetensors"), is_remote("a.safetensors")
        (True, False)
    """
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https", "hf") and "://" in source


def parse_hf(source: str) -> Tuple[str, str, Optional[str]]:
    """`hf://org/repo/path/file.safetensors[@revision]` -> (repo_id, filename, revision or None).

    Example:
        >>> parse_hf("hf://org/cod-adapters/v2/cod.safetensors@refs/pr/1")
        ('org/cod-adapters', 'v2/cod.safetensors', 'refs/pr/1')
        >>> parse_hf("hf://org/repo/cod.safetensors")
        ('org/repo', 'cod.safetensors', None)
    """
    rest = source[len("hf://"):] if source.startswith("hf://") else source
    revision = None
    parts = rest.split("/", 2)
    if len(parts) == 3 and "@" in parts[2]:
        filename, revision = parts[2].split("@", 1)
        parts[2] = filename
    if len(parts) < 3 or not all(parts) or not revision and revision is not None:
        raise SourceError(f"{source!r} is not a Hub source; write hf://org/repo/file.safetensors[@revision]")
    return f"{parts[0]}/{parts[1]}", parts[2], revision


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "x")
        >>> _ = open(p, "wb").write(b"abc")
        >>> file_sha256(p)[:16]
        'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Union[str, os.PathLike], expected: str, where: str) -> None:
    """Raise HashMismatchError unless the file at `path` hashes to `expected` (the message names both)."""
    got = file_sha256(path)
    if got != expected:
        raise HashMismatchError(f"{where}: sha256 is {got}, but {expected} was pinned; the file is not the one "
                                f"you pinned (changed upstream, or damaged): fetch the right one or update the pin")


def _normal_pin(sha256: Optional[str], where: str) -> Optional[str]:
    if sha256 is None:
        return None
    pin = str(sha256).strip().lower()
    if pin.startswith("sha256:"):
        pin = pin[len("sha256:"):]
    if not _SHA256.match(pin):
        raise SourceError(f"{where}: sha256 pin {sha256!r:.80} is not 64 hex digits; "
                          f"write it as `sha256sum FILE` prints it")
    return pin


def _hub_error(e: Exception, source: str) -> SourceError:
    """One line for a huggingface_hub failure (its messages name URLs, never the token)."""
    from huggingface_hub import errors

    name = type(e).__name__
    if isinstance(e, errors.RepositoryNotFoundError):
        why = "no such repository, or it is private and no valid token was found (HF_TOKEN or `hf auth login`)"
    elif isinstance(e, errors.RevisionNotFoundError):
        why = "no such revision (branch, tag or commit) in the repository"
    elif isinstance(e, errors.LocalEntryNotFoundError):
        why = ("not in the local cache and the Hub cannot be reached (offline mode or no network); "
               "fetch it once online, or unset HF_HUB_OFFLINE")
    elif isinstance(e, errors.EntryNotFoundError):
        why = "no such file in the repository at that revision"
    else:
        text = str(e).strip().splitlines()
        why = f"{name}: {text[0] if text else 'download failed'}"
    return SourceError(f"{source}: {why}")


def hub_endpoint() -> Optional[str]:
    """`HF_ENDPOINT` as set now (huggingface_hub reads it once, at import; a later change is honoured
    here), or None for huggingface_hub's default.

    Example:
        >>> import os
        >>> before = os.environ.get("HF_ENDPOINT")
        >>> os.environ["HF_ENDPOINT"] = "http://127.0.0.1:8080/"
        >>> hub_endpoint()
        'http://127.0.0.1:8080'
        >>> _ = os.environ.pop("HF_ENDPOINT") if before is None else os.environ.update(HF_ENDPOINT=before)
    """
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _fetch_hf(source: str, token: Union[str, bool, None] = None) -> Path:
    from huggingface_hub import hf_hub_download

    repo_id, filename, revision = parse_hf(source)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=hub_endpoint(), token=token))
    except Exception as e:  # noqa: BLE001 -- every huggingface_hub/httpx failure becomes one line
        raise _hub_error(e, source) from None


def url_cache_path(url: str) -> Path:
    """Where a plain URL's file is kept: beside huggingface_hub's cache, one folder per URL.

    Example:
        >>> url_cache_path("https://example.org/a/cod.safetensors").name
        'cod.safetensors'
    """
    from huggingface_hub import constants

    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "adapter.safetensors"
    key = hashlib.sha256(url.encode()).hexdigest()[:24]
    return Path(constants.HF_HOME) / "samadapt" / "urls" / key / name


def _fetch_url(url: str, pin: Optional[str]) -> Path:
    """Download `url` (no Hub token sent: it is not the Hub); a cached copy that matches the pin, or any
    cached copy in offline mode, is used without the network.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get

    from .atomic import atomic_file

    dest = url_cache_path(url)
    if dest.is_file() and (constants.is_offline_mode() or (pin is not None and file_sha256(dest) == pin)):
        return dest
    if constants.is_offline_mode():
        raise SourceError(f"{url}: not in the local cache and offline mode is on (HF_HUB_OFFLINE); "
                          f"fetch it once online")
    try:
        with atomic_file(dest) as tmp, open(tmp, "wb") as f:
            http_get(url, f, headers={})
    except Exception as e:  # noqa: BLE001 -- httpx / HTTP status errors become one line
        text = str(e).strip().splitlines()
        raise SourceError(f"{url}: download failed ({type(e).__name__}: {text[0] if text else ''})") from None
    return dest


def resolve(source: Union[str, os.PathLike], sha256: Optional[str] = None) -> Path:
    """The local file for an adapter source, fetched if remote, checked against `sha256` if pinned.

    Args:
        source: a path, an `http(s)://` URL, or `hf://org/repo/file.safetensors[@revision]`.
        sha256: expected hex sha256 of the file (optionally prefixed `sha256:`), or None.

    Returns:
        The path of the local (possibly cached) file.

    Raises:
        SourceError: a malformed source or pin, or a file that cannot be fetched (says why).
        HashMismatchError: the file's sha256 is not the pinned one (both named).

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> _ = open(p, "wb").write(b"abc")
        >>> resolve(p, sha256="ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad").name
        'a.safetensors'
        >>> resolve(p, sha256="0" * 64)
        Traceback (most recent call last):
        ...
        samadapt.adapters.sources.HashMismatchError: ...
    """
    text = os.fspath(source)
    pin = _normal_pin(sha256, text)
    if is_remote(text):
        path = _fetch_hf(text) if text.startswith("hf://") else _fetch_url(text, pin)
    else:
        path = Path(text)
        if pin is not None and not path.is_file():
            raise SourceError(f"{path}: no such adapter file")
    if pin is not None:
        check_sha256(path, pin, text)
    return path


def load_catalogue(source: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Tuple[str, Optional[str]]]:
    """Read a catalogue: adapter name -> source, or -> `{source: ..., sha256: ...}`.

    A YAML (`.yaml`/`.yml`) or JSON file, or the mapping itself. Relative local paths are relative to the
    catalogue file's folder.

    Args:
        source: the catalogue file or mapping.

    Returns:
        name -> (source, sha256 pin or None).

    Raises:
        SourceError: unreadable file, not a mapping, a bad name, or an entry without a source (says which).

    Example:
        >>> load_catalogue({"cod": "hf://org/repo/cod.safetensors", "shadow": {"source": "s.safetensors",
        ...                 "sha256": "a" * 64}})["shadow"]
        ('s.safetensors', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')
    """
    from .base import is_valid_name

    folder = None
    where = "catalogue"
    if isinstance(source, dict):
        data: Any = source
    else:
        path = Path(source)
        where, folder = str(path), path.parent
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"catalogue {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001 -- json / yaml parse errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"catalogue {path}: not valid {path.suffix.lstrip('.') or 'YAML'} ({first})") from None
    if not isinstance(data, dict) or not data:
        raise SourceError(f"{where}: should map adapter names to sources, e.g. `cod: hf://org/repo/cod.safetensors`")
    out: Dict[str, Tuple[str, Optional[str]]] = {}
    for name, entry in data.items():
        if not isinstance(name, str) or not is_valid_name(name):
            raise SourceError(f"{where}: adapter name {name!r} is not valid (letters, digits, _ and -, starting "
                              f"with a letter)")
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - {"source", "sha256"})
            if unknown:
                raise SourceError(f"{where}: {name}: unknown keys {unknown}; an entry has `source` and `sha256`")
            src, pin = entry.get("source"), entry.get("sha256")
        else:
            src, pin = entry, None
        if not isinstance(src, str) or not src:
            raise SourceError(f"{where}: {name}: needs a source (a path, an http(s) URL or hf://org/repo/file)")
        if pin is not None and not isinstance(pin, str):
            raise SourceError(f"{where}: {name}: sha256 should be a string of 64 hex digits, got "
                              f"{type(pin).__name__} (quote it in YAML: sha256: \"...\")")
        if folder is not None and not is_remote(src) and not Path(src).is_absolute():
            src = str(folder / src)
        out[name] = (src, _normal_pin(pin, f"{where}: {name}"))
    return out


def _tmpdir_beside(path: Path) -> str:
    """A temporary folder next to `path` (same file system, so a rename onto `path` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
