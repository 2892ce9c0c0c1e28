"""Load benchmark for `samadapt serve` on the tiny core over loopback.

Starts the real CLI server (`python -m samadapt.recipes.cli serve --port 0`) as a subprocess, with a tiny
core and three LoRA adapters made on the fly, then:

  1. a sequential baseline: every (adapter, image, prompt) request once, alone;
  2. the load run: 8 client threads x 50 /api/segment requests over 3 adapters + the plain core;
     every response must equal the baseline's (zero errors, zero mismatches); p50/p95/p99 and
     throughput;
  3. the prompt-to-mask round trip with the embedding cached: one client, many requests on one
     image and adapter, median and p95;
  4. the first request on a new image (the embedding is computed) for comparison.

    python benchmarks/serve_load.py            # print the figures
    python benchmarks/serve_load.py --record   # and append them to benchmarks/RESULTS.md

Exit status 1 if any request failed or differed.
"""
import argparse
import datetime
import io
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("seg_a", "seg_b", "seg_c")
PROMPTS = [
    {"points": [[40, 40, 1]]},
    {"points": [[20, 30, 1], [60, 50, 0]], "multimask": False},
    {"box": [10, 10, 70, 60]},
    {"points": [[30, 30, 1]], "box": [5, 5, 75, 75], "format": "rle"},
    {},
]


