"""`samadapt demo`: a camouflage adapter on the frozen tiny core, frozen vs adapted, on CPU."""
import time
from pathlib import Path
from typing import List, Optional

from .config import load_recipe
from .train import train


def run_demo(out_dir: str = "runs/demo", quick: bool = False, overrides: Optional[List[str]] = None) -> int:
    """Train the `demo` recipe into `out_dir` (always fresh) and print frozen vs adapted metrics.

    Args:
        out_dir: the run directory; a previous demo run there is replaced.
        quick: one short epoch on fewer images (a smoke test).
        overrides: `key=value` recipe overrides, as `--set` takes them.

    Returns:
        0 (the exit status).

    Example (shell):
        samadapt demo --quick
    """
    overrides = list(overrides or [])
    if quick:
        overrides = ["train.epochs=1", "data.synthetic_train_size=32", "data.synthetic_eval_size=8"] + overrides
    cfg = load_recipe("demo", overrides)
    out = Path(out_dir)
    if (out / "checkpoints").exists():
        import shutil

        shutil.rmtree(out)  # the demo always starts fresh in its own folder
    t0 = time.time()
    res = train(cfg, out_dir=str(out))
    base = res.get("baseline", {}).get("eval", {})
    adapted = res.get("adapted", {}).get("eval", {})
    print()
    print(f"held-out synthetic camouflage images ({cfg['data']['synthetic_eval_size']}), frozen core vs adapted:")
    print(f"{'metric':<16}{'frozen':>10}{'adapted':>10}{'change':>10}")
    for k in adapted:
        b, a = base.get(k, float("nan")), adapted[k]
        print(f"{k:<16}{b:>10.4f}{a:>10.4f}{a - b:>+10.4f}")
    print(f"\nadapter: {out / 'adapter.safetensors'}  ({(out / 'adapter.safetensors').stat().st_size:,} bytes)")
    print(f"overlays: {out / 'samples'}  (image | ground truth | frozen | adapted)")
    print(f"done in {time.time() - t0:.0f} s")
    return 0
