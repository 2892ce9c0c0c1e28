"""The training data pipeline's host cost per batch at 1024 px: what each data loader worker spends on
one batch (read, augment, resize and pad, collate), with the training items' images and masks as uint8 (what
`build_datasets` gives the trainer) against float32 (what it gave before), in the same process,
interleaved rounds, medians. The loader has to keep up with the GPU: at 120 images/s and 8 workers
each worker has 67 ms per image.

    python benchmarks/data_pipeline.py                 # 32 synthetic camouflage scenes, 1024 px
    python benchmarks/data_pipeline.py --images 8 --rounds 2 --size 256   # a quick run

Also printed: the bytes of one batch (what is pinned and copied to the device each step), JPEG
against PNG decoding of the same scenes, and whether the two dtypes give the same values.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a loader worker's view: one thread
    from gpu_trainer import _write_folder

    from samadapt.recipes.config import load_recipe
    from samadapt.recipes.data import collate_batch
    from samadapt.recipes.data.pipeline import AugmentedItems, build_datasets

    work = Path(tempfile.mkdtemp(prefix="data_pipeline_"))
    _write_folder((work / "jpg", args.images, args.size, 0))
    png = work / "png"
    from samadapt.recipes.data.synthetic import write_synthetic_folder

    write_synthetic_folder("camouflage", png, n=args.images, image_size=args.size, seed=0)
    sets = ["data.layout=generic", "data.train_split=all", f"base.image_size={args.size}"]
    cfg = load_recipe("camouflage", sets)
    runs = {}
    for kind in ("jpg", "png"):
        train, _ = build_datasets(cfg, args.size, [str(work / kind)])
        runs[f"uint8 items, {kind}"] = train
        runs[f"float32 items, {kind}"] = AugmentedItems(train.base, train.aug, args.size, train.seed,
                                                          dtype=torch.float32)
    times = {k: [] for k in runs}
    nb = args.images // args.batch
    for _ in range(args.rounds):
        for label, ds in runs.items():
            t0 = time.perf_counter()
            for k in range(nb):
                collate_batch([ds[k * args.batch + j] for j in range(args.batch)])
            times[label].append((time.perf_counter() - t0) / nb)
    med = {k: statistics.median(v) for k, v in times.items()}
    info = machine()
    print(f"## data pipeline, {args.size} px, batch {args.batch}, {args.images} scenes, one thread, "
          f"{args.rounds} interleaved rounds (medians); {info['cpu']}")
    print("| items | ms per batch | ms per image | vs float32, same files |\n|---|---|---|---|")
    for label, m in med.items():
        kind = label.split(", ")[1]
        ref = med[f"float32 items, {kind}"]
        print(f"| {label} | {m * 1e3:.1f} | {m * 1e3 / args.batch:.1f} | {m / ref:.2f}x |")
    a = runs["uint8 items, jpg"][0]
    b = runs["float32 items, jpg"][0]
    same = torch.equal(a["image"].float(), b["image"]) and torch.equal(a["mask"].float(), b["mask"])
    def size(items):
        return sum(v.numel() * v.element_size() for v in collate_batch(items).values() if torch.is_tensor(v))

    nbytes, nbytes32 = size([a] * args.batch), size([b] * args.batch)
    print(f"bytes per batch copied to the device: {nbytes / 2**20:.1f} MiB (uint8 items) vs "
          f"{nbytes32 / 2**20:.1f} MiB (float32); same values: {same}")


if __name__ == "__main__":
    main()
