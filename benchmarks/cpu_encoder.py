"""Interactive SAM on a CPU: the image encoder's default route, folder throughput, and threads under load.

Three parts, each its own subcommand (run them one at a time; each prints a table and can write JSON):

  set_image  vit_b at 1024 px, random weights (segment_anything's vit_b with every weight nudged,
             so the position tables are not zero; ours loads the same state dict). One call each of
               ours       : SamPredictor(sam).set_image, the default route (`sam_core.fast.cpu`)
               ours_fp32  : SamPredictor(sam, precision="fp32").set_image
               anchor     : segment_anything.SamPredictor.set_image
               hf         : transformers SamModel.get_image_embeddings on the preprocessed 1024 px
                            input (its default attention; random weights of the same shapes; its
                            preprocessing is not timed)
             per round, the rounds alternating, after one warm-up call each; medians and ratios.
             Mask agreement of ours (both routes) with the anchor on the same weights: the share of
             pixels equal, for points, a box and box+points, multimask and single.
  predict    a folder of N (default 32) 768 x 1024 PNG images, one box each: `samadapt predict`
             (in this process, through the CLI's `main`: read-ahead, the encoder at its default
             batch -- 1 on a CPU -- and at `--ours-batch` sizes, decoding on a thread beside encoding,
             PNG writing on writer threads) vs a loop over segment_anything's SamPredictor (read,
             set_image, predict, write the PNG), on the same vit_b weights; images/minute,
             alternating rounds.
  threads    the tiny core's demo training (the demo recipe's adapters on the pretrained tiny core,
             batch 8 at 256 px, AdamW, random batches) in child processes: quiet and beside one
             competing busy process (a Python loop), under four wait policies: OpenMP's default,
             passive, what the CLI sets at start (`recipes.threads.configure_openmp`) and active;
             steps/s, slowdown = quiet / busy, and each against the best policy for that load.
             Configurations alternate within each round.

Threads: `--threads` (default 2) for set_image and predict. The machine may be shared: compare
ratios (both sides run in the same process, alternating), not absolute times.

    python benchmarks/cpu_encoder.py set_image [--rounds 3] [--json out.json]
    python benchmarks/cpu_encoder.py predict [--images 32] [--rounds 1] [--ours-batch 8] [--json out.json]
    python benchmarks/cpu_encoder.py threads [--steps 10] [--rounds 2] [--json out.json]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, table, write_json

PROMPTS = {
    "point": dict(point_coords=[[420.0, 300.0]], point_labels=[1]),
    "box": dict(box=[120.0, 90.0, 640.0, 560.0]),
    "box+points": dict(box=[120.0, 90.0, 640.0, 560.0], point_coords=[[360.0, 300.0], [600.0, 520.0]],
                       point_labels=[1, 0]),
}


def _image(h: int, w: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4: h // 2, w // 3: w // 2] = (240, 30, 30)
    return img


def _anchor(seed: int):
    import torch
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    ref = sam_model_registry["vit_b"]().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # segment_anything's init leaves the position tables at zero: give every weight a value
        for name, p in ref.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return ref


def _agreement(ours_pred, ref_pred):
    import numpy as np

    out = {}
    for name, kw in PROMPTS.items():
        kw = {k: np.asarray(v) for k, v in kw.items()}
        for mm in (True, False):
            a, b = ours_pred.predict(multimask_output=mm, **kw)[0], ref_pred.predict(multimask_output=mm, **kw)[0]
            out[f"{name}{' multi' if mm else ''}"] = float((a == b).mean())
    return out


def cmd_set_image(args) -> dict:
    import torch
    from segment_anything import SamPredictor as MetaPredictor
    from transformers import SamConfig, SamModel

    from samadapt.sam_core import SamPredictor, load_sam

    ref = _anchor(args.seed)
    ours = load_sam(ref.state_dict())
    hf = SamModel(SamConfig()).eval()
    image = _image(768, 1024, args.seed)
    p_ours, p_fp32, p_ref = SamPredictor(ours), SamPredictor(ours, precision="fp32"), MetaPredictor(ref)
    hf_in = p_ref.model.preprocess(torch.as_tensor(p_ref.transform.apply_image(image)).permute(2, 0, 1)[None].float())
    print(f"ours: {p_ours.route.describe()}; transformers attention: {hf.config._attn_implementation}", flush=True)

    def hf_embed():
        with torch.no_grad():
            hf.get_image_embeddings(hf_in)

    fns = {"ours": lambda: p_ours.set_image(image), "ours_fp32": lambda: p_fp32.set_image(image),
           "anchor": lambda: p_ref.set_image(image), "hf": hf_embed}
    times = {k: [] for k in fns}
    for k, fn in fns.items():  # warm-up (not transformers': one call of it takes minutes here)
        if k != "hf":
            fn()
    for r in range(args.rounds):
        for k, fn in fns.items():
            if k == "hf" and r >= args.hf_rounds:
                continue
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if len(v) == r + 1),
              flush=True)
    times = {k: v for k, v in times.items() if v}  # --hf-rounds 0 leaves transformers out
    med = {k: statistics.median(v) for k, v in times.items()}
    p_ours.set_image(image), p_fp32.set_image(image), p_ref.set_image(image)
    e_ref = p_ref.get_image_embedding()
    agree = {"ours": _agreement(p_ours, p_ref), "ours_fp32": _agreement(p_fp32, p_ref)}
    emb_err = {k: float((p.get_image_embedding() - e_ref).norm() / e_ref.norm())
               for k, p in (("ours", p_ours), ("ours_fp32", p_fp32))}
    rows = [["path", "median s", "ratio to anchor", "runs", "worst mask agreement", "embedding rel. err"]]
    for k in times:
        worst = f"{min(agree[k].values()) * 100:.2f} %" if k in agree else "-"
        rows.append([k, f"{med[k]:.2f}", f"{med[k] / med['anchor']:.3f}", str(len(times[k])), worst,
                     f"{emb_err[k]:.4f}" if k in emb_err else "-"])
    print(table(rows))
    print("agreement (ours, default route): " + ", ".join(f"{k} {v * 100:.2f} %" for k, v in agree["ours"].items()))
    return {"route": p_ours.route.__dict__, "hf_attention": hf.config._attn_implementation, "times_s": times,
            "median_s": med, "ratio_to_anchor": {k: med[k] / med["anchor"] for k in med}, "agreement": agree,
            "embedding_rel_err": emb_err}


def cmd_predict(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from segment_anything import SamPredictor as MetaPredictor

    from samadapt.recipes.cli import main as cli_main

    ref = _anchor(args.seed)
    work = Path(tempfile.mkdtemp(prefix="cpu_encoder_predict_"))
    ckpt = work / "vit_b_random.pth"
    torch.save(ref.state_dict(), ckpt)
    folder = work / "images"
    folder.mkdir()
    for i in range(args.images):
        Image.fromarray(_image(768, 1024, args.seed + i)).save(folder / f"img{i:03d}.png")
    box = "120,90,640,560"
    meta = MetaPredictor(ref)

    def ours(out: Path, extra=()) -> None:
        code = cli_main(["predict", str(folder), "--base", str(ckpt), "--out", str(out), "--box", box,
                         "--no-overlay", *extra])
        assert code == 0, code

    def anchor(out: Path) -> None:
        out.mkdir()
        b = np.array([float(v) for v in box.split(",")])
        for p in sorted(folder.glob("*.png"))[:n_anchor]:
            meta.set_image(np.asarray(Image.open(p).convert("RGB")))
            m = meta.predict(box=b, multimask_output=False)[0][0]
            Image.fromarray(m.astype(np.uint8) * 255).save(out / p.name)

    n_anchor = args.anchor_images or args.images
    variants = [("ours", ours)] + [(f"ours_batch{b}", lambda out, b=b: ours(out, ("--batch-size", str(b))))
                                   for b in args.ours_batch]
    variants.append(("anchor", anchor))
    count = {k: args.images for k, _ in variants}
    count["anchor"] = n_anchor
    times = {k: [] for k, _ in variants}
    outs = {}
    for r in range(args.rounds):
        for k, fn in variants:
            out = work / f"out_{k}_{r}"
            t = time.perf_counter()
            fn(out)
            times[k].append(time.perf_counter() - t)
            outs[k] = out
            print(f"round {r + 1}: {k} {times[k][-1]:.1f} s for {count[k]} images "
                  f"({count[k] * 60 / times[k][-1]:.1f} images/min)",
                  flush=True)
    agree = [float((np.asarray(Image.open(outs["ours"] / p.name)) == np.asarray(Image.open(p))).mean())
             for p in sorted(outs["anchor"].glob("*.png"))]
    med = {k: statistics.median(v) for k, v in times.items()}
    ipm = {k: count[k] * 60 / v for k, v in med.items()}
    label = {"ours": "ours (samadapt predict, its default batch)", "anchor": "anchor (loop over SamPredictor)"}
    rows = [["path", "images", "median s", "images/min", "ratio (images/min)"]]
    for k, _ in variants:
        rows.append([label.get(k, f"ours, --batch-size {k[len('ours_batch'):]}"), str(count[k]), f"{med[k]:.1f}",
                     f"{ipm[k]:.1f}", f"{ipm[k] / ipm['anchor']:.2f}"])
    print(table(rows))
    print(f"mask agreement with the anchor over {len(agree)} images: min {min(agree) * 100:.2f} %, "
          f"mean {statistics.mean(agree) * 100:.2f} %")
    return {"images": count, "times_s": times, "median_s": med, "images_per_min": ipm,
            "speedup": ipm["ours"] / ipm["anchor"], "agreement_min": min(agree),
            "agreement_mean": statistics.mean(agree)}


CHILD = r"""
import sys, time
if sys.argv[2] == "cli":
    from samadapt.recipes.threads import configure_openmp
    configure_openmp()
