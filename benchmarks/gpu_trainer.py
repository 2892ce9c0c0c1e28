"""GPU benchmark of `samadapt train` end to end, beside the encoder-only benchmark and the anchor.

`gpu_train_infer.py` times the encoder and LoRA alone; this script runs the trainer itself, the path
a user with a GPU and COD10K takes: the bf16 core with fp32 adapters, `train.attention: auto`,
`train.compile`, gradient checkpointing, the data loader and augmentation, evaluation and checkpoints.
Every trainer run is the real CLI (`python -m samadapt.recipes.cli train ...`) in its own process,
its stdout/stderr kept under `--log-dir`; the trainer's own rate (`metrics.json` `speed`: images/s
between its log steps, data loading included, the first 5 steps, evaluations and checkpoints left
out) and its peak memory are read back. Parts, in this order, each skipped past `--budget` seconds:

1. data and base: synthetic camouflage scenes at full size (the generic layout, JPEG images and PNG
   masks as COD10K has them; one folder per writer process, all passed to `--data`), and a
   random-weights vit_b checkpoint (`.safetensors`) passed as `--base`.
2. `headline`: vit_b 1024 px, batch 4, LoRA r=4 on every qkv and on the decoder, bf16, compile on,
   checkpointing off, `--steps` steps; the loss's mean over the first and last thirds of its log
   steps (TensorBoard scalars).
3. `encoder`: `gpu_train_infer.py --no-vit-h` in a subprocess (attention routes against fp32, the
   whole-encoder check of every route against fp32, the anchor and ours at the same settings): the
   trainer's rate over the encoder-only training rate (the goal: within 15 %; the trainer also runs
   the decoder, the loss at full resolution and the data loader), and ours vs the anchor.
4. `no-compile` and `checkpointing` (compile on): the trainer once each, fewer steps.
5. `resume`: one run uninterrupted, one killed (SIGKILL) after its first checkpoint and continued
   with `--resume`; their adapter files compared tensor by tensor.
6. `vit_h`: vit_h batch 4 with checkpointing (random weights, `--allow-random-base`): peak memory
   (the goal: under 10 GiB).
7. `serve`: `AdapterBank.predict_batch` over 4 adapters (16 images, 4 each), the mixed pass vs one
   by one, images/s; the answers compared in fp32 (TF32 off).

Prints one table last; `--json` has every figure (rewritten after each part).

    python benchmarks/gpu_trainer.py --json benchmarks/results/gpu_trainer.json          # every part
    python benchmarks/gpu_trainer.py --parts headline,encoder --json results/gpu_trainer_1.json   # or in two
    python benchmarks/gpu_trainer.py --parts no-compile,checkpointing,resume,vit_h,serve --json ..._2.json
    python benchmarks/gpu_trainer.py --tiny --device cpu --budget 600                     # a CPU smoke run

Not yet run on a GPU (no device was lent when it was written); the estimate for every part on an H100
is about 11 minutes (two compiled runs of a few minutes each, the encoder-only benchmark about 3).

`--tiny` swaps in tiny sizes (the `tiny` arch at 64 px, a few steps) so every part runs on a CPU; its
numbers mean nothing.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import core_with_four_adapters, machine, table, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _write_folder(args):
    """One folder of the generic layout; the images re-encoded as JPEG (quality 95) beside PNG masks, as
    COD10K and CAMO ship them (decoding a 1024 px PNG costs several times a JPEG's)."""
    import cv2

    from samadapt.recipes.data.synthetic import write_synthetic_folder

    root, n, size, seed = args
    write_synthetic_folder("camouflage", root, n=n, image_size=size, seed=seed)
    for png in sorted((Path(root) / "images").glob("*.png")):
        cv2.imwrite(str(png.with_suffix(".jpg")), cv2.imread(str(png)), [cv2.IMWRITE_JPEG_QUALITY, 95])
        png.unlink()
    return str(root)


def make_data(work: Path, n: int, size: int, writers: int):
    """Folders of synthetic camouflage scenes at `size` (the generic layout), written by `writers` processes."""
    per = -(-n // writers)
    jobs = [(work / f"part_{k}", per, size, 100 + k) for k in range(writers)]
    with ProcessPoolExecutor(writers) as pool:
        return list(pool.map(_write_folder, jobs))


def make_base(work: Path, arch: str) -> Path:
    from safetensors.torch import save_file

    from samadapt.sam_core import build_sam

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in build_sam(arch).state_dict().items()}
    path = work / f"random_{arch}.safetensors"
    save_file(sd, str(path))
    return path


def recipe_sets(arch, size, batch, steps, workers, compile_, ckpt, extra=(), val_fraction=0.02, log_every=10):
    """The `--set`s of every trainer run: LoRA r=4 on qkv (the encoder-only benchmark's setting) and LoRA
    r=4 on the decoder (a frozen random decoder leaves the loss flat), promptless, BCE + IoU, bf16, AdamW
    1e-3 without warmup; `val_fraction` of the scenes are held out for the evaluation at the end."""
    return [
        f"base.arch={arch}", f"base.image_size={size}",
        "adapter.kinds=[{kind: lora, r: 4, targets: [qkv]}]", "adapter.decoder=lora", "adapter.decoder_r=4",
        "adapter.name=bench",
        "data.layout=generic", f"data.val_fraction={val_fraction}", f"data.num_workers={workers}",
        "prompts.mode=none", "loss.bce=1.0", "loss.iou=1.0",
        f"train.batch_size={batch}", f"train.max_steps={steps}", "train.epochs=1000", "train.warmup_steps=0",
        "train.lr=1.0e-3",
        "train.mixed_precision=bf16", "train.attention=auto", f"train.compile={str(compile_).lower()}",
        f"train.grad_checkpointing={str(ckpt).lower()}", f"train.log_every={log_every}", "train.checkpoint_every=0",
        "eval.baseline=false", "eval.every_epochs=1000", "eval.samples=1", "eval.batch_size=4",
        "eval.metrics=[s_measure, mae]", *extra,
    ]


class Runner:
    """Trainer runs through the CLI, each with its log under `log_dir`."""

    def __init__(self, work: Path, log_dir: Path, data, base):
        self.work, self.log_dir, self.data, self.base = work, log_dir, data, base

    def command(self, name, sets, resume=False, random_base=False):
        cmd = [sys.executable, "-m", "samadapt.recipes.cli", "train", "camouflage", "--out", str(self.work / name),
               "--quiet", "--data", *self.data]
        cmd += ["--allow-random-base"] if random_base else ["--base", str(self.base)]
        cmd += sum([["--set", s] for s in sets], []) + (["--resume"] if resume else [])
        return cmd

    def start(self, name, sets, resume=False, random_base=False, tag=""):
        log = open(self.log_dir / f"{name}{tag}.log", "w")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        cmd = self.command(name, sets, resume, random_base)
        log.write(" ".join(cmd) + "\n")
        log.flush()
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log

    def run(self, name, sets, resume=False, random_base=False, tag="", timeout=None):
        t0 = time.perf_counter()
        proc, log = self.start(name, sets, resume, random_base, tag)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        out = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "log": str(self.log_dir / f"{name}{tag}.log")}
        metrics = self.work / name / "metrics.json"
        if rc == 0 and metrics.is_file():
            out["speed"] = json.loads(metrics.read_text()).get("speed", {})
            out["loss"] = logged_loss(self.work / name)
        else:
            out["tail"] = Path(out["log"]).read_text()[-1500:]
        return out


