"""Shared helpers for the benchmark scripts: timing, machine description, JSON output."""
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> Dict[str, object]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def time_blocks(
    fns: Dict[str, Callable[[], object]], rounds: int, block: int, sync: Callable[[], None] = lambda: None
):
    """Time several functions in the same process, interleaved in blocks.

    Each round runs every function `block + 1` times in a row and keeps the last `block` calls
    (the first call of a block is its warm-up), so each function runs warm, as in real use
    (consecutive prompts on one image), while slow drifts of the machine hit all alike.
    Returns {name: {"wall_s": [...], "cpu_s": [...]}}.
    """
    out = {name: {"wall_s": [], "cpu_s": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            sync()
            for _ in range(block):
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                sync()
                out[name]["wall_s"].append(time.perf_counter() - w0)
                out[name]["cpu_s"].append(time.process_time() - c0)
    return out


def summary(samples: Sequence[float]) -> Dict[str, float]:
    s = sorted(samples)
    return {
        "median": statistics.median(s),
        "min": s[0],
        "p25": s[len(s) // 4],
        "p75": s[(3 * len(s)) // 4],
        "n": len(s),
    }


def write_json(path: str, payload: Dict, quiet: bool = False) -> None:
    """Write payload as JSON (to a temporary name, then renamed: a reader never sees half a file)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def core_with_four_adapters(arch: str = "vit_b", image_size: int = 512):
    """A random-weights core with four adapters attached (LoRA on qkv and proj, DoRA on qkv, sam_adapter,
    bottleneck), each nudged off its identity start by seeded noise so that every one changes the answer.

    Returns:
        `(sam, names)` with the adapters' names in attach order.
    """
    import torch

    from samadapt import adapters
    from samadapt.sam_core import build_sam

    torch.manual_seed(0)
    sam = build_sam(arch, image_size=image_size).eval()
    kinds = {"lora": [adapters.config("lora", r=4, targets=["qkv", "proj"])],
             "dora": [adapters.config("lora", r=4, use_dora=True, targets=["qkv"])],
             "evp": [adapters.config("sam_adapter")],
             "bottle": [adapters.config("bottleneck")]}
    for i, (name, cfgs) in enumerate(kinds.items()):
        adapters.attach(sam, cfgs, name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in adapters.adapter_parameters(sam, name):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return sam, list(kinds)
