"""`samadapt demo organs`: a multi-organ CT adapter on the frozen tiny core, on synthetic CT phantoms, on CPU.

Phantoms (bodies with 3-5 organ ellipsoids of distinct HU and texture, 0.8 x 0.8 x 3 mm, a flipped affine)
are written in the nnU-Net raw layout; the `organs` recipe (tiny core, 128 px) trains two rows and all
three are scored on the same held-out volumes by `volumes.evaluate_volumes`:

* frozen core -- the untrained class head on the frozen core (SAM's promptless mask for every class);
* head only -- the class head trained on the frozen encoder and decoder;
* adapted -- the recipe: LoRA on qkv, the decoder and the class head, a quarter of the batches prompted.

Then box and click prompts on the held-out organs, frozen core vs adapted (`volumes.prompt_ious`): the
adapter still answers prompts with class-agnostic masks.
"""
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import load_recipe
from .errors import RecipeError

MARKER = ".samadapt_organs_demo"
SETTINGS = ["base.arch=tiny", "base.image_size=128", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=30",
            "train.weight_decay=0.01", "train.mixed_precision=no", "eval.every_epochs=1000", "eval.baseline=false",
            "volume.nsd_tolerance=2.0"]
TRAIN_STEPS, HEAD_STEPS = 300, 150
N_TRAIN, N_TEST = 10, 4


def _fresh(out: Path) -> None:
    """The demo starts fresh: an earlier organs demo's folder is emptied, any other non-empty folder refused."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise RecipeError(f"--out {out} holds files that are not an organs demo's; give an empty or new folder")
        for e in out.iterdir():
            if e.name != MARKER:
                shutil.rmtree(e) if e.is_dir() else e.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by samadapt demo organs; the next demo here replaces this folder\n")


def organs_demo_rows(out: Path, overrides: List[str], steps=(TRAIN_STEPS, HEAD_STEPS), n=(N_TRAIN, N_TEST),
                     shape=(96, 96, 24), log=print) -> Dict[str, Any]:
    """Write phantoms, train the adapted and head-only rows, score all three rows and the prompts.

    Returns:
        {"rows": {label: evaluate_volumes result}, "prompts": {label: prompt_ious result}, "classes": names,
        "adapter": path, "seconds": {row: training seconds}}.
    """
    from samadapt import adapters

    from .data.medical import write_phantom_dataset
    from .model import build_core
    from .volumes import attach_with_head, evaluate_volumes, prompt_ious, train_volumes, volume_data

    data = write_phantom_dataset(out / "phantoms", n_train=n[0], n_test=n[1], shape=shape, seed=0, name="")
    base = SETTINGS + list(overrides)
    adapted_cfg = load_recipe("organs", base + [f"train.max_steps={steps[0]}"])
    head_cfg = load_recipe("organs", base + [f"train.max_steps={steps[1]}", "adapter.kinds=[]",
                                             "adapter.decoder=frozen", "prompts.keep_prompts=0"])
    seconds = {}
    for key, cfg in (("adapted", adapted_cfg), ("head-only", head_cfg)):
        log(f"training {key} ({cfg['train']['max_steps']} steps)")
        m = train_volumes(cfg, out_dir=str(out / key), data_root=str(data), progress=False, log=lambda *_: None)
        seconds[key] = m["train_seconds"]
    sam = build_core(adapted_cfg)
    _, held, classes, _, cache = volume_data(adapted_cfg, str(data))
    frozen = attach_with_head(sam, head_cfg, classes)  # untrained: the frozen core's promptless mask
    head = adapters.load(sam, out / "head-only" / "adapter.safetensors", name="head_only", activate=False)
    adapted = adapters.load(sam, out / "adapted" / "adapter.safetensors", name="adapted", activate=False)
    rows = {label: evaluate_volumes(sam, held, cache, classes, adapted_cfg, name)
            for label, name in (("frozen core", frozen), ("head only", head), ("adapted", adapted))}
    from .compare import prompt_following

    prompts = {}
    for label, name in (("frozen core", None), ("adapted", adapted)):
        prompts[label] = prompt_ious(sam, held, cache, name)
        prompts[label]["generic"] = prompt_following(sam, name)  # the tiny core's own domain: objects scenes
    return {"rows": rows, "prompts": prompts, "classes": [classes[k] for k in sorted(classes) if k != 0],
            "adapter": out / "adapted" / "adapter.safetensors", "seconds": seconds, "held_out": len(held)}


def print_organs(res: Dict[str, Any], elapsed: float) -> None:
    """The demo's tables."""
    from .volumes import format_class_table

    names = res["classes"]
    print(f"{res['held_out']} held-out synthetic CT volumes (96 x 96 x 24 at 0.8 x 0.8 x 3 mm), per-class Dice:")
    print(format_class_table(res["rows"], names, "dice"))
    print("mean over organs:   Dice    IoU  HD95 mm  NSD@2mm   train s")
    for label, r in res["rows"].items():
        m = r["mean"]
        s = res["seconds"].get(label.replace(" ", "-"), None)
        print(f"{label:<16}{m['dice']:>7.3f}{m['iou']:>7.3f}{m['hd95']:>9.2f}{m['nsd']:>9.3f}"
              f"{(f'{s:>10.0f}' if s is not None else '         -')}")
    p = res["prompts"]
    print(f"prompts, mean IoU:      organs box  organs click  generic box  generic click  "
          f"({p['adapted']['n']} held-out organ pieces; 48 generic scenes)")
    for label, r in p.items():
        g = r["generic"]
        print(f"{label:<22}{r['box']:>11.3f}{r['click']:>14.3f}{g['box_iou']:>13.3f}{g['click_iou']:>15.3f}")
    size = Path(res["adapter"]).stat().st_size
    print(f"\nadapter: {res['adapter']}  ({size:,} bytes; `samadapt inspect` lists its classes)")
    print(f"done in {elapsed:.0f} s")


def run_organs_demo(out_dir: str = "runs/demo_organs", quick: bool = False,
                    overrides: Optional[List[str]] = None) -> int:
    """Run the organs demo into `out_dir` and print its tables (see the module docstring).

    Args:
        out_dir: the demo folder; an earlier organs demo there is replaced, any other content refused.
        quick: a few steps on small phantoms (a smoke test; its numbers mean nothing).
        overrides: `key=value` recipe overrides, as `--set` takes them.

    Returns:
        0 (the exit status).

    Example (shell):
        samadapt demo organs
    """
    out = Path(out_dir)
    _fresh(out)
    t0 = time.time()
    kw: Dict[str, Any] = {"steps": (4, 4), "n": (2, 1), "shape": (48, 48, 8)} if quick else {}
    res = organs_demo_rows(out, list(overrides or []), **kw)
    print_organs(res, time.time() - t0)
    return 0
