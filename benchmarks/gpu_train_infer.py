"""GPU benchmark: LoRA training and inference of the SAM image encoder, samadapt vs transformers.

One call, under a time budget (`--budget`, seconds; later phases are skipped past it), the JSON
rewritten after every phase so a cut-off run still leaves its figures:

1. attention alone, at the model's two shapes (a 64 x 64 global block; 14 x 14 windows), bf16:
   every route to the same function - timm's N x N bias (4-D, the best the bias route gets),
   the factorised bias through SDPA (q/k widened; v as is or zero-padded; each fused backend
   forced in turn), samadapt's fused Triton kernel (`sam_core.fast.relpos_triton`), and plain
   attention without any bias (a lower bound, not the same function).
   Forward and forward + backward median ms, and each route's output and q/k/v gradients against
   an fp32 materialised reference.
2. the whole encoder (one image, rel-pos tables and lora_B made non-zero, a random projection of
   the output as the loss) through each route against the same weights in fp32 through timm's
   own attention: output and LoRA-gradient relative errors; a route worse than 3x timm's own bf16
   error is left out. Then the model routes are picked from (1): fastest forward for inference,
   fastest forward + backward for training, separately for global and windowed blocks
   (`enable_fast_attention`'s `kernel` / `window_kernel` / `pad_v`, and the SDPA backend order).
3. vit_b at 1024 x 1024, batch 4, LoRA r=4 on every `qkv` (peft `inject_adapter_in_model`, adapter
   weights fp32), loss = mean square of the neck output, one AdamW step:
   * anchor: transformers' SamVisionModel (its default attention), fp32 weights under
     `torch.autocast(bfloat16)`;
   * ours: sam_core's timm encoder with the core in bf16 and the picked fast attention under
     `torch.compile` (the headline; its output checked against eager on the same weights),
     training and inference images/s (median step), peak memory
     (`torch.cuda.max_memory_allocated`, reset before each phase).
4. vit_h, batch 4, training with gradient checkpointing: peak memory and speed, ours (eager, the
   picked training route) and the anchor (each guarded: an out-of-memory is reported, not fatal).
5. while time is left: ours eager, ours compiled through the factorised SDPA route (cuDNN first),
   ours with timm's own attention (bf16 core).

Prints a short table last; `--json PATH` has every figure. The H100 runs are in
benchmarks/RESULTS.md and benchmarks/results/gpu_h100_run*.json.

`--tiny` swaps in tiny sizes (samadapt's `tiny` arch, 256 px, batch 2) so the whole script runs
end to end on a CPU (with TRITON_INTERPRET=1 the Triton route runs too, through the interpreter,
whose bf16 matrix product is wrong: the checks then leave that route out); the numbers mean nothing.

    python benchmarks/gpu_train_infer.py --json gpu.json                 # about 4 minutes on an H100
    python benchmarks/gpu_train_infer.py --tiny --device cpu --budget 120     # a smoke run
"""
import argparse
import contextlib
import copy
import gc
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from _common import machine, table, write_json

from samadapt.sam_core.fast.attention import _decomposed_terms  # the per-query bias terms, as every route has them

HF_DIMS = {  # transformers SamVisionConfig numbers for our archs
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11],
                  mlp_dim=3072, output_channels=256, window_size=14),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31],
                  mlp_dim=5120, output_channels=256, window_size=14),
    "tiny": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, global_attn_indexes=[1, 3],
                 mlp_dim=384, output_channels=64, window_size=8),
}
HEADS = {"vit_b": (12, 64), "vit_h": (16, 80), "tiny": (3, 32)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def _first_line(e: BaseException, n: int = 200) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:n] if s else ''}"


def _backends(names):
    """An `sdpa_kernel` context for the named SDPA backends, in priority order (None: SDPA's own choice)."""
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, n) for n in names]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority order
        return sdpa_kernel(order)


