"""The `base` an adapter file records: arch, image size, fingerprint and, when known, the base checkpoint's
file name and sha256; and how messages describe it.
"""
from typing import Any, Dict

from torch import nn


def base_record(sam: nn.Module, fingerprint: str) -> Dict[str, Any]:
    """The file's `base` metadata: arch, image size, fingerprint and, when the core was loaded from a file
    (`load_sam` sets `sam.checkpoint`), that file's name and sha256, so a user holding several checkpoints
    can tell which one the adapter needs.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> sorted(base_record(build_sam("tiny"), "ab12"))   # built, not loaded: no checkpoint keys
        ['arch', 'fingerprint', 'image_size']
    """
    out: Dict[str, Any] = {"arch": sam.arch, "image_size": sam.image_size, "fingerprint": fingerprint}
    ckpt = getattr(sam, "checkpoint", None)
    sha = getattr(ckpt, "sha256", None) if ckpt is not None else None
    if sha:  # None when the file changed on disk since the core was read from it
        out["checkpoint"] = str(ckpt.name)
        out["checkpoint_sha256"] = sha
    return out


def describe_base(base: Dict[str, Any]) -> str:
    """`vit_b@1024, fingerprint ab12..., checkpoint sam_vit_b.pth (sha256 0123abcd...)` for messages.

    Example:
        >>> describe_base({"arch": "tiny", "image_size": 256, "fingerprint": "ab12", "checkpoint": "t.pth",
        ...                "checkpoint_sha256": "0123456789abcdef" * 4})
        'tiny@256, fingerprint ab12, checkpoint t.pth (sha256 0123456789abcdef...)'
    """
    text = f"{base.get('arch')}@{base.get('image_size')}, fingerprint {base.get('fingerprint')}"
    if base.get("checkpoint"):
        sha = str(base.get("checkpoint_sha256") or "")
        text += f", checkpoint {base['checkpoint']}" + (f" (sha256 {sha[:16]}...)" if sha else "")
    return text
