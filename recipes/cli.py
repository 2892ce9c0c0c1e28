"""`samadapt` command line: demo, train, eval, predict, inspect, convert, push, pull, serve.

User errors (bad path, bad recipe, wrong adapter for this base, unreadable image) print one line
`error: ...` to stderr and exit 2, with no traceback and no partial output files.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .errors import UserError


def version() -> str:
    """The installed distribution's version (`samadapt --version` prints `samadapt <version>`).

    Example:
        >>> from importlib.metadata import version as dist_version
        >>> version() == dist_version("samadapt")
        True
    """
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("samadapt")
    except PackageNotFoundError:  # imported from a checkout that was never installed
        return "unknown (not installed)"


def user_errors() -> tuple:
    """The exceptions `main` turns into one `error: ...` line and exit 2: every `UserError`, adapter and
    checkpoint errors, and OS path errors (missing, not a folder, a folder). Disk full, read-only and no
    permission are turned into a line with the fix by `main` itself (`checkpointing.OS_FIXES`).
    """
    errors = [UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError]
    # only modules already imported can have raised their errors: importing them here would cost torch's
    # import (seconds) to a command that never needed it (`inspect`)
    if "samadapt.adapters" in sys.modules:
        from samadapt.adapters import AdapterError

        errors.append(AdapterError)
    if "samadapt.sam_core" in sys.modules:
        from samadapt.sam_core import CheckpointError

        errors.append(CheckpointError)
    return tuple(errors)


# The optional extras and the top-level modules each brings: a command that needs a missing one says so.
EXTRAS = {
    "train": ("accelerate", "albumentations", "albucore", "scipy", "tensorboard"),
    "serve": ("fastapi", "uvicorn", "starlette", "pydantic", "multipart", "python_multipart", "fastapi_offline"),
    "medical": ("nibabel", "pydicom"),
    "coco": ("pycocotools",),
}


def missing_extra(e: ModuleNotFoundError) -> Optional[str]:
    """The extra whose package `e` failed to import, or None when it is not one of ours.

    Example:
        >>> missing_extra(ModuleNotFoundError("No module named 'fastapi'", name="fastapi"))
        'serve'
        >>> missing_extra(ModuleNotFoundError("No module named 'nope'", name="nope")) is None
        True
    """
    top = (e.name or "").split(".")[0]
    return next((extra for extra, mods in EXTRAS.items() if top in mods), None)


def cmd_train(args) -> int:
    """`samadapt train`: run a recipe."""
    from .config import load_recipe
    from .train import train

    cfg = load_recipe(args.recipe, args.set)
    if cfg["volume"]["enabled"]:  # volumes and a K-class head: recipes/volumes.py
        from .volumes import train_volumes

        train_volumes(cfg, out_dir=args.out, data_root=args.data, base=args.base, resume=args.resume,
                      progress=not args.quiet, allow_random_base=args.allow_random_base)
        return 0
    train(cfg, out_dir=args.out, data_root=args.data, base=args.base, resume=args.resume, progress=not args.quiet,
          allow_random_base=args.allow_random_base)
    return 0


def cmd_demo(args) -> int:
    """`samadapt demo [organs]`."""
    if args.which == "organs":  # multi-organ CT phantoms: recipes/demo_organs.py
        from .demo_organs import run_organs_demo

        return run_organs_demo(out_dir=args.out or "runs/demo_organs", quick=args.quick, overrides=args.set)
    from .demo import run_demo

    return run_demo(out_dir=args.out or "runs/demo", quick=args.quick, overrides=args.set)


def cmd_eval(args) -> int:
    """`samadapt eval`."""
    from .config import load_recipe
    from .evaluate import run_eval

    cfg = load_recipe(args.recipe, args.set)
    if cfg["volume"]["enabled"]:  # per-class, per-volume metrics: recipes/volumes.py
        from .volumes import run_volume_eval

        return run_volume_eval(args, cfg)

    return run_eval(args)


def cmd_inspect(args) -> int:
    """`samadapt inspect FILE`: an adapter file's metadata as a table (or `--json`), read without torch."""
    from .inspect import format_table, inspect_file

    info = inspect_file(args.file)
    if args.json:
        if not args.tensors:
            info.pop("tensor_list", None)
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(format_table(info, tensors=args.tensors))
    if info.get("non_finite"):
        print(f"warning: {args.file}: {len(info['non_finite'])} tensor(s) hold NaN/infinity; it will not load",
              file=sys.stderr)
    return 0


def cmd_predict(args) -> int:
    """`samadapt predict`."""
    from .predict import run_predict

    return run_predict(args)