def timed(fn, steps, warmup, device):
    """Median seconds per call of fn and the peak memory of the measured calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    _reset_peak(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times, "peak_gib": _peak_gib(device)}


# ============================================================================ 1. attention alone
def _attention_routes(device):
    """name -> (fn(q, k, v, table_h, table_w, hw, scale), sdpa backends, same function as SAM's)."""
    from samadapt.sam_core.fast import fast_sam_attention, triton_sam_attention
    from samadapt.sam_core.fast.relpos_triton import HAS_TRITON

    def bias_route(q, k, v, th, tw, hw, scale):  # timm's decomposed bias, materialised, 4-D
        B, nh, N, _ = q.shape
        rel_h, rel_w = _decomposed_terms(q, th, tw, hw)
        bias = (rel_h.reshape(B, nh, N, hw[0], 1) + rel_w.reshape(B, nh, N, 1, hw[1])).reshape(B, nh, N, N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    def fact(pad_v):
        return lambda q, k, v, th, tw, hw, scale: fast_sam_attention(q, k, v, th, tw, hw, scale, pad_v=pad_v)

    routes = {
        "bias N x N (timm's route, 4-D)": (bias_route, None, True),
        "sdpa factorised": (fact(False), None, True),
        "sdpa factorised, v padded": (fact(True), None, True),
    }
    if device.type == "cuda":
        routes.update({
            "sdpa factorised [cudnn]": (fact(False), ["CUDNN_ATTENTION"], True),
            "sdpa factorised, v padded [cudnn]": (fact(True), ["CUDNN_ATTENTION"], True),
            "sdpa factorised, v padded [flash]": (fact(True), ["FLASH_ATTENTION"], True),
            "sdpa factorised [efficient]": (fact(False), ["EFFICIENT_ATTENTION"], True),
        })
    if HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        routes["triton"] = (triton_sam_attention, None, True)
    routes["no bias (lower bound, another function)"] = (
        lambda q, k, v, th, tw, hw, scale: F.scaled_dot_product_attention(q, k, v, scale=scale), None, False)
    return routes


def _reference(q, k, v, th, tw, hw, scale):
    """fp32, materialised: softmax(scale q k^T + rel_h + rel_w) v, the decomposed bias as timm builds it."""
    q, k, v = q.float(), k.float(), v.float()
    B, nh, N, _ = q.shape
    rel_h, rel_w = _decomposed_terms(q, th.float(), tw.float(), hw)
    bias = (rel_h.reshape(B, nh, N, hw[0], 1) + rel_w.reshape(B, nh, N, 1, hw[1])).reshape(B, nh, N, N)
    return ((q * scale) @ k.transpose(-1, -2) + bias).softmax(-1) @ v


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def attention_bench(shapes, device, steps, warmup, deadline, log):
    routes = _attention_routes(device)
    out = {}
    for label, (B, nh, hw, d) in shapes.items():
        h, w = hw
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, nh, h * w, d, device=device, generator=g).to(torch.bfloat16) for _ in range(3))
        th = (torch.randn(2 * h - 1, d, device=device, generator=g) * 0.5).to(torch.bfloat16)
        tw = (torch.randn(2 * w - 1, d, device=device, generator=g) * 0.5).to(torch.bfloat16)
        gout = torch.randn(B, nh, h * w, d, device=device, generator=g).to(torch.bfloat16)
        scale = d ** -0.5
        qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        ref = _reference(qr, kr, vr, th, tw, hw, scale)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), gout.float())
        ref = ref.detach()
        rows = {}
        for name, (fn, backends, same) in routes.items():
            if time.perf_counter() > deadline:
                rows[name] = {"skipped": "time budget"}
                continue
            row = {}
            try:
                with _backends(backends):
                    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                    o = fn(qg, kg, vg, th, tw, hw, scale)
                    if same:
                        row["out_rel_err"] = _rel(o, ref)
                    with torch.no_grad():
                        row["fwd"] = timed(lambda: fn(q, k, v, th, tw, hw, scale), steps, warmup, device)
                    grads = torch.autograd.grad(o, (qg, kg, vg), gout)
                    if same:
                        row["grad_rel_err"] = max(_rel(a, b) for a, b in zip(grads, ref_grads))

                    def fwd_bwd():
                        o = fn(qg, kg, vg, th, tw, hw, scale)
                        torch.autograd.grad(o, (qg, kg, vg), gout)

                    row["fwd_bwd"] = timed(fwd_bwd, steps, warmup, device)
            except Exception as e:  # a refused route is a finding, not a failure of the run
                row["error"] = _first_line(e)
            rows[name] = row
            fmt = (lambda r, key: f"{r[key]['median_s'] * 1e3:8.3f}" if key in r else "       -")
            err = (
                f"err out {row['out_rel_err']:.1e} grad {row.get('grad_rel_err', float('nan')):.1e}"
                if "out_rel_err" in row
                else ""
            )
            log(
                f"  [{label}] {name:42s} fwd {fmt(row, 'fwd')} ms  fwd+bwd {fmt(row, 'fwd_bwd')} ms  "
                f"{err} {row.get('error', '')}"
            )
        out[label] = {"shape": {"batch": B, "heads": nh, "grid": list(hw), "head_dim": d}, "routes": rows}
        del q, k, v, gout, qr, kr, vr, ref, ref_grads
        _reset_peak(device)
    return out