def logged_loss(run: Path):
    """The loss at the first and last logged steps (TensorBoard scalars), and the mean of each third."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((run / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "loss" in acc.Tags().get("scalars", []):
            values.update({e.step: e.value for e in acc.Scalars("loss")})
    steps = sorted(values)
    if len(steps) < 2:
        return {}
    k = max(1, len(steps) // 3)
    return {"first": (steps[0], values[steps[0]]), "last": (steps[-1], values[steps[-1]]),
            "first_third_mean": statistics.mean(values[s] for s in steps[:k]),
            "last_third_mean": statistics.mean(values[s] for s in steps[-k:])}


def resume_check(runner: Runner, sets, every: int, total: int, log):
    """Uninterrupted vs killed after the first checkpoint and resumed: the adapter files, tensor by tensor."""
    from safetensors.torch import load_file

    sets = [s for s in sets if not s.startswith(("train.max_steps", "train.checkpoint_every"))]
    sets += [f"train.max_steps={total}", f"train.checkpoint_every={every}"]
    whole = runner.run("resume_whole", sets)
    proc, fh = runner.start("resume_cut", sets)
    first = runner.work / "resume_cut" / "checkpoints" / f"step_{every:08d}"
    deadline = time.time() + 900
    while not (first / "position.json").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed_at = None
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = sorted((runner.work / "resume_cut" / "checkpoints").glob("step_*"))
        killed_at = done[-1].name if done else None
    fh.close()
    again = runner.run("resume_cut", sets, resume=True, tag="_resumed")
    out = {"whole": whole, "resumed": again, "killed_after": killed_at, "checkpoint_every": every, "steps": total}
    a_path = runner.work / "resume_whole" / "adapter.safetensors"
    b_path = runner.work / "resume_cut" / "adapter.safetensors"
    if killed_at is None:
        out["error"] = "the run ended (or failed) before its first checkpoint could be interrupted"
    elif a_path.is_file() and b_path.is_file():
        a, b = load_file(str(a_path)), load_file(str(b_path))
        out["same_keys"] = a.keys() == b.keys()
        out["equal_tensors"] = sum(torch.equal(a[k], b[k]) for k in a if k in b)
        out["tensors"] = len(a)
        out["max_abs_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b)
    log(f"resume: killed after {killed_at}; {out.get('equal_tensors')}/{out.get('tensors')} tensors equal, "
        f"max abs diff {out.get('max_abs_diff')}")
    return out


def encoder_only(args, log_dir: Path, budget: float):
    """`gpu_train_infer.py` (no vit_h rows): the anchor and ours at the trainer's settings."""
    js = log_dir / "gpu_train_infer.json"
    cmd = [sys.executable, str(HERE / "gpu_train_infer.py"), "--no-vit-h", "--budget", str(budget), "--json", str(js)]
    if args.tiny:
        cmd += ["--tiny"]
    if args.batch:
        cmd += ["--batch", str(args.batch)]  # its image size is its own: 1024 (tiny 256)
    if args.device:
        cmd += ["--device", args.device]
    with open(log_dir / "gpu_train_infer.log", "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=budget + 300).returncode
    res = json.loads(js.read_text()) if js.is_file() else {}
    rows = res.get("rows", [])
    batch = res.get("batch")

    def ips(r):
        return batch / r["median_s"] if r and "median_s" in r else None

    anchor = next((r for r in rows if r.get("anchor")), None)
    ours = next((r for r in rows if r.get("ours") and r.get("compiled")), None) or \
        next((r for r in rows if r.get("ours")), None)
    out = {"rc": rc, "json": str(js), "model_check": res.get("model_check"), "picks": res.get("picks")}
    if anchor:
        out["anchor"] = {"train_ips": ips(anchor["train"]), "infer_ips": ips(anchor["infer"]),
                         "train_gib": anchor["train"].get("peak_gib"), "infer_gib": anchor["infer"].get("peak_gib")}
    if ours:
        out["ours"] = {"name": ours["name"], "train_ips": ips(ours["train"]), "infer_ips": ips(ours["infer"]),
                       "train_gib": ours["train"].get("peak_gib"), "infer_gib": ours["infer"].get("peak_gib")}
    return out


def serve_part(arch, size, device, n_images, log):
    """AdapterBank over 4 adapters: the mixed pass vs one by one (images/s), answers compared in fp32."""
    from samadapt.adapters import AdapterBank

    sam, kinds = core_with_four_adapters(arch, size)
    sam.to(device)
    rng = np.random.default_rng(0)
    h = size * 15 // 16
    items = [dict(image=rng.integers(0, 256, (h, size, 3), dtype=np.uint8), adapter=list(kinds)[k % 4],
                  box=np.array([size * 0.1, size * 0.1, size * 0.6, size * 0.5])) for k in range(n_images)]
    out = {"route": AdapterBank(sam).route.describe(), "images": n_images, "adapters": 4}
    times = {"mixed": [], "single": []}
    for r in range(3):  # round 0 warms up (cudnn, Triton autotune)
        for mode in times:
            bank = AdapterBank(sam)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            bank.predict_batch(items, mode=mode)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[mode].append(time.perf_counter() - t0)
    for mode, ts in times.items():
        out[f"{mode}_ips"] = n_images / statistics.median(ts)
    out["mixed_over_single"] = out["mixed_ips"] / out["single_ips"]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        a = AdapterBank(sam, precision="fp32").predict_batch(items, mode="mixed")
        b = AdapterBank(sam, precision="fp32").predict_batch(items, mode="single")
        out["fp32_max_diff"] = max(float(np.abs(x[2] - y[2]).max()) for x, y in zip(a, b))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    log(f"serve: mixed {out['mixed_ips']:.1f} images/s, one by one {out['single_ips']:.1f} "
        f"(x{out['mixed_over_single']:.2f}); fp32 largest difference {out['fp32_max_diff']:.2e}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke run of every part")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; later parts are skipped past it")
    ap.add_argument("--steps", type=int, default=None, help="steps of the headline run (default 300)")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers (default: 8, tiny 2)")
    ap.add_argument("--image-size", type=int, default=None, help="default 1024 (tiny 64)")
    ap.add_argument("--batch", type=int, default=None, help="default 4")
    ap.add_argument("--scenes", type=int, default=None, help="synthetic scenes written (default 512, tiny 64)")
    ap.add_argument("--parts", default="headline,encoder,no-compile,checkpointing,resume,vit_h,serve")
    ap.add_argument("--json", default="")
    ap.add_argument("--log-dir", default=None, help="logs of every call (default: next to --json, or a temp dir)")
    ap.add_argument("--work", default=None, help="run directories and data (default: a temp dir)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device:
        os.environ["CUDA_VISIBLE_DEVICES"] = "" if device.type == "cpu" else os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if args.tiny:
        arch, big, size, batch, steps, workers = "tiny", "tiny", 64, 4, args.steps or 30, args.workers or 2
        n_scenes, writers, short = 64, 2, 20
    else:
        arch, big, size, batch, steps, workers = "vit_b", "vit_h", 1024, 4, args.steps or 300, args.workers or 8
        n_scenes, writers, short = 512, min(16, os.cpu_count() or 4), 100
    size, batch = args.image_size or size, args.batch or batch
    n_scenes = args.scenes or n_scenes
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_trainer_"))
    work.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir or (Path(args.json).with_suffix("") if args.json else work / "logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    res = {"machine": machine(), "args": vars(args), "device": str(device), "arch": arch, "image_size": size,
           "batch": batch, "log": lines, "log_dir": str(log_dir), "parts": {}}

    def save():
        res["total_s"] = round(time.perf_counter() - t_start, 1)
        write_json(args.json, res, quiet=True)

    def late(what):
        if time.perf_counter() > deadline:
            log(f"{what}: skipped (time budget)")
            res["parts"][what] = {"skipped": "time budget"}
            return True
        return False

    log(f"device {device} ({res['machine'].get('gpu', res['machine']['cpu'])}); {arch} {size}px batch {batch}; "
        f"work {work}, logs {log_dir}")
    t0 = time.perf_counter()
    data = make_data(work / "data", n_scenes, size, writers)
    base = make_base(work, arch)
    runner = Runner(work, log_dir, data, base)
    log(f"data: {n_scenes} scenes at {size} px in {len(data)} folders, base {base.name} "
        f"[{time.perf_counter() - t0:.0f} s]")
    every = 2 if args.tiny else 10
    sets = lambda steps_, compile_=True, ckpt=False, extra=(): recipe_sets(  # noqa: E731
        arch, size, batch, steps_, workers, compile_ and device.type == "cuda", ckpt, extra, log_every=every)

    def trainer(name, sets_, **kw):
        r = runner.run(name, sets_, **kw)
        res["parts"][name] = r
        sp = r.get("speed", {})
        loss = r.get("loss", {})
        log(f"{name}: rc {r['rc']}, {sp.get('images_per_s', '-')} images/s over {sp.get('steps', '-')} steps, "
            f"peak {sp.get('peak_gib', '-')} GiB, loss {loss.get('first_third_mean', float('nan')):.4f} -> "
            f"{loss.get('last_third_mean', float('nan')):.4f}, wall {r['wall_s']} s")
        save()
        return r

    if "headline" in parts and not late("headline"):
        trainer("headline", sets(steps))
    if "encoder" in parts and not late("encoder"):
        left = max(120.0, deadline - time.perf_counter() - 200)
        res["parts"]["encoder"] = enc = encoder_only(args, log_dir, min(330.0, left))
        log(f"encoder-only: ours {enc.get('ours')}; anchor {enc.get('anchor')}")
        save()
    if "no-compile" in parts and device.type == "cuda" and not late("no-compile"):
        trainer("no-compile", sets(short, compile_=False))
    if "checkpointing" in parts and not late("checkpointing"):
        trainer("checkpointing", sets(short, ckpt=True))
    if "resume" in parts and not late("resume"):
        res["parts"]["resume"] = resume_check(runner, sets(40, compile_=False), 20, 40, log)
        save()
    if "vit_h" in parts and not late("vit_h"):
        trainer("vit_h", recipe_sets(big, size, batch, 30 if not args.tiny else 10, workers, False, True,
                                     log_every=every), random_base=True)
    if "serve" in parts and not late("serve"):
        res["parts"]["serve"] = serve_part(arch, size, device, 16, log)
        save()

    # ---------------------------------------------------------------- the table
    p = res["parts"]
    rows = [["row", "figure", "goal"]]

    def rate(name):
        return p.get(name, {}).get("speed", {}).get("images_per_s")

    head, enc = rate("headline"), p.get("encoder", {})
    ours_tr = (enc.get("ours") or {}).get("train_ips")
    anc = enc.get("anchor") or {}
    if head:
        rows.append(["trainer, compile on (images/s)", f"{head:.1f}", ""])
    if head and ours_tr:
        res["trainer_over_encoder"] = head / ours_tr
        rows.append(["trainer / encoder-only training rate", f"{head / ours_tr:.3f}", ">= 0.85"])
    if ours_tr and anc.get("train_ips"):
        res["train_x"] = ours_tr / anc["train_ips"]
        rows.append(["encoder-only training vs anchor", f"x{res['train_x']:.2f}", ">= x4"])
    if head and anc.get("train_ips"):
        rows.append(["trainer vs anchor's encoder-only training", f"x{head / anc['train_ips']:.2f}", ""])
    if (enc.get("ours") or {}).get("infer_ips") and anc.get("infer_ips"):
        res["infer_x"] = enc["ours"]["infer_ips"] / anc["infer_ips"]
        rows.append(["inference vs anchor", f"x{res['infer_x']:.2f}", ">= x4"])
    for name in ("no-compile", "checkpointing"):
        if rate(name):
            rows.append([f"trainer, {name} (images/s)", f"{rate(name):.1f}", ""])
    for name in ("headline", "no-compile", "checkpointing", "vit_h"):
        gib = p.get(name, {}).get("speed", {}).get("peak_gib")
        if gib is not None:
            rows.append([f"peak memory, {name} (GiB)", f"{gib:.2f}", "< 10" if name == "vit_h" else ""])
    loss = p.get("headline", {}).get("loss", {})
    if loss:
        rows.append(["headline loss, first third -> last third",
                     f"{loss['first_third_mean']:.4f} -> {loss['last_third_mean']:.4f}", "falls"])
    rs = p.get("resume", {})
    if "tensors" in rs:
        rows.append(["resume: adapter tensors equal", f"{rs['equal_tensors']}/{rs['tensors']} "
                     f"(max diff {rs['max_abs_diff']:.1e})", "all"])
    sv = p.get("serve", {})
    if sv:
        rows.append(["serve: mixed pass / one by one", f"x{sv['mixed_over_single']:.2f} "
                     f"({sv['mixed_ips']:.1f} vs {sv['single_ips']:.1f} images/s)", ""])
    save()
    print(f"\n{arch} {size}px batch {batch} on {res['machine'].get('gpu', device)}; {res['total_s']:.0f} s in all")
    print(table(rows))
    failed = [n for n, r in p.items() if isinstance(r, dict) and r.get("rc") not in (None, 0)]
    if failed:
        print(f"failed runs: {failed} (logs in {log_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
