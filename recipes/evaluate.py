"""`samadapt eval`: the frozen core and (optionally) an adapter on a dataset's evaluation split."""
import json
from pathlib import Path
from typing import Any, Dict

from torch.utils.data import DataLoader

from samadapt import adapters

from .config import load_recipe
from .trainer import _collate_with_index, _Indexed, atomic_write_text, build_core, build_datasets, evaluate, load_base


def run_eval(args) -> int:
    """Print frozen vs adapted metrics; `--json PATH` also writes them.

    Example (shell):
        samadapt eval --recipe demo --adapter runs/demo/adapter.safetensors
    """
    from accelerate import Accelerator

    cfg = load_recipe(args.recipe, args.set)
    sam = load_base(args.base, cfg["base"]["image_size"]) if args.base else build_core(cfg)
    name = None
    if args.adapter:
        name = adapters.load(sam, args.adapter)
        meta = adapters.inspect(args.adapter)
        # evaluate with the prompts the adapter was trained with
        cfg["prompts"]["mode"] = meta.get("prompt_mode", cfg["prompts"]["mode"]) or "none"
    _, eval_ds = build_datasets(cfg, sam.image_size, args.data)
    loader = DataLoader(_Indexed(eval_ds), batch_size=cfg["eval"]["batch_size"], collate_fn=_collate_with_index)
    accelerator = Accelerator()
    loader = accelerator.prepare(loader)
    out: Dict[str, Any] = {"images": len(eval_ds)}
    out["frozen"], _ = evaluate(accelerator, sam, loader, cfg, None)
    if name is not None:
        out["adapted"], _ = evaluate(accelerator, sam, loader, cfg, name)
    if accelerator.is_main_process:
        cols = ["frozen"] + (["adapted"] if name else [])
        print(f"{'metric':<20}" + "".join(f"{c:>10}" for c in cols))
        for k in out["frozen"]:
            print(f"{k:<20}" + "".join(f"{out[c][k]:>10.4f}" for c in cols))
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(out, indent=2))
    return 0