BF16_OK = 3e-2  # a route counts only if its bf16 output and gradients are within this of the fp32 reference


def pick_routes(att):
    """{infer|train: {"global"|"window": route name}} from the attention table (exact routes only)."""
    picks = {}
    for phase, key in (("infer", "fwd"), ("train", "fwd_bwd")):
        picks[phase] = {}
        for label, res in att.items():
            best = None
            for name, r in res["routes"].items():
                if key not in r or "out_rel_err" not in r or name.startswith("bias") or r.get("excluded"):
                    continue
                if r["out_rel_err"] > BF16_OK or r.get("grad_rel_err", 0.0) > BF16_OK:
                    continue
                if best is None or r[key]["median_s"] < res["routes"][best][key]["median_s"]:
                    best = name
            picks[phase][label] = best or "sdpa factorised"
    return picks


def route_settings(picks):
    """enable_fast_attention kwargs + SDPA backend order for a {global, window} pick."""
    def parse(name):
        if name == "triton":
            return name, None, None
        pad = "v padded" in name
        backend = None
        for tag, b in (
            ("[cudnn]", "CUDNN_ATTENTION"),
            ("[flash]", "FLASH_ATTENTION"),
            ("[efficient]", "EFFICIENT_ATTENTION"),
        ):
            if tag in name:
                backend = b
        return "sdpa", pad, backend

    gk, gpad, gb = parse(picks["global"])
    wk, wpad, wb = parse(picks["window"])
    # one pad_v and one backend order per model: the global blocks (most of the attention time) decide
    pad = gpad if gk == "sdpa" else wpad
    backend = gb if gk == "sdpa" else wb
    order = (
        [backend] + [b for b in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH") if b != backend]
        if backend
        else None
    )
    kw = {"kernel": gk, "window_kernel": wk, "pad_v": pad}
    return kw, order


def describe(kw, order):
    if kw is None:
        return "timm's own attention"
    parts = [f"global {kw['kernel']}", f"windows {kw['window_kernel']}"]
    if "sdpa" in (kw["kernel"], kw["window_kernel"]):
        parts.append("v padded" if kw["pad_v"] else "v as is")
        if order:
            parts.append(order[0].split("_")[0].lower() + " first")
    return ", ".join(parts)


# ============================================================================ 3. models
def _lora(model, seed=1):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["qkv"]), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # adapters train in fp32 whatever the core's dtype
    return model


def _on(device):
    # build straight on the device (random init there is fast); fall back to a CPU build + move
    return torch.device(device) if device.type == "cuda" else contextlib.nullcontext()


