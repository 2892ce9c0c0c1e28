"""Sharing adapter files on the Hugging Face Hub: `push` (the file and a generated model card) and `pull`.

Both go through huggingface_hub's client (`HfApi`, `hf_hub_download`): its endpoint (`HF_ENDPOINT`),
cache, offline mode and tokens from the usual places (`HF_TOKEN`, `hf auth login`). Tokens are never
printed or written into a message.
"""
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .sources import SourceError, _hub_error, file_sha256, hub_endpoint

FENCE = "`" * 3  # a Markdown code fence
CARD_TAGS = ["samadapt", "segment-anything", "sam", "adapter", "image-segmentation"]


def card_data(info: Dict[str, Any], filename: str, file_sha: str, license: Optional[str] = None) -> Dict[str, Any]:
    """The model card's YAML front matter for an adapter file, from its `adapters.inspect` dict.

    Args:
        info: `adapters.inspect(file)`.
        filename: the file's name in the repository.
        file_sha: the file's sha256 (users pin it: `sha256=...`).
        license: an SPDX-like licence id for the adapter (`apache-2.0`, `mit`, ...); None: `other`.

    Example:
        >>> info = {"base": {"arch": "tiny", "image_size": 256, "fingerprint": "ab12"}, "domain": "camouflage",
        ...         "config": [{"kind": "lora", "r": 4}], "decoder": {"policy": "frozen", "r": 4}}
        >>> d = card_data(info, "cod.safetensors", "0" * 64)
        >>> d["library_name"], d["license"], d["samadapt"]["base"]["arch"], "camouflage" in d["tags"]
        ('samadapt', 'other', 'tiny', True)
    """
    base = dict(info.get("base") or {})
    kinds = [str(c.get("kind")) for c in info.get("config") or []]
    domain = str(info.get("domain") or "")
    tags = CARD_TAGS + [k for k in kinds if k not in CARD_TAGS]
    if domain and domain not in tags:
        tags.append(domain)
    data: Dict[str, Any] = {
        "library_name": "samadapt",
        "license": license or "other",
        "tags": tags,
        "pipeline_tag": "mask-generation",
        "samadapt": {
            "file": filename,
            "file_sha256": file_sha,
            "format": info.get("format"),
            "base": {k: base.get(k) for k in ("arch", "image_size", "fingerprint", "checkpoint", "checkpoint_sha256")
                     if base.get(k) is not None},
            "domain": domain,
            "kinds": kinds,
            "config": info.get("config"),
            "decoder": info.get("decoder"),
            "prompt_mode": info.get("prompt_mode"),
            "classes": info.get("classes"),
            "metrics": info.get("metrics") if isinstance(info.get("metrics"), dict) else {},
            "recipe": info.get("recipe") or "",
            "samadapt_version": info.get("samadapt_version"),
        },
    }
    if license is None:
        data["license_name"] = "unspecified"
    data["samadapt"] = {k: v for k, v in data["samadapt"].items() if v is not None}
    return data


def model_card(file: Union[str, os.PathLike], repo_id: Optional[str] = None, license: Optional[str] = None) -> str:
    """A README.md for an adapter file: YAML front matter (`library_name: samadapt`, tags, the base's arch,
    fingerprint, checkpoint file name and sha256, domain, metrics, recipe, licence) and a short body saying
    how to load it. huggingface_hub's `ModelCard` parses it back.

    Args:
        file: the adapter `.safetensors` file.
        repo_id: the repository it goes to (for the usage lines).
        license: the adapter's licence id (None: `other`, to be stated by the author).

    Example:
        >>> import os, tempfile
        >>> from huggingface_hub import ModelCard
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny")
        >>> adapters.attach(sam, adapters.config("lora", r=4), name="cod")
        >>> dest = os.path.join(tempfile.mkdtemp(), "cod.safetensors")
        >>> p = adapters.save(sam, dest, name="cod", domain="camouflage")
        >>> card = ModelCard(model_card(p, "org/cod", license="mit"))
        >>> card.data.library_name, card.data.license, card.data.samadapt["domain"]
        ('samadapt', 'mit', 'camouflage')
    """
    import yaml
    from huggingface_hub import ModelCardData

    from .io import inspect

    path = Path(file)
    info = inspect(path)
    sha = file_sha256(path)
    data = card_data(info, path.name, sha, license)
    front = ModelCardData(**data).to_yaml()
    s = data["samadapt"]
    base = s["base"]
    repo = repo_id or "ORG/REPO"
    ckpt = (f"`{base['checkpoint']}` (sha256 `{base.get('checkpoint_sha256', '')}`)" if base.get("checkpoint")
            else "not recorded (the core was not loaded from a file)")
    lines = [
        "---", front, "---", "",
        f"# {info.get('name') or path.stem}: a samadapt adapter" + (f" for {s['domain']}" if s.get("domain") else ""),
        "",
        f"A {'+'.join(s['kinds']) or 'no-kind'} adapter (decoder {(s.get('decoder') or {}).get('policy', 'frozen')}) "
        f"for a frozen Segment Anything core, made with [samadapt](https://pypi.org/project/samadapt/).",
        "",
        "| base | |", "|---|---|",
        f"| arch | `{base.get('arch')}` @ {base.get('image_size')} px |",
        f"| fingerprint | `{base.get('fingerprint')}` |",
        f"| checkpoint | {ckpt} |",
        f"| file | `{path.name}`, sha256 `{sha}` |",
        "",
        "## Use", "",
        FENCE + "bash",
        f"samadapt pull {repo}/{path.name}",
        FENCE, "",
        FENCE + "python",
        "from samadapt import adapters",
        "from samadapt.sam_core import load_sam",
        f"sam = load_sam({base.get('checkpoint', 'BASE_CHECKPOINT')!r})",
        f"adapters.load(sam, \"hf://{repo}/{path.name}\", sha256=\"{sha}\")",
        FENCE, "",
    ]
    metrics = s.get("metrics") or {}
    flat = metrics.get("eval", metrics) if isinstance(metrics, dict) else {}
    if isinstance(flat, dict) and flat:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in flat.items()]
        lines.append("")
    if s.get("recipe"):
        lines += ["## Recipe", "", FENCE + "yaml", s["recipe"].rstrip(), FENCE, ""]
    if license is None:
        lines += ["## Licence", "", "Not stated: the author did not pass `--license`.", ""]
    text = "\n".join(lines)
    yaml.safe_load(front)  # what the card claims must be YAML a reader can parse
    return text


