"""Adapter swap latency: samadapt on its frozen SAM vs peft on transformers' SamModel.

Both models have vit_b dimensions and random weights; both carry LoRA r=4 on every encoder `qkv`.
One process, CPU. Timed with time.perf_counter_ns after a warm-up:

  ours  activate   adapters.activate(sam, name), alternating between two resident adapters
  ours  load       adapters.load(sam, file, activate=False) + adapters.activate(sam, name) from an fp32
                   file (the OS page cache holds it after the first read); detach after each, untimed
  peft  activate   PeftModel.set_adapter(name), alternating between two resident adapters
  peft  load       PeftModel.load_adapter(dir, adapter_name=...) + set_adapter from a save_pretrained
                   folder; delete_adapter after each, untimed

The two sides run alternately in `--rounds` blocks (the first calls of each block not counted), so
both see the same machine conditions; medians over all blocks.

Usage:
    python benchmarks/adapter_swap.py [--reps-activate 20000] [--reps-load 200] [--rounds 10] [--json out.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from samadapt import adapters  # noqa: E402
from samadapt.sam_core import build_sam  # noqa: E402

GOAL_ACTIVATE_MS = 0.1
GOAL_LOAD_MS = 5.0


def summary(ns):
    ms = sorted(t / 1e6 for t in ns)
    q = lambda f: ms[min(len(ms) - 1, int(f * len(ms)))]  # noqa: E731
    return {"median_ms": statistics.median(ms), "p10_ms": q(0.10), "p90_ms": q(0.90), "min_ms": ms[0],
            "mean_ms": statistics.fmean(ms), "n": len(ms)}


def time_loop(step, reps, warmup, after=None):
    """Time `step(i)` `reps` times after `warmup` untimed calls; `after(i)` runs untimed after each."""
    out = []
    for i in range(warmup + reps):
        t0 = time.perf_counter_ns()
        step(i)
        t1 = time.perf_counter_ns()
        if after is not None:
            after(i)
        if i >= warmup:
            out.append(t1 - t0)
    return out


def setup_ours(workdir):
    """Ours: two resident adapters a, b; returns (activate step, load step, after-load cleanup, info)."""
    torch.manual_seed(0)
    sam = build_sam("vit_b")
    cfg = adapters.config("lora", r=4, targets=["qkv"])
    for name in ("a", "b"):
        adapters.attach(sam, cfg, name=name)
        with torch.no_grad():  # non-trivial weights, as after training
            for p in adapters.adapter_parameters(sam, name):
                p.normal_(0, 0.02)
    names = ("a", "b")
    path = adapters.save(sam, Path(workdir) / "ours.safetensors", name="a", dtype="fp32")
    want = adapters.adapter_state_dict(sam, "a")

    def load(i):
        adapters.load(sam, path, name="disk", activate=False)
        adapters.activate(sam, "disk")

    def unload(i):
        adapters.detach(sam, "disk")

    load(-1)  # correctness once: the file's tensors land in the model, and the output is a's
    got = adapters.adapter_state_dict(sam, "disk")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    unload(-1)
    return (lambda i: adapters.activate(sam, names[i % 2])), load, unload, {
        "file_bytes": os.path.getsize(path), "file": str(path.name),
        "adapter_parameters": sum(v.numel() for v in want.values())}


def setup_peft(workdir):
    """peft on transformers' SamModel: two resident adapters a, b; same closures as setup_ours."""
    from peft import LoraConfig, get_peft_model
    from transformers import SamConfig, SamModel, SamVisionConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = SamConfig(vision_config=SamVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                     global_attn_indexes=[2, 5, 8, 11]))
    model = SamModel(config).eval()
    lcfg = lambda: LoraConfig(r=4, lora_alpha=4, target_modules=["qkv"])  # noqa: E731
    pm = get_peft_model(model, lcfg(), adapter_name="a")
    pm.add_adapter("b", lcfg())
    for name in ("a", "b"):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if ".lora_" in n and f".{name}." in n:
                    p.normal_(0, 0.02)
    n_qkv = sum(1 for n, _ in pm.named_modules() if n.endswith("qkv.lora_A.a"))
    assert n_qkv == 12, n_qkv
    names = ("a", "b")

    pm.set_adapter("a")
    save_dir = Path(workdir) / "peft"
    pm.save_pretrained(str(save_dir), selected_adapters=["a"])
    file = save_dir / "adapter_model.safetensors"
    if not file.exists():  # some versions write non-default adapters into a subfolder
        file = next(save_dir.rglob("adapter_model.safetensors"))
    adapter_dir = file.parent

    def load(i):
        pm.load_adapter(str(adapter_dir), adapter_name="disk")
        pm.set_adapter("disk")

    def unload(i):
        pm.set_adapter("a")
        pm.delete_adapter("disk")

    load(-1)
    a_sd = {n: p for n, p in pm.named_parameters() if ".lora_" in n and n.endswith(".a.weight")}
    d_sd = {n.replace(".disk.", ".a."): p for n, p in pm.named_parameters() if ".lora_" in n and ".disk." in n}
    assert set(a_sd) == set(d_sd) and all(torch.equal(a_sd[k], d_sd[k]) for k in a_sd)
    unload(-1)
    return (lambda i: pm.set_adapter(names[i % 2])), load, unload, {
        "file_bytes": os.path.getsize(file), "file": str(file.relative_to(workdir))}


