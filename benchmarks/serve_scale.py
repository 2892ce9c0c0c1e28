"""Serving many adapters: one mixed encoder pass vs grouped vs one by one; the server's dynamic batching
on vs off; Ray Serve with 1 vs 2 replicas. Each part times its variants in the same run and prints ratios.

    python benchmarks/serve_scale.py                 # all three parts
    python benchmarks/serve_scale.py --part mixed    # or serve, ray

1. `mixed`: vit_b dims at 512 px (random weights), a batch of 8 images over 4 adapters (LoRA, DoRA,
   sam_adapter, bottleneck; 2 images each) through `AdapterBank.predict_batch` with an empty cache:
   `mode="mixed"` (one encoder pass), `"grouped"` (one per adapter), `"single"` (one per image), and
   the largest difference of the answers from one by one. Interleaved rounds, medians.
2. `serve`: the tiny core behind a real server on 127.0.0.1, 16 client threads over 4 adapters, every
   request on a new image (so each needs an embedding): throughput and p50/p95 latency with
   `--max-batch 8 --max-wait-ms 5` vs `--max-batch 1`, and whether the answers agree.
3. `ray`: the same load on `--engine ray` with 1 and then 2 model replicas (one torch thread each) on a
   local Ray instance; answers compared with the single-process server's.

Exit status 1 if an answer differs beyond its stated bound.
"""
import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import core_with_four_adapters, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("bench_a", "bench_b", "bench_c", "bench_d")


# ----------------------------------------------------------------------------- 1. mixed pass
def part_mixed(rounds: int) -> bool:
    from samadapt.adapters import AdapterBank

    sam, kinds = core_with_four_adapters("vit_b", 512)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (480, 512, 3), dtype=np.uint8) for _ in range(8)]
    items = [dict(image=im, adapter=list(kinds)[k % 4], box=np.array([40.0, 40.0, 300.0, 260.0]))
             for k, im in enumerate(images)]
    plain = [dict(it, adapter=None) for it in items]
    # the plain core batched and one by one: what batching alone costs or saves on this machine
    runs = {"mixed": (items, "mixed"), "grouped": (items, "grouped"), "single": (items, "single"),
            "plain core, batch 8": (plain, "mixed"), "plain core, 8 x batch 1": (plain, "single")}
    times = {m: [] for m in runs}
    answers = {}
    route = AdapterBank(sam).route.describe()
    for _ in range(rounds):
        for label, (its, mode) in runs.items():
            bank = AdapterBank(sam)  # empty embedding cache: every image is encoded
            t0 = time.perf_counter()
            answers[label] = bank.predict_batch(its, mode=mode)
            times[label].append(time.perf_counter() - t0)

    def largest_difference(a, b):
        return max(float(np.abs(x[2] - y[2]).max()) for x, y in zip(a, b))

    diff = largest_difference(answers["mixed"], answers["single"])
    # the equality the mixed pass promises is an fp32 one (a batched bf16 product rounds differently)
    exact = AdapterBank(sam, precision="fp32").predict_batch(items, mode="mixed")
    diff32 = largest_difference(exact, AdapterBank(sam, precision="fp32").predict_batch(items, mode="single"))
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\n## mixed-adapter batch: vit_b dims, 512 px, batch 8 over 4 adapters, {torch.get_num_threads()} "
          f"thread(s), {rounds} interleaved rounds (medians); encoder: {route}")
    print("| run | encoder passes | median s | vs mixed |\n|---|---|---|---|")
    for m, passes in (("mixed", 1), ("grouped", 4), ("single", 8), ("plain core, batch 8", 1),
                      ("plain core, 8 x batch 1", 8)):
        print(f"| {m} | {passes} | {med[m]:.2f} | {med[m] / med['mixed']:.2f}x |")
    print(f"largest difference of the mixed answers (low-res logits) from one by one: {diff:.2e} on the route "
          f"above, {diff32:.2e} in fp32 (bound 1e-5)")
    return diff32 <= 1e-5


