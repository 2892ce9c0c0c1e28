"""Trainable parameters and fp16 file size of each adapter kind on vit_b / vit_l / vit_h.

    python benchmarks/param_counts.py [--archs vit_b vit_l vit_h] [--markdown]
"""
import argparse
import os
import tempfile

from samadapt import adapters
from samadapt.sam_core import build_sam

SETUPS = [
    ("lora r=4 on qkv", [("lora", dict(r=4, targets=["qkv"]))], "frozen"),
    ("lora r=8 on qkv+proj", [("lora", dict(r=8, targets=["qkv", "proj"]))], "frozen"),
    ("dora r=4 on qkv", [("lora", dict(r=4, targets=["qkv"], use_dora=True))], "frozen"),
    ("sam_adapter (dim/32)", [("sam_adapter", {})], "frozen"),
    ("bottleneck (dim/4, attn+mlp)", [("bottleneck", {})], "frozen"),
    ("sam_adapter + full decoder", [("sam_adapter", {})], "full"),
    ("lora r=8 + decoder lora r=8", [("lora", dict(r=8, targets=["qkv", "proj"]))], "lora"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = {}
    totals = {}
    for arch in args.archs:
        sam = build_sam(arch)
        totals[arch] = sum(p.numel() for p in sam.parameters())
        for label, kinds, dec in SETUPS:
            cfgs = [adapters.config(k, **kw) for k, kw in kinds]
            adapters.attach(sam, cfgs, name="x", decoder=dec, decoder_r=8)
            n = adapters.trainable_summary(sam)["trainable"]
            with tempfile.TemporaryDirectory() as d:
                p = adapters.save(sam, os.path.join(d, "x.safetensors"), name="x", dtype="fp16")
                size = os.path.getsize(p)
            adapters.detach(sam, "x")
            rows.setdefault(label, {})[arch] = (n, size)
        del sam
    head = "| adapter | " + " | ".join(f"{a} params (fp16 file)" for a in args.archs) + " |"
    print(head)
    print("|" + "---|" * (len(args.archs) + 1))
    for label, per in rows.items():
        cells = [f"{per[a][0] / 1e6:.3f} M ({per[a][1] / 2**20:.2f} MiB)" for a in args.archs]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| frozen core (for scale) | " + " | ".join(f"{totals[a] / 1e6:.1f} M" for a in args.archs) + " |")


if __name__ == "__main__":
    main()