def build_ours(arch, image_size, device, attn=None, ckpt=False, seed=0):
    """sam_core's encoder, core in bf16, LoRA r=4 on qkv; attn: enable_fast_attention kwargs
    (None: timm's own attention)."""
    from samadapt.sam_core import build_sam
    from samadapt.sam_core.fast import enable_fast_attention

    torch.manual_seed(seed)
    with _on(device):
        enc = build_sam(arch, image_size=image_size).image_encoder
    enc = enc.to(device=device, dtype=torch.bfloat16)
    if attn is not None:
        enable_fast_attention(enc, **attn)
    if ckpt:
        enc.set_grad_checkpointing(True)
    return _lora(enc)


def build_anchor(arch, image_size, device, ckpt=False):
    from transformers import SamVisionConfig, SamVisionModel

    with _on(device):
        model = SamVisionModel(SamVisionConfig(image_size=image_size, **HF_DIMS[arch]))
    model = model.to(device)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _lora(model), model.config._attn_implementation


def trainer(model, forward, x, device, autocast, backends=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with _backends(backends), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = forward(model, x)
        loss = out.float().square().mean()
        loss.backward()
        opt.step()

    return step


def inferer(model, forward, x, device, autocast, backends=None):
    model.eval()

    def run():
        with (
            torch.inference_mode(),
            _backends(backends),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast),
        ):
            return forward(model, x)

    return run


def ours_fwd(model, x):
    return model.forward_features(x)


def anchor_fwd(model, x):
    return model(pixel_values=x).last_hidden_state


def _compiled(model):
    fn = torch.compile(model.forward_features)
    return lambda m, x: fn(x)