def cmd_serve(args) -> int:
    """`samadapt serve`."""
    from .serve import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    """The `samadapt` argument parser (no work at import time: each subcommand imports what it needs)."""
    p = argparse.ArgumentParser(
        prog="samadapt", description="Parameter-efficient domain adaptation of Segment Anything"
    )
    p.add_argument("--version", action="version", version=f"samadapt {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a camouflage adapter on the tiny core and compare it with the frozen core")
    d.add_argument("which", nargs="?", default="camouflage", choices=["camouflage", "organs"],
                   help="camouflage (default) or organs (multi-organ CT phantoms, per-class Dice)")
    d.add_argument("--out", default=None, help="run directory (default runs/demo, runs/demo_organs for organs)")
    d.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train an adapter from a YAML recipe")
    builtin = ", ".join(sorted(f.stem for f in (Path(__file__).parent / "configs").glob("*.yaml")))
    t.add_argument("recipe", metavar="RECIPE", help=f"recipe YAML path or built-in name ({builtin})")
    t.add_argument("--data", nargs="+", metavar="DIR", help="dataset folder(s) (overrides data.root)")
    t.add_argument("--base", metavar="CKPT",
                   help="SAM checkpoint (Meta .pth, .safetensors, or a Hugging Face SamModel folder)")
    t.add_argument("--out", metavar="DIR", help="run directory (default: output.dir or runs/<name>)")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key, e.g. train.lr=1e-4"
    )
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--allow-random-base", action="store_true",
                   help="train on a randomly initialised full-size core when no --base is given (else refused)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate the frozen core and an adapter on a dataset")
    e.add_argument("--adapter", metavar="FILE", help="adapter .safetensors (omit: the frozen core only)")
    e.add_argument("--base", metavar="CKPT", help="SAM checkpoint (default: the recipe's base)")
    e.add_argument("--recipe", default="demo", metavar="RECIPE", help="recipe for data/prompt/metric settings")
    e.add_argument("--data", nargs="+", metavar="DIR", help="dataset folder(s)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--json", metavar="FILE", help="write the metrics here as JSON")
    e.add_argument("--allow-random-base", action="store_true",
                   help="evaluate a randomly initialised full-size core when no --base is given (else refused)")
    e.add_argument("--allow-base-mismatch", action="store_true",
                   help="load the adapter even if it was made for other base weights")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="masks for images (or label maps for volumes) with a base and an adapter")
    pr.add_argument("images", nargs="+", metavar="IMAGE",
                    help="image files or folders; NIfTI files or DICOM folders for volumes")
    pr.add_argument("--base", metavar="CKPT", help="SAM checkpoint (default: the pretrained tiny core)")
    pr.add_argument("--adapter", metavar="FILE", help="adapter .safetensors")
    pr.add_argument("--out", required=True, metavar="DIR", help="output folder")
    pr.add_argument("--box", metavar="X0,Y0,X1,Y1", help="box prompt, in image pixels")
    pr.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                    help="point prompt, label 1 (default) or 0 (repeatable)")
    pr.add_argument("--prompts", metavar="FILE",
                    help="JSON file: {image name: {box: [...], points: [[x, y, label], ...]}}, or COCO boxes")
    pr.add_argument("--auto", action="store_true", help="automatic mask generation (point grid)")
    pr.add_argument("--points-per-side", type=int, default=32, metavar="N", help="--auto grid: 1 to 64 points a side")
    pr.add_argument("--pred-iou-thresh", type=float, default=None, metavar="T",
                    help="--auto: keep masks whose predicted IoU is above this (default 0.88)")
    pr.add_argument("--stability-score-thresh", type=float, default=None, metavar="T",
                    help="--auto: keep masks at least this stable (default 0.95)")
    pr.add_argument("--box-nms-thresh", type=float, default=None, metavar="T",
                    help="--auto: box IoU above which the lower-scoring duplicate is dropped (default 0.7)")
    pr.add_argument("--min-mask-region-area", type=int, default=None, metavar="PX",
                    help="--auto: remove holes and islands under this many pixels (default 0: off)")
    pr.add_argument("--crop-n-layers", type=int, default=None, metavar="N",
                    help="--auto: also run on 4^k crops for k = 1..N (default 0: the whole image only)")
    pr.add_argument("--multimask", action="store_true",
                    help="three candidate masks per prompt set (SAM's ambiguity outputs), each with its score")
    pr.add_argument("--format", default="png", choices=["png", "coco", "both"],
                    help="png: mask PNGs; coco: coco.json (RLE, needs pycocotools); both (default png)")
    pr.add_argument("--max-pixels", type=int, default=None, metavar="N",
                    help="refuse (that image only) images over this many pixels (default 4096 x 4096)")
    pr.add_argument("--probs", action="store_true", help="also write probability maps")
    pr.add_argument("--no-overlay", action="store_true", help="do not write overlays")
    pr.add_argument("--batch-size", type=int, default=None, metavar="N",
                    help="images per encoder batch (default 8; 1 on a CPU from 512 px, where batching was "
                         "slower per image)")
    # volumes (NIfTI files, DICOM folders) with a multi-class adapter: DIR/<name>_seg.nii.gz
    # (recipes/predict_volume.py); --probs adds one probability volume per class, --batch-size is slices per forward
    pr.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                    help="image encoder on a CPU: auto (bf16 where the CPU has native bf16, else fp32), or force "
                         "one (default: $SAMADAPT_PRECISION, else auto)")
    pr.add_argument("--allow-base-mismatch", action="store_true",
                    help="load the adapter even if it was made for other base weights")
    pr.set_defaults(func=cmd_predict)

    i = sub.add_parser("inspect", help="show an adapter file's metadata and tensors (no model needed)")
    i.add_argument("file", metavar="FILE", help="an adapter .safetensors file (other files: says what they are)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--tensors", action="store_true", help="also list every tensor's name, shape and dtype")
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("serve", help="HTTP API and interactive page: one frozen core, many adapters")
    s.add_argument("--base", help="SAM checkpoint (default: the pretrained tiny core)")
    s.add_argument("--adapters", required=True,
                   help="folder of adapter .safetensors files, or a .yaml/.json catalogue: name -> path, "
                        "http(s) URL or hf://org/repo/file[@revision] (optionally {source: ..., sha256: ...})")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    # checked by the command, not argparse, so a bad value is one `error:` line like every other user error
    s.add_argument("--port", default=8000, help="TCP port, 0..65535 (0 picks a free one; default 8000)")
    s.add_argument("--capacity", type=int, default=8, help="adapters kept resident")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another Host name clients use (a reverse proxy's public name; repeatable); "
                        "localhost, 127.0.0.1, [::1] and the --host address are always allowed")
    s.add_argument("--request-timeout", default=60.0, metavar="S",
                   help="seconds a model request may take, waiting included (504/503 after; default 60)")
    s.add_argument("--max-queue", default=8, metavar="N",
                   help="model requests that may wait while one runs (503 with Retry-After beyond; default 8)")
    s.add_argument("--engine", choices=["single", "ray"], default="single",
                   help="single: one process (default); ray: the same API on Ray Serve with --replicas model "
                        "replicas, adapters routed to the replicas that hold them (pip install 'samadapt[serve-ray]')")
    s.add_argument("--replicas", default=2, metavar="N", help="model replicas with --engine ray (default 2)")
    s.add_argument("--address", default=None,
                   help="Ray cluster to join with --engine ray (default: start a local Ray instance)")
    s.add_argument("--max-batch", default=None, metavar="N",
                   help="concurrent requests needing an image embedding that are embedded together, in one "
                        "encoder pass across adapters (1: no batching; default 8, 1 on a CPU from 512 px)")
    s.add_argument("--max-wait-ms", default=5.0, metavar="MS",
                   help="longest such a request waits for others to batch with (default 5)")
    s.add_argument("--auto-budget", default=2**30, metavar="PIXEL_POINTS",
                   help="most width x height x points_per_side^2 one /api/auto may ask for (422 above; "
                        "default 1073741824)")
    s.add_argument("--header-timeout", default=10.0, metavar="S",
                   help="seconds a client has to send its request head (default 10)")
    s.add_argument("--body-timeout", default=30.0, metavar="S",
                   help="seconds a client has to send its request body (default 30)")
    s.add_argument("--allow-base-mismatch", action="store_true",
                   help="serve adapters made for other base weights too")
    s.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="image encoder on a CPU: auto (bf16 where the CPU has native bf16, else fp32), or force "
                        "one (default: $SAMADAPT_PRECISION, else auto); /api/health shows the route")
    s.set_defaults(func=cmd_serve)

    from .share import add_parsers

    add_parsers(sub)  # push, pull, convert
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run `samadapt ARGS`; returns the exit status (0, 2 for a user error, 130 when interrupted).

    Example:
        >>> main(["inspect", "no/such/file.safetensors"])
        2
    """
    from .threads import configure_openmp

    configure_openmp()  # before anything imports torch: idle OpenMP threads sleep, not spin (threads.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        extra = missing_extra(e)
        if extra is None:
            raise
        print(f"error: samadapt {args.command} needs the {extra!r} extra ({e.name} is not installed); "
              f"install it with: pip install \"samadapt[{extra}]\"", file=sys.stderr)
        return 2
    except user_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and getattr(e, "filename", None):
            msg = f"{e.strerror}: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        from .rundir import OS_FIXES, os_problem

        if e.errno not in OS_FIXES:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{os_problem(e)}", file=sys.stderr)  # disk full, read-only, no permission
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run the imported module's main so exception classes are the ones other modules raise
    from samadapt.recipes.cli import main as _main

    sys.exit(_main())
