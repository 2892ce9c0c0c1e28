"""`samadapt push`, `pull` and `convert`: sharing adapter files on the Hub and with peft users.

The work is done by `samadapt.adapters.hub` and `samadapt.adapters.peft_interop`; these commands turn
arguments into calls and print one line of result. Every failure the user can fix (a missing file, a
repository that refuses, a kind peft cannot express) is an `error: ...` line and exit 2.
"""
import json
from pathlib import Path

from .errors import UserError


class ShareError(UserError, ValueError):
    """A user error of `samadapt push`, `pull` or `convert` (exit 2, nothing written)."""


def cmd_push(args) -> int:
    """`samadapt push FILE org/repo [--private] [--revision REV] [--license ID]`: upload file + model card."""
    from samadapt.adapters.hub import push

    if not Path(args.file).is_file():
        raise ShareError(f"{args.file}: no such adapter file")
    url = push(args.file, args.repo, private=args.private, revision=args.revision, license=args.license,
               commit_message=args.message)
    print(f"pushed {Path(args.file).name} and README.md to {args.repo}"
          f"{'@' + args.revision if args.revision else ''}: {url}")
    return 0


def cmd_pull(args) -> int:
    """`samadapt pull org/repo[/file] [--revision REV] [--out DIR] [--sha256 HEX]`: download an adapter."""
    from samadapt.adapters.hub import pull

    path = pull(args.spec, dest=args.out, revision=args.revision, sha256=args.sha256)
    print(path)
    return 0


def _peft_base(args, peft_dir: Path) -> str:
    """`--base`, or the peft folder's `base_model_name_or_path` when that is a local checkpoint."""
    if args.base:
        return args.base
    try:
        named = json.loads((peft_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and named and Path(named).exists():
        return named
    note = f"; the folder names {named!r}, not found here" if named else ""
    raise ShareError(f"convert --from peft needs the base the LoRA was trained on: pass --base CKPT (the "
                     f"SamModel folder or checkpoint{note})")


def cmd_convert(args) -> int:
    """`samadapt convert --to peft FILE DIR` / `--from peft DIR FILE --base CKPT`."""
    from samadapt.adapters import peft_interop

    src, dst = Path(args.src), Path(args.dst)
    if args.to:
        if not src.is_file():
            raise ShareError(f"{src}: no such adapter file")
        out = peft_interop.to_peft(src, dst, base_model_name_or_path=args.base_name)
        print(f"wrote peft adapter folder {out} (adapter_config.json, adapter_model.safetensors); load it with "
              f"PeftModel.from_pretrained(SamModel.from_pretrained(BASE), {str(out)!r})")
        return 0
    if not src.is_dir():
        raise ShareError(f"{src}: no such peft adapter folder")
    if dst.exists():
        raise ShareError(f"{dst} already exists; pass another output file (nothing is overwritten)")
    from .model import load_base

    sam = load_base(_peft_base(args, src))
    meta = {"domain": args.domain} if args.domain else {}
    out = peft_interop.from_peft(src, sam, dst, name=args.name, allow_base_mismatch=args.allow_base_mismatch, **meta)
    print(f"wrote samadapt adapter {out} (base {sam.arch}@{sam.image_size}, fingerprint {sam.fingerprint})")
    return 0


def add_parsers(sub) -> None:
    """Add `push`, `pull` and `convert` to the `samadapt` subcommand parsers."""
    pu = sub.add_parser("push", help="upload an adapter file and a generated model card to a Hub repository")
    pu.add_argument("file", help="adapter .safetensors")
    pu.add_argument("repo", help="org/name (created if missing)")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--revision", help="branch to commit to (created from main if missing; default main)")
    pu.add_argument("--license", help="the adapter's licence id for the card (apache-2.0, mit, ...; default other)")
    pu.add_argument("--message", help="commit message")
    pu.set_defaults(func=cmd_push)

    pl = sub.add_parser("pull", help="download an adapter file from a Hub repository")
    pl.add_argument("spec", metavar="org/repo[/file]", help="repository (its one .safetensors) or a file in it")
    pl.add_argument("--revision", help="branch, tag or commit (default main)")
    pl.add_argument("--out", default=".", help="folder to put the file in (default: here)")
    pl.add_argument("--sha256", help="refuse the file unless it has this sha256")
    pl.set_defaults(func=cmd_pull)

    c = sub.add_parser("convert", help="LoRA-only adapters to and from peft adapter folders (transformers SamModel)")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["peft"], help="samadapt FILE -> peft folder DIR")
    way.add_argument("--from", dest="from_", choices=["peft"], help="peft folder DIR -> samadapt FILE")
    c.add_argument("src", help="--to: the adapter .safetensors; --from: the peft folder")
    c.add_argument("dst", help="--to: the peft folder to create; --from: the .safetensors to write")
    c.add_argument("--base", help="--from: the base checkpoint the LoRA was trained on (SamModel folder or file)")
    c.add_argument("--base-name", help="--to: base_model_name_or_path for adapter_config.json")
    c.add_argument("--name", help="--from: the adapter's name (default: the output file's stem)")
    c.add_argument("--domain", help="--from: the adapter's domain metadata")
    c.add_argument("--allow-base-mismatch", action="store_true",
                   help="--from: convert even if the folder records another base")
    c.set_defaults(func=cmd_convert)