def interleaved(sides, reps, rounds, warmup, after=None):
    """Time each side's step `reps[side]` times per round, sides alternating, `rounds` times (both
    sides see the same machine conditions); the first `warmup` calls of each block are not counted."""
    out = {side: [] for side in sides}
    for _ in range(rounds):
        for side, step in sides.items():
            out[side] += time_loop(step, reps[side], warmup, after=(after or {}).get(side))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps-activate", type=int, default=20000)
    ap.add_argument("--reps-load", type=int, default=200)
    ap.add_argument("--reps-activate-peft", type=int, default=2000)
    ap.add_argument("--reps-load-peft", type=int, default=50)
    ap.add_argument("--warmup-activate", type=int, default=200)
    ap.add_argument("--warmup-load", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10, help="blocks per side, alternating ours / peft")
    ap.add_argument("--skip-peft", action="store_true", help="time ours only")
    ap.add_argument("--json", type=str, default=None, help="write all figures to this file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.time()
        o_act, o_load, o_unload, o_info = setup_ours(workdir)
        sides_act, sides_load, unloads = {"ours": o_act}, {"ours": o_load}, {"ours": o_unload}
        if not args.skip_peft:
            p_act, p_load, p_unload, p_info = setup_peft(workdir)
            sides_act["peft"], sides_load["peft"], unloads["peft"] = p_act, p_load, p_unload
        r = args.rounds
        act = interleaved(sides_act, {"ours": args.reps_activate // r, "peft": args.reps_activate_peft // r}, r,
                          args.warmup_activate)
        detach_ns = []

        def timed_unload(side):
            def f(i):
                t = time.perf_counter_ns()
                unloads[side](i)
                if side == "ours":
                    detach_ns.append(time.perf_counter_ns() - t)
            return f
        lod = interleaved(sides_load, {"ours": args.reps_load // r, "peft": args.reps_load_peft // r}, r,
                          args.warmup_load, after={s: timed_unload(s) for s in sides_load})
        ours = {"activate": summary(act["ours"]), "load_activate": summary(lod["ours"]), "detach": summary(detach_ns),
                **o_info}
        peft_res = (
            None
            if args.skip_peft
            else {"activate": summary(act["peft"]), "load_activate": summary(lod["peft"]), **p_info}
        )
        elapsed = time.time() - t0

    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "loadavg_at_end": os.getloadavg(),
        "wall_s": round(elapsed, 1),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }

    def row(label, r):
        return (f"  {label:<34} median {r['median_ms']:9.4f} ms   p10 {r['p10_ms']:9.4f}   "
                f"p90 {r['p90_ms']:9.4f}   (n={r['n']})")

    print("Adapter swap, vit_b dims, LoRA r=4 on 12 x qkv, CPU")
    print(row("ours  activate (resident)", ours["activate"]))
    print(row("ours  load fp32 file + activate", ours["load_activate"]))
    print(row("ours  detach", ours["detach"]))
    ratios = {}
    if peft_res:
        print(row("peft  set_adapter (resident)", peft_res["activate"]))
        print(row("peft  load_adapter + set_adapter", peft_res["load_activate"]))
        ratios = {
            "activate_peft_over_ours": peft_res["activate"]["median_ms"] / ours["activate"]["median_ms"],
            "load_peft_over_ours": peft_res["load_activate"]["median_ms"] / ours["load_activate"]["median_ms"],
            "file_ours_over_peft": ours["file_bytes"] / peft_res["file_bytes"],
        }
        print(f"  ratio peft/ours: activate x{ratios['activate_peft_over_ours']:.1f}, "
              f"load+activate x{ratios['load_peft_over_ours']:.1f}")
        print(f"  file bytes: ours {ours['file_bytes']:,} ({ours['file']}), peft {peft_res['file_bytes']:,} "
              f"({peft_res['file']}); ours/peft {ratios['file_ours_over_peft']:.3f}")
    else:
        print(f"  file bytes: ours {ours['file_bytes']:,}")
    goals = {"activate_median_ms<=0.1": ours["activate"]["median_ms"] <= GOAL_ACTIVATE_MS,
             "load_activate_median_ms<=5": ours["load_activate"]["median_ms"] <= GOAL_LOAD_MS}
    verdicts = ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in goals.items())
    print(f"  goals: {verdicts}")
    print(f"  {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, load average at end "
          f"{', '.join(f'{x:.1f}' for x in env['loadavg_at_end'])}; torch {env['torch']}, peft {env['peft']}, "
          f"transformers {env['transformers']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"ours": ours, "peft": peft_res, "ratios": ratios, "goals": goals,
                                               "env": env}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