import torch
from samadapt.recipes.config import load_recipe
from samadapt.recipes.model import TrainStep, adapt_core, build_core
cfg = load_recipe("demo")
sam = build_core(cfg)
adapt_core(sam, cfg, torch.device("cpu"), "no")
step = TrainStep(sam).train()
opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-3)
g = torch.Generator().manual_seed(0)
x = torch.rand(8, 3, 256, 256, generator=g) * 255
gt = (torch.rand(8, 1, 64, 64, generator=g) > 0.5).float()
def one():
    low, _ = step(x)[0]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(low, gt)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(2):
    one()
n = int(sys.argv[1]); t = time.perf_counter()
for _ in range(n):
    one()
print(n / (time.perf_counter() - t))
"""


POLICIES = {  # name -> (extra environment, label)
    "default": ({}, "OpenMP's default (before any change)"),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, "OMP_WAIT_POLICY=PASSIVE (the CLI's first change)"),
    "cli": ({}, "the CLI now (recipes.threads.SETTINGS)"),
    "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY=ACTIVE"),
}


def cmd_threads(args) -> dict:
    from samadapt.recipes.threads import SETTINGS

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                                             "OMP_NUM_THREADS")}
    configs = [(policy, load) for policy in POLICIES for load in ("quiet", "busy")]
    rates = {f"{p}/{ld}": [] for p, ld in configs}
    for r in range(args.rounds):
        for policy, load in configs:
            busy = None
            if load == "busy":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                res = subprocess.run([sys.executable, "-c", CHILD, str(args.steps), policy], cwd=ROOT,
                                     env={**env, **POLICIES[policy][0]}, capture_output=True, text=True, timeout=1800)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            if res.returncode:
                raise SystemExit(f"child failed:\n{res.stderr[-3000:]}")
            rates[f"{policy}/{load}"].append(float(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {policy} {load}: {rates[f'{policy}/{load}'][-1]:.2f} steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {ld: max(med[f"{p}/{ld}"] for p in POLICIES) for ld in ("quiet", "busy")}
    rows = [["wait policy", "quiet steps/s", "busy steps/s", "slowdown (quiet / busy)", "quiet / best quiet",
             "busy / best busy"]]
    for policy, (_, label) in POLICIES.items():
        q, b = med[f"{policy}/quiet"], med[f"{policy}/busy"]
        rows.append([label, f"{q:.2f}", f"{b:.2f}", f"{q / b:.1f}x", f"{q / best['quiet']:.2f}",
                     f"{b / best['busy']:.2f}"])
    print(table(rows))
    print("the CLI's settings: " + " ".join(f"{k}={v}" for k, v in SETTINGS.items()))
    return {"steps": args.steps, "settings": SETTINGS, "rates_steps_per_s": rates, "median": med,
            "slowdown": {p: med[f"{p}/quiet"] / med[f"{p}/busy"] for p in POLICIES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    for name, fn in (("set_image", cmd_set_image), ("predict", cmd_predict), ("threads", cmd_threads)):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("--json", default="")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=2, help="torch threads in this process (set_image, predict)")
    sub.choices["set_image"].add_argument("--rounds", type=int, default=3)
    sub.choices["set_image"].add_argument("--hf-rounds", type=int, default=1,
                                          help="rounds that include transformers (its call is the slowest)")
    sub.choices["predict"].add_argument("--rounds", type=int, default=1)
    sub.choices["predict"].add_argument("--images", type=int, default=32)
    sub.choices["predict"].add_argument("--ours-batch", type=int, nargs="*", default=[8], metavar="N",
                                        help="also time samadapt predict with --batch-size N (default: 8)")
    sub.choices["predict"].add_argument("--anchor-images", type=int, default=0,
                                        help="the anchor's loop over the first N only (default: all)")
    sub.choices["threads"].add_argument("--rounds", type=int, default=2)
    sub.choices["threads"].add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    info = machine()
    print(f"{info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, {torch.get_num_threads()} threads, "
          f"load average at start {info.get('loadavg_at_start')}", flush=True)
    payload = {"machine": info, "part": args.part, **args.fn(args)}
    try:
        payload["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