def guarded(label, fn, device, log):
    try:
        return fn()
    except torch.OutOfMemoryError as e:  # report and go on
        log(f"  {label}: out of memory ({_first_line(e, 120)})")
        return {"oom": True}
    except Exception as e:  # a failing variant must not hide the others' figures
        log(f"  {label}: failed: {_first_line(e)}")
        return {"error": _first_line(e, 400)}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke run of the whole script")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; later phases are skipped past it")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per phase")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-vit-h", action="store_true", help="skip the vit_h checkpointing rows")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    t_start = time.perf_counter()
    deadline = t_start + args.budget

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run: one thread is steadier on a shared machine
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny:
        arch, big, size, batch, steps, warmup = "tiny", "tiny", 256, args.batch or 2, args.steps or 2, args.warmup or 1
    else:
        arch, big, size, batch, steps, warmup = (
            "vit_b",
            "vit_h",
            1024,
            args.batch or 4,
            args.steps or 10,
            args.warmup or 3,
        )
    info = machine()
    import peft
    import timm
    import transformers

    info.update(timm=timm.__version__, transformers=transformers.__version__, peft=peft.__version__)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    log(f"device {device} ({info.get('gpu', info['cpu'])}), torch {torch.__version__}, timm {timm.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}; {arch} {size}px batch {batch}")
    res = {"machine": info, "args": vars(args), "device": str(device), "arch": arch, "big_arch": big,
           "image_size": size, "batch": batch, "rows": [], "log": lines}

    def save():
        res["total_s"] = time.perf_counter() - t_start
        write_json(args.json, res, quiet=True)

    # ---------------------------------------------------------------- 1. attention alone
    nh, d = HEADS[arch]
    grid = size // 16
    win = HF_DIMS[arch]["window_size"]
    n_win = (-(-grid // win)) ** 2
    shapes = {"global": (batch, nh, (grid, grid), d), "window": (batch * n_win, nh, (win, win), d)}
    log("attention alone (bf16), median ms:")
    res["attention"] = attention_bench(shapes, device, steps, warmup, deadline, log)

    def choose():
        res["picks"] = picks = pick_routes(res["attention"])
        tr, inf = route_settings(picks["train"]), route_settings(picks["infer"])
        log(f"picked: training {describe(*tr)}; inference {describe(*inf)}")
        save()
        return (*tr, *inf)

    train_kw, train_order, infer_kw, infer_order = choose()

    torch.manual_seed(0)
    x32 = torch.randn(batch, 3, size, size, device=device)
    x16 = x32.to(torch.bfloat16)

    # ---------------------------------------------------------------- 2. whole encoder vs an fp32 reference
    def model_check():
        """Each route's whole-encoder output and LoRA gradients (bf16 core, one image) against the
        same weights in fp32 through timm's own attention; rel-pos tables and lora_B made non-zero
        so that the bias and every LoRA tensor matter."""
        from samadapt.sam_core.fast import enable_fast_attention

        base = build_ours(arch, size, device, attn=None, seed=3)
        with torch.no_grad():
            for n, p in base.named_parameters():
                if "rel_pos" in n:
                    p.normal_(0, 0.1)
                elif "lora_B" in n:
                    p.normal_(0, 0.02)
        xb = x32[:1]
        # a fixed random projection of the output as the loss: the timed steps' mean square of the
        # neck's LayerNorm output is nearly constant (each pixel's normalised channels), so its
        # gradient is mostly rounding and says nothing about a route
        proj = None

        def run(m, x):
            nonlocal proj
            m.train()
            o = m.forward_features(x)
            if proj is None:
                proj = torch.randn(o.shape, device=o.device, generator=torch.Generator(device=o.device).manual_seed(5))
            (o.float() * proj).mean().backward()
            return o.detach().float(), torch.cat(
                [p.grad.float().flatten() for n, p in m.named_parameters() if "lora_" in n]
            )

        ref_o, ref_g = run(copy.deepcopy(base).float(), xb)
        out = {}
        for name in model_routes:
            if time.perf_counter() > deadline:
                break
            kw, order = route_settings({"global": name, "window": name})
            m = copy.deepcopy(base)
            enable_fast_attention(m, **kw)
            try:
                with _backends(order):
                    o, g = run(m, xb.to(torch.bfloat16))
                out[name] = {"out_rel_err": _rel(o, ref_o), "lora_grad_rel_err": _rel(g, ref_g)}
            except Exception as e:
                out[name] = {"error": _first_line(e)}
            log(f"  whole encoder [{name}] vs fp32 timm: " + (f"output {out[name]['out_rel_err']:.2e}, LoRA gradients "
                f"{out[name]['lora_grad_rel_err']:.2e}" if "error" not in out[name] else out[name]["error"]))
            del m
        # timm's own attention with the core in bf16: the bf16 error every route is measured against
        m = copy.deepcopy(base)
        o, g = run(m, xb.to(torch.bfloat16))
        out["timm attention (bf16)"] = {"out_rel_err": _rel(o, ref_o), "lora_grad_rel_err": _rel(g, ref_g)}
        log(
            "  whole encoder [timm attention, bf16 core] vs fp32 timm: "
            f"output {out['timm attention (bf16)']['out_rel_err']:.2e}, "
            f"LoRA gradients {out['timm attention (bf16)']['lora_grad_rel_err']:.2e}"
        )
        return out

    model_routes = [n for n in ("sdpa factorised", "sdpa factorised [cudnn]", "sdpa factorised, v padded [flash]",
                                "sdpa factorised, v padded", "triton")
                    if any(n in r["routes"] and "error" not in r["routes"][n] for r in res["attention"].values())]
    log(f"whole encoder ({arch}, one image) vs fp32, relative errors:")
    chk = guarded("model check", model_check, device, log)
    res["model_check"] = chk
    if isinstance(chk, dict) and "timm attention (bf16)" in chk:
        limit = max(3 * chk["timm attention (bf16)"]["lora_grad_rel_err"], BF16_OK)
        bad = {n for n, r in chk.items() if "error" in r or r["lora_grad_rel_err"] > limit or r["out_rel_err"] > limit}
        if bad:
            log(f"routes left out after the whole-encoder check: {sorted(bad)}")
            for res_shape in res["attention"].values():
                for n in list(res_shape["routes"]):
                    if n in bad:
                        res_shape["routes"][n]["excluded"] = "whole-encoder check"
        train_kw, train_order, infer_kw, infer_order = choose()

    def add_row(name, tr, inf, extra=None):
        row = {"name": name, "train": tr, "infer": inf}
        row.update(extra or {})
        res["rows"].append(row)
        fmt = lambda r: (
            f"{batch / r['median_s']:.1f} img/s, {r['peak_gib']:.2f} GiB"
            if r and "median_s" in r and r["peak_gib"] is not None
            else (f"{batch / r['median_s']:.1f} img/s" if r and "median_s" in r else str(r))
        )
        log(f"{name}: train {fmt(tr)} | infer {fmt(inf)}  [{time.perf_counter() - t_start:.0f} s]")
        save()

    def late(what):
        if time.perf_counter() > deadline:
            log(f"{what}: skipped (time budget)")
            return True
        return False

    # ---------------------------------------------------------------- 3. vit_b: anchor, ours eager, ours compiled
    def anchor_rows():
        model, impl = build_anchor(arch, size, device)
        tr = guarded(
            "anchor train",
            lambda: timed(trainer(model, anchor_fwd, x32, device, autocast=True), steps, warmup, device),
            device,
            log,
        )
        inf = guarded(
            "anchor infer",
            lambda: timed(inferer(model, anchor_fwd, x32, device, autocast=True), steps, warmup, device),
            device,
            log,
        )
        add_row(
            f"anchor: transformers SamVisionModel ({impl}), fp32 weights, bf16 autocast", tr, inf, {"anchor": True}
        )

    guarded("anchor", anchor_rows, device, log)

    def ours_rows(label, kw_train, order_train, kw_infer, order_infer, compile_):
        fwd = _compiled if compile_ else (lambda m: ours_fwd)
        w = warmup + (2 if compile_ else 0)
        m = build_ours(arch, size, device, attn=kw_train)
        tr = guarded(
            f"{label} train",
            lambda: timed(trainer(m, fwd(m), x16, device, False, order_train), steps, w, device),
            device,
            log,
        )
        extra = {}
        if compile_ and "median_s" in tr:
            with _backends(order_train):  # the compiled graph against eager on the same weights and input
                extra["compiled_vs_eager_out_rel_diff"] = _rel(fwd(m)(m, x16).detach(), ours_fwd(m, x16).detach())
        del m
        _reset_peak(device)
        m = build_ours(arch, size, device, attn=kw_infer)
        inf = guarded(
            f"{label} infer",
            lambda: timed(inferer(m, fwd(m), x16, device, False, order_infer), steps, w, device),
            device,
            log,
        )
        del m
        extra.update({"ours": True, "compiled": compile_, "train_attention": describe(kw_train, order_train),
                      "infer_attention": describe(kw_infer, order_infer)})
        add_row(label, tr, inf, extra)
        if "compiled_vs_eager_out_rel_diff" in extra:
            log(f"  compiled vs eager output (training graph): rel diff {extra['compiled_vs_eager_out_rel_diff']:.2e}")

    if args.no_compile and not late("ours eager"):
        guarded("ours eager", lambda: ours_rows("ours: bf16 core, fast attention (picked), eager",
                                                train_kw, train_order, infer_kw, infer_order, False), device, log)
    if not args.no_compile and not late("ours compiled"):
        guarded("ours compiled", lambda: ours_rows("ours: bf16 core, fast attention (picked), torch.compile",
                                                   train_kw, train_order, infer_kw, infer_order, True), device, log)

    # ---------------------------------------------------------------- 4. vit_h, batch 4, checkpointing
    big_rows = res.setdefault("big", [])
    if not args.no_vit_h:
        h_steps = max(2, steps // 3)

        h_kw, h_order = train_kw, train_order

        def ours_h():
            m = build_ours(big, size, device, attn=h_kw, ckpt=True)
            r = timed(trainer(m, ours_fwd, x16, device, False, h_order), h_steps, 1, device)
            r["name"] = f"ours {big} train, checkpointing, eager, {describe(h_kw, h_order)}"
            return r

        def anchor_h():
            m, _ = build_anchor(big, size, device, ckpt=True)
            r = timed(trainer(m, anchor_fwd, x32, device, True), h_steps, 1, device)
            r["name"] = f"anchor {big} train, checkpointing"
            return r

        for label, fn in ((f"ours {big} ckpt", ours_h), (f"anchor {big} ckpt", anchor_h)):
            if late(label):
                break
            r = guarded(label, fn, device, log)
            r.setdefault("name", label)
            big_rows.append(r)
            if "median_s" in r:
                log(
                    f"{r['name']}: {batch / r['median_s']:.1f} img/s, peak {r['peak_gib']:.2f} GiB"
                    if r["peak_gib"] is not None
                    else f"{r['name']}: {batch / r['median_s']:.1f} img/s"
                )
            save()

    # ---------------------------------------------------------------- 5. extras while time is left
    cudnn_kw, cudnn_order = route_settings({"global": "sdpa factorised [cudnn]", "window": "sdpa factorised [cudnn]"})
    extras = []  # (label, kw, order, compile)
    if not args.no_compile:
        extras.append(("ours: bf16 core, fast attention (picked), eager", None, None, False))
        if (train_kw, train_order) != (cudnn_kw, cudnn_order):
            extras.append(
                ("ours: bf16 core, factorised sdpa (cudnn first), torch.compile", cudnn_kw, cudnn_order, True)
            )
    extras.append(("ours: bf16 core, timm attention, eager", None, None, False))
    for label, kw, order, comp in extras:
        if late(label):
            break
        if "picked" in label:
            guarded(label, lambda: ours_rows(label, train_kw, train_order, infer_kw, infer_order, comp), device, log)
        else:
            guarded(label, lambda: ours_rows(label, kw, order, kw, order, comp), device, log)

    # ---------------------------------------------------------------- the table, last
    save()
    rows = [["config", "train img/s", "train peak", "infer img/s", "infer peak", "x anchor (train / infer)"]]
    anchor = next((r for r in res["rows"] if r.get("anchor")), None)

    def ips(r):
        return batch / r["median_s"] if r and "median_s" in r else None

    def gib(r):
        return f"{r['peak_gib']:.2f} GiB" if r and r.get("peak_gib") is not None else "-"

    best = None
    for r in res["rows"]:
        t, i = ips(r["train"]), ips(r["infer"])
        ratio = ""
        if anchor and not r.get("anchor") and t and i and ips(anchor["train"]) and ips(anchor["infer"]):
            r["train_x"], r["infer_x"] = t / ips(anchor["train"]), i / ips(anchor["infer"])
            ratio = f"x{r['train_x']:.2f} / x{r['infer_x']:.2f}"
            if r.get("ours") and (best is None or r["train_x"] + r["infer_x"] > best["train_x"] + best["infer_x"]):
                best = r
        rows.append(
            [
                r["name"],
                f"{t:.1f}" if t else "fail",
                gib(r["train"]),
                f"{i:.1f}" if i else "fail",
                gib(r["infer"]),
                ratio,
            ]
        )
    for r in big_rows:
        t = ips(r)
        rows.append(
            [
                f"{r['name']} (batch {batch})",
                f"{t:.1f}" if t else ("OOM" if r.get("oom") else "fail"),
                gib(r),
                "",
                "",
                "",
            ]
        )
    if best:
        res["best"] = {"name": best["name"], "train_x": best["train_x"], "infer_x": best["infer_x"],
                       "train_peak_ratio": (best["train"]["peak_gib"] / anchor["train"]["peak_gib"])
                       if best["train"].get("peak_gib") and anchor["train"].get("peak_gib") else None}
    save()
    print(f"\n{arch} {size}px batch {batch} on {info.get('gpu', device)}; {res['total_s']:.0f} s in all")
    print(table(rows))
    if best:
        b = res["best"]
        mem = f", training peak memory x{b['train_peak_ratio']:.2f} of the anchor's" if b["train_peak_ratio"] else ""
        print(f"best of ours vs anchor: training x{b['train_x']:.2f} images/s, inference x{b['infer_x']:.2f}{mem}")


if __name__ == "__main__":
    main()
