"""Adaptation on the synthetic domains: every adapter kind against the frozen core, a fixed prior,
the decoder alone and the whole core fine-tuned, over seeds.

    python benchmarks/adaptation.py --json benchmarks/results/adaptation.json \
        --figure benchmarks/results/adaptation.png

Each (domain, seed) trains every method from the same recipe (the demo's, with the domain's data,
prompts and loss) for the same number of steps, and scores all rows with one code path
(`samadapt.recipes.compare`) on the same held-out images. `--jobs 2` runs two trainings at once,
one torch thread each (the tiny core's small matrices use 2 cores better that way); train times
are then per job, on one thread. Prints a Markdown table: mean +- std over the seeds.
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

METRICS = ["s_measure", "e_measure_mean", "weighted_f", "mae", "ber", "dice", "iou"]
SHOWN = {  # the columns of each domain's table: the metrics its benchmarks report
    "camouflage": ["s_measure", "e_measure_mean", "weighted_f", "mae", "iou"],
    "shadow": ["ber", "iou", "mae"],
    "polyp": ["dice", "iou", "mae"],
}
LOWER = {"mae", "ber"}
LABEL = {"s_measure": "S", "e_measure_mean": "E", "weighted_f": "wF", "mae": "MAE", "ber": "BER",
         "dice": "Dice", "iou": "IoU"}
# The demo recipe, moved to each domain: its data, prompts and loss. Camouflage and shadow train
# promptless (their benchmarks score one map per image); polyps train with a box or clicks per
# batch, as interactive medical tools do, and are scored with the tight box.
DOMAINS: Dict[str, List[str]] = {
    "camouflage": [],
    "shadow": ["domain=shadow", "data.synthetic=shadow", "adapter.name=shadow", "eval.select=ber"],
    "polyp": ["domain=polyp", "data.synthetic=polyp", "adapter.name=polyp", "prompts.mode=mixed",
              "prompts.n_pos=1", "loss.iou=0", "loss.dice=1", "eval.select=dice"],
}
EXAMPLES = 2  # held-out images per domain in the figure (seed 0)
KEEP_PROMPTS = {"camouflage"}  # the "keep prompts" row: the demo's domain (promptless; polyps train prompted)


def recipe(domain: str, seed: int, extra: List[str]):
    from samadapt.recipes.config import load_recipe

    return load_recipe("demo", DOMAINS[domain] + [f"train.seed={seed}", f"eval.metrics={METRICS}"] + extra)


def one(task) -> Dict[str, Any]:
    """Run one (domain, seed, method) in this process; returns a JSON-able row."""
    domain, seed, method, out_root, threads, extra = task
    import torch

    torch.set_num_threads(threads)
    from samadapt.recipes.compare import pairwise_iou, run_method

    cfg = recipe(domain, seed, extra)
    row = run_method(cfg, method, Path(out_root) / f"{domain}_s{seed}", check_prompts=True, reuse=True)
    keep = {"domain": domain, "seed": seed, "method": method, "metrics": row["metrics"], "params": row["params"],
            "file_bytes": row["file_bytes"], "train_s": round(row["seconds"], 1),
            "follow": pairwise_iou([p > 0.5 for p in row["probs"]]), "gt_follow": pairwise_iou(row["gts"]),
            "prompts": row.get("prompts")}
    if seed == 0:  # masks for the figure
        keep["examples"] = [(p[::2, ::2] > 0.5).tolist() for p in row["probs"][:EXAMPLES]]
    print(f"  {domain} seed {seed} {method}: " + " ".join(f"{k}={v:.3f}" for k, v in row["metrics"].items())
          + f"  ({row['seconds']:.0f} s)", flush=True)
    return keep


def table(rows: List[Dict[str, Any]], domain: str, methods: List[str]) -> str:
    cols = SHOWN[domain]
    head = "| method | " + " | ".join(LABEL[c] + (" (lower better)" if c in LOWER else "") for c in cols)
    head += " | follow (GT {gt:.2f}) | box IoU, generic scenes | trained params | file | train s |"
    gt = np.mean([r["gt_follow"] for r in rows if r["domain"] == domain])
    lines = [head.format(gt=gt), "|" + "---|" * (len(cols) + 6)]
    for m in methods:
        rs = [r for r in rows if r["domain"] == domain and r["method"] == m]
        if not rs:
            continue
        cells = []
        for c in cols:
            v = np.array([r["metrics"][c] for r in rs])
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        fol = np.array([r["follow"] for r in rs])
        cells.append(f"{fol.mean():.2f}")
        kept = [r["prompts"]["box_iou"] for r in rs if r.get("prompts")]
        cells.append(f"{np.mean(kept):.2f}" if kept else "-")
        cells.append(f"{rs[0]['params']:,}" if rs[0]["params"] else "-")
        cells.append(f"{rs[0]['file_bytes'] / 1e6:.2f} MB" if rs[0]["file_bytes"] else "-")
        cells.append(f"{np.mean([r['train_s'] for r in rs]):.0f}" if rs[0]["params"] else "-")
        label = m if len(rs) == 3 else f"{m} ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: List[Dict[str, Any]], domains: List[str], methods: List[str], path: Path, extra) -> None:
    """Examples (image | ground truth | each method's mask, seed 0) and an IoU bar chart per domain."""
    from PIL import Image, ImageDraw

    from samadapt.recipes.data.pipeline import build_datasets
    from samadapt.recipes.evaluate import overlay, tile_row

    tile, pad = 128, 2
    label_h = 16
    blocks = []
    for d in domains:
        cfg = recipe(d, 0, extra)
        _, eval_ds = build_datasets(cfg, cfg["data"]["synthetic_image_size"])
        for i in range(EXAMPLES):
            item = eval_ds[i]
            h, w = (int(v) for v in item["input_size"])
            img = item["image"][:, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8)[::2, ::2]
            gt = item["mask"][0, :h, :w].numpy()[::2, ::2] > 0.5

            tiles = [img, overlay(img, gt)]
            for m in methods:
                r = next((r for r in rows if r["domain"] == d and r["seed"] == 0 and r["method"] == m), None)
                tiles.append(overlay(img, np.array(r["examples"][i], bool)) if r else np.full_like(img, 255))
            blocks.append(tile_row(tiles, pad))
    grid = np.concatenate(blocks, 0)
    # IoU bars: one group per domain, one bar per method, whiskers = std over seeds
    bar_h = 150
    chart = Image.new("RGB", (grid.shape[1], bar_h * len(domains)), "white")
    dr = ImageDraw.Draw(chart)
    col_w = tile + 2 * pad
    for k, d in enumerate(domains):
        y0 = k * bar_h
        n_seeds = len({r["seed"] for r in rows if r["domain"] == d})
        dr.text((4, y0 + 4), f"{d}: mean IoU over {n_seeds} seeds", fill="black")
        for j, m in enumerate(methods):
            v = np.array([r["metrics"]["iou"] for r in rows if r["domain"] == d and r["method"] == m])
            if not len(v):
                continue
            x = (2 + j) * col_w + col_w // 4
            top = y0 + bar_h - 20 - int(v.mean() * (bar_h - 40))
            dr.rectangle([x, top, x + col_w // 2, y0 + bar_h - 20], fill=(200, 60, 60))
            sd = int(v.std() * (bar_h - 40))
            dr.line([x + col_w // 4, top - sd, x + col_w // 4, top + sd], fill="black", width=2)
            dr.text((x, top - sd - 14), f"{v.mean():.2f}", fill="black")
        dr.line([2 * col_w, y0 + bar_h - 20, chart.width, y0 + bar_h - 20], fill="black")
    header = Image.new("RGB", (grid.shape[1], label_h), "white")
    hd = ImageDraw.Draw(header)
    for j, name in enumerate(["image", "ground truth"] + methods):
        hd.text((j * col_w + 4, 2), name, fill="black")
    out = Image.new("RGB", (grid.shape[1], label_h + grid.shape[0] + chart.height), "white")
    out.paste(header, (0, 0))
    out.paste(Image.fromarray(grid), (0, label_h))
    out.paste(chart, (0, label_h + grid.shape[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    out.save(tmp)
    os.replace(tmp, path)


def main() -> int:
    from samadapt.recipes.compare import METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once (one torch thread each when > 1)")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every run (key=value)")
    ap.add_argument("--work", default="runs/adaptation_benchmark", help="run directories")
    ap.add_argument("--json", help="write every row (and the machine) here")
    ap.add_argument("--figure", help="write the figure (PNG) here")
    ap.add_argument("--rows", help="print the tables (and write --figure) from a run's .rows.jsonl; runs nothing")
    args = ap.parse_args()
    info = machine()
    tasks = [(d, s, m, args.work, 1 if args.jobs > 1 else 2, args.set)
             for d in args.domains for s in args.seeds for m in args.methods
             if m != "combined + keep prompts" or d in KEEP_PROMPTS]
    # seed by seed (a run stopped early still has whole seeds), the longest first within one
    tasks.sort(key=lambda t: (t[1], METHODS[t[2]] is None, t[2] not in ("full fine-tune", "dora", "combined",
                                                                        "combined + keep prompts")))
    t0 = time.time()
    rows: List[Dict[str, Any]] = []
    partial = Path(args.json + ".rows.jsonl") if args.json else None
    if args.rows:  # tables and figure from the rows a run wrote, without running anything
        rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    elif args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for row in pool.imap_unordered(one, tasks, chunksize=1):
                rows.append(row)
                if partial:
                    with partial.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    else:
        rows = [one(t) for t in tasks]
    wall = time.time() - t0
    print(f"\n{len(tasks)} runs in {wall / 60:.1f} min ({args.jobs} jobs); seeds {args.seeds}; "
          f"load average at start {info.get('loadavg_at_start')}\n")
    for d in args.domains:
        print(f"### {d}\n\n{table(rows, d, args.methods)}\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": info, "wall_s": wall, "args": vars(args),
                                               "rows": [{k: v for k, v in r.items() if k != "examples"}
                                                        for r in rows]}, indent=1))
    if args.figure:
        figure(rows, args.domains, args.methods, Path(args.figure), args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