def make_fixture(root: Path, base=None, seed: int = 4321):
    """A tiny core checkpoint (or `base`) and three perturbed LoRA adapters for it."""
    import torch

    from samadapt import adapters, sam_core
    from samadapt.recipes.model import load_base

    if base is None:
        torch.manual_seed(seed)
        base = root / "tiny_core.pth"
        torch.save(sam_core.build_sam("tiny").state_dict(), base)
    folder = root / "adapters"
    folder.mkdir()
    sam = load_base(str(base))
    for i, name in enumerate(NAMES):
        adapters.attach(sam, adapters.config("lora", r=4), name=name)
        g = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for p in adapters.adapter_parameters(sam, name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        adapters.save(sam, folder / f"{name}.safetensors", name=name, domain=f"bench-{i}")
        adapters.detach(sam, name)
    return Path(base), folder, f"{sam.arch}@{sam.image_size}"


def image_png(h: int, w: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 4: h // 2, w // 4: w // 2] = (220, 60, 50)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def start_server(base: Path, folder: Path, threads, log: Path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "samadapt.recipes.cli", "serve", "--base", str(base), "--adapters", str(folder),
           "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = proc.stdout.readline()  # "samadapt serve: http://127.0.0.1:PORT/ ..."
    m = re.search(r"(http://\S+/)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}; see {log}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
    return proc, m.group(1)


def pct(xs, q):
    return 1000 * float(np.percentile(np.asarray(xs), q))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per client")
    ap.add_argument("--roundtrips", type=int, default=200, help="requests of the cached round-trip measurement")
    ap.add_argument("--base", help="core checkpoint (default: a random tiny core; same cost as a trained one)")
    ap.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for the server (default: torch's choice)")
    ap.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    import httpx

    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, folder, core = make_fixture(tmp, args.base)
        proc, url = start_server(base, folder, args.torch_threads, tmp / "server.log")
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                for _ in range(300):  # bounded wait until it answers
                    try:
                        if http.get("api/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.1)
                sizes = [(96, 128), (128, 80)]
                ids = [
                    http.post("api/images", files={"file": ("x.png", image_png(h, w, k), "image/png")}).json()[
                        "image_id"
                    ]
                    for k, (h, w) in enumerate(sizes)
                ]
                adapters_ = [None, *NAMES]
                keys = [(a, i, p) for a in adapters_ for i in range(len(ids)) for p in range(len(PROMPTS))]
                body = lambda k: dict(PROMPTS[k[2]], image_id=ids[k[1]], adapter=k[0])  # noqa: E731
                stable = lambda r: {k: v for k, v in r.json().items() if k != "elapsed_ms"}  # noqa: E731

                baseline = {}
                for k in keys:
                    r = http.post("api/segment", json=body(k))
                    r.raise_for_status()
                    baseline[k] = stable(r)

                lat, errors, lock = [], [], threading.Lock()

                def worker(t):
                    rng = random.Random(t)
                    with httpx.Client(base_url=url, timeout=120) as c:
                        for _ in range(args.requests):
                            k = rng.choice(keys)
                            t0 = time.perf_counter()
                            try:
                                r = c.post("api/segment", json=body(k))
                                bad = None if r.status_code == 200 and stable(r) == baseline[k] else f"{r.status_code}"
                            except Exception as e:  # noqa: BLE001
                                bad = repr(e)
                            dt = time.perf_counter() - t0
                            with lock:
                                lat.append(dt)
                                if bad:
                                    errors.append((k, bad))

                threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(args.clients)]
                t0 = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(timeout=600)
                wall = time.perf_counter() - t0

                # the prompt-to-mask round trip once the embedding is cached
                rng = np.random.default_rng(0)
                rt = []
                for _ in range(args.roundtrips):
                    x, y = (float(v) for v in rng.uniform(1, 79, 2))
                    t1 = time.perf_counter()
                    r = http.post("api/segment", json={"image_id": ids[0], "adapter": "seg_b", "points": [[x, y, 1]]})
                    rt.append(time.perf_counter() - t1)
                    r.raise_for_status()

                # the first request on new images (embedding computed), per adapter
                first = []
                for k in range(3):
                    iid = http.post(
                        "api/images", files={"file": ("y.png", image_png(96, 128, 100 + k), "image/png")}
                    ).json()["image_id"]
                    for a in adapters_:
                        t1 = time.perf_counter()
                        http.post(
                            "api/segment", json={"image_id": iid, "adapter": a, "points": [[40, 40, 1]]}
                        ).raise_for_status()
                        first.append(time.perf_counter() - t1)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    n = args.clients * args.requests
    ok = n - len(errors)
    cpu = (
        next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    import torch

    figures = {
        "load": f"{ok}/{n} ok, {len(errors)} errors or mismatches against the lone baseline",
        "latency": f"p50 {pct(lat, 50):.1f} ms, p95 {pct(lat, 95):.1f} ms, p99 {pct(lat, 99):.1f} ms",
        "throughput": f"{n / wall:.1f} requests/s ({wall:.1f} s for {n})",
        "roundtrip": f"median {1000 * statistics.median(rt):.1f} ms, p95 {pct(rt, 95):.1f} ms "
                     f"({len(rt)} requests, one client)",
        "first": f"median {1000 * statistics.median(first):.1f} ms ({len(first)} requests: 3 new images x 4 adapters)",
    }
    print(f"core {core}, adapters {', '.join(NAMES)} + plain core; {args.clients} clients x {args.requests} requests")
    for k, v in figures.items():
        print(f"  {k:<11} {v}")
    if errors:
        print(f"FAILED: {errors[:5]}", file=sys.stderr)
    if args.record:
        threads_txt = (
            f"OMP_NUM_THREADS={args.torch_threads}"
            if args.torch_threads
            else f"torch default ({torch.get_num_threads()} threads)"
        )
        cmd = "python benchmarks/serve_load.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        section = f"""
## Serve load (tiny core, loopback)

- machine: {os.cpu_count()}-core CPU VM ({cpu}), shared with other jobs (1-min load average {load_at_start:.1f} at start); torch {torch.__version__}, server {threads_txt}
- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC
- command: `{cmd.strip()}`
- setup: `samadapt serve --port 0` subprocess on 127.0.0.1; core {core} (random weights, same cost as trained); 3 LoRA r=4 adapters + the plain core; 2 images (128x96, 80x128); 5 prompt kinds (point, point + negative single-mask, box, point + box as RLE, promptless); masks as base64 PNG unless RLE; clients are httpx threads in one process

| measure | result |
|---|---|
| {args.clients} clients x {args.requests} requests, 3 adapters + core | {figures["load"]} |
| latency under that load | {figures["latency"]} |
| throughput | {figures["throughput"]} |
| prompt-to-mask round trip, embedding cached | {figures["roundtrip"]} |
| first request on a new image (embedding computed) | {figures["first"]} |
"""
        results = ROOT / "benchmarks" / "RESULTS.md"
        with open(results, "a", encoding="utf-8") as f:  # append only: other sections belong to others
            if f.tell() == 0:
                f.write("# Benchmark results\n")
            f.write(section)
        print(f"appended to {results}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