def _api(token: Union[str, bool, None]):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), token=token)


def push(file: Union[str, os.PathLike], repo_id: str, private: bool = False, revision: Optional[str] = None,
         token: Union[str, bool, None] = None, license: Optional[str] = None,
         commit_message: Optional[str] = None) -> str:
    """Upload an adapter file and a generated model card (README.md) to a Hub repository in one commit.

    The repository is created if missing (`private` applies then); a `revision` branch is created from
    `main` if missing.

    Args:
        file: the adapter `.safetensors` file (checked first: a damaged file is never uploaded).
        repo_id: `org/name`.
        private: create the repository private.
        revision: the branch to commit to (default `main`).
        token: a Hub token (default: huggingface_hub's usual places).
        license: the adapter's licence id for the card.
        commit_message: default `Upload <file> with samadapt`.

    Returns:
        The commit's URL.

    Raises:
        AdapterFormatError: not a samadapt adapter file. SourceError: the Hub refused or cannot be reached.

    Example:
        >>> # push("runs/cod/adapter.safetensors", "me/cod-adapter", private=True)
    """
    from huggingface_hub import CommitOperationAdd

    path = Path(file)
    card = model_card(path, repo_id, license)  # also checks the file is a readable adapter
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise SourceError(f"repository {repo_id!r} should be written org/name")
    api = _api(token)
    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path.name, str(path)), CommitOperationAdd("README.md", card.encode())],
            commit_message=commit_message or f"Upload {path.name} with samadapt",
            revision=revision,
        )
    except Exception as e:  # noqa: BLE001 -- huggingface_hub / httpx failures become one line
        raise _hub_error(e, where) from None
    return str(info.commit_url)


def _pick_file(repo_id: str, revision: Optional[str], token: Union[str, bool, None]) -> str:
    """The repository's one `.safetensors` file (several: the user must name one)."""
    try:
        files = _api(token).list_repo_files(repo_id, revision=revision)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, f"hf://{repo_id}") from None
    found: List[str] = sorted(f for f in files if f.endswith(".safetensors"))
    if len(found) != 1:
        what = f"{len(found)} .safetensors files ({', '.join(found[:5])})" if found else "no .safetensors file"
        raise SourceError(f"hf://{repo_id} holds {what}; name one: samadapt pull {repo_id}/FILE")
    return found[0]


def pull(spec: str, dest: Union[str, os.PathLike] = ".", revision: Optional[str] = None,
         token: Union[str, bool, None] = None, sha256: Optional[str] = None) -> Path:
    """Download an adapter file from the Hub into folder `dest` (through huggingface_hub's cache).

    Args:
        spec: `org/repo` (its one `.safetensors` file) or `org/repo/path/file.safetensors`.
        dest: the folder to put it in (created if missing).
        revision: branch, tag or commit (default `main`).
        token: a Hub token (default: huggingface_hub's usual places).
        sha256: refuse the file unless it has this hash.

    Returns:
        The path of the file in `dest`.

    Raises:
        SourceError: cannot be fetched, or `dest` already holds a different file of that name (never
            overwritten). HashMismatchError: the pin differs. AdapterFormatError: not an adapter file.

    Example:
        >>> # pull("me/cod-adapter", dest="adapters/", revision="v2")
    """
    from .io import atomic_file, inspect
    from .sources import _fetch_hf, _normal_pin, check_sha256

    spec = spec[len("hf://"):] if spec.startswith("hf://") else spec
    parts = spec.split("/", 2)
    if len(parts) < 2 or not all(parts):
        raise SourceError(f"{spec!r} should be org/repo or org/repo/file.safetensors")
    repo_id = f"{parts[0]}/{parts[1]}"
    filename = parts[2] if len(parts) == 3 else _pick_file(repo_id, revision, token)
    source = f"hf://{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    pin = _normal_pin(sha256, source)
    cached = _fetch_hf(source, token=token)
    if pin is not None:
        check_sha256(cached, pin, source)
    inspect(cached)  # a file that is not an adapter is refused before it lands in dest
    out = Path(dest) / Path(filename).name
    if out.exists():
        if out.is_file() and file_sha256(out) == file_sha256(cached):
            return out  # the same file is already there
        raise SourceError(f"{out} already exists and differs from {source}; move it away or pull into another "
                          f"folder (--out)")
    with atomic_file(out) as tmp:
        shutil.copyfile(cached, tmp)
    return out