# ----------------------------------------------------------------------------- load helpers
def scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 70, (96, 128, 3), dtype=np.uint8)
    y, x = rng.integers(20, 70), rng.integers(20, 100)
    img[y - 15: y + 15, x - 20: x + 20] = (220, 60, 50)
    return img


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def make_adapters(root: Path):
    from samadapt import adapters
    from samadapt.sam_core import build_sam

    torch.manual_seed(7)
    ckpt = root / "core.pth"
    torch.save(build_sam("tiny").state_dict(), ckpt)
    folder = root / "adapters"
    folder.mkdir()
    for i, name in enumerate(NAMES):
        sam = build_sam("tiny")
        sam.load_state_dict(torch.load(ckpt, weights_only=True))
        adapters.attach(sam, adapters.config("lora", r=4), name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in adapters.adapter_parameters(sam, name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        adapters.save(sam, folder / f"{name}.safetensors", name=name)
    return ckpt, folder


def load(url: str, clients: int, per_client: int, seed0: int):
    """`clients` threads, each uploading `per_client` new images and segmenting each under the next adapter
    (after one untimed request per adapter, so adapter files are loaded before the clock starts).
    Returns (wall seconds, latencies, answers by (client, k), failures)."""
    import httpx

    with httpx.Client(base_url=url, timeout=300) as http:
        iid = http.post("api/images", files={"file": ("w.png", png(scene(999_999)), "image/png")}).json()["image_id"]
        for name in NAMES:
            http.post("api/segment", json={"image_id": iid, "adapter": name, "points": [[60, 45, 1]]})

    lat, answers, failures, lock = [], {}, [], threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            ids = []
            for k in range(per_client):
                r = http.post("api/images", files={"file": ("x.png", png(scene(seed0 + 1000 * c + k)), "image/png")})
                ids.append(r.json()["image_id"])
            start.wait()
            for k, iid in enumerate(ids):
                body = {"image_id": iid, "adapter": NAMES[(c + k) % len(NAMES)], "points": [[60, 45, 1]]}
                t0 = time.perf_counter()
                r = http.post("api/segment", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    if r.status_code == 200:
                        answers[c, k] = r.json()
                    else:
                        failures.append((c, k, r.status_code, r.text[:200]))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat, answers, failures


def agree(a: dict, b: dict) -> bool:
    return a["best"] == b["best"] and max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) <= 1e-4


def row(name: str, wall: float, lat, n: int) -> str:
    q = statistics.quantiles(lat, n=100)
    return f"| {name} | {n / wall:.1f} | {1000 * statistics.median(lat):.0f} | {1000 * q[94]:.0f} |"


# ----------------------------------------------------------------------------- 2. serve batching
def part_serve(clients: int, per_client: int) -> bool:
    from samadapt.recipes.model import load_base
    from samadapt.recipes.serve import background_server, create_app

    torch.set_num_threads(1)  # one model thread; the other core serves HTTP
    with tempfile.TemporaryDirectory() as d:
        ckpt, folder = make_adapters(Path(d))
        res = {}
        for label, mb in (("batching off (--max-batch 1)", 1), ("batching on (--max-batch 8 --max-wait-ms 5)", 8)):
            app = create_app(load_base(str(ckpt)), folder, max_batch=mb, max_wait_ms=5, max_queue=4 * clients,
                             image_cache=clients * per_client + 8)
            with background_server(app) as url:
                res[label] = load(url, clients, per_client, seed0=0)
            if app.state.batcher is not None:
                stats = dict(app.state.batcher.stats)
    (off, on) = res.values()
    n = clients * per_client
    ok = not off[3] and not on[3] and all(agree(on[2][k], off[2][k]) for k in off[2])
    print(f"\n## serve: tiny core, {clients} clients x {per_client} requests over {len(NAMES)} adapters, "
          f"every request a new image")
    print("| server | req/s | p50 ms | p95 ms |\n|---|---|---|---|")
    for label, (wall, lat, _, _) in res.items():
        print(row(label, wall, lat, n))
    print(f"throughput on/off: {n / on[0] / (n / off[0]):.2f}x; batches {stats['batches']} for "
          f"{stats['batched_requests']} requests (largest {stats['largest_batch']}); failures "
          f"{len(off[3]) + len(on[3])}; answers agree (best mask, scores within 1e-4): {ok}")
    return ok


# ----------------------------------------------------------------------------- 3. ray
def part_ray(clients: int, per_client: int) -> bool:
    import socket

    import ray
    from ray import serve

    from samadapt.recipes.model import load_base
    from samadapt.recipes.serve import background_server, create_app
    from samadapt.recipes.serve.ray_app import build_app

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        ckpt, folder = make_adapters(Path(d))
        app = create_app(load_base(str(ckpt)), folder, max_batch=1, max_queue=4 * clients,
                         image_cache=clients * per_client + 8)
        with background_server(app) as url:
            ref = load(url, clients, per_client, seed0=0)
        res = {}
        ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for replicas in (1, 2):
                # the single process's settings: batching off, a queue that holds every client
                serve.run(build_app(folder, base=str(ckpt), replicas=replicas, capacity=4, threads=1,
                                    image_cache=clients * per_client + 8, max_batch=1, max_queue=4 * clients),
                          name="samadapt", route_prefix="/")
                res[replicas] = load(f"http://127.0.0.1:{port}/", clients, per_client, seed0=0)
                serve.delete("samadapt")
        finally:
            serve.shutdown()
            ray.shutdown()
    n = clients * per_client
    ok = all(not r[3] and all(agree(r[2][k], ref[2][k]) for k in ref[2]) for r in res.values())
    print(f"\n## Ray Serve: tiny core, {clients} clients x {per_client} requests over {len(NAMES)} adapters, "
          f"one torch thread per replica, {os.cpu_count()} CPU cores")
    print("| engine | req/s | p50 ms | p95 ms |\n|---|---|---|---|")
    print(row("single process (batching off)", ref[0], ref[1], n))
    for replicas, (wall, lat, _, _) in res.items():
        print(row(f"ray, {replicas} replica(s)", wall, lat, n))
    print(f"throughput 2 vs 1 replicas: {n / res[2][0] / (n / res[1][0]):.2f}x; answers equal the single "
          f"process's (best mask, scores within 1e-4): {ok}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "mixed", "serve", "ray"], default="all")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the mixed-pass part")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=8)
    args = ap.parse_args()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, load average at start "
          f"{info.get('loadavg_at_start')}, {info['date_utc']} UTC")
    ok = True
    if args.part in ("all", "mixed"):
        ok &= part_mixed(args.rounds)
    if args.part in ("all", "serve"):
        ok &= part_serve(args.clients, args.per_client)
    if args.part in ("all", "ray"):
        ok &= part_ray(args.clients, args.per_client)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
