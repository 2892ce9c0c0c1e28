"""GPU benchmark: LoRA training and inference of the SAM image encoder, samadapt vs transformers.

Defaults (an H100 or similar; finishes in well under 5 minutes):
  * vit_b at 1024 x 1024, batch 4, LoRA r=4 on every `qkv` (peft `inject_adapter_in_model`), loss =
    mean square of the neck output, one AdamW step over the LoRA parameters (kept in fp32);
  * ours:   sam_core's timm encoder, core weights in bf16, `enable_fast_attention` (no N x N bias;
            flash / memory-efficient SDPA), optional `--compile`, `--ckpt` gradient checkpointing;
  * anchor: transformers' SamVisionModel (vit_b config, its default attention), fp32 weights under
            `torch.autocast(bfloat16)`;
  * also:   ours with timm's own attention (same bf16 core), to isolate the attention change
            (`--no-plain` skips it), and on CUDA ours with v zero-padded to the q/k width so that
            flash attention can take it (`--no-pad-v-variant` skips it; not with --compile);
  * first, a probe of which SDPA backends accept the fast path's shapes (fwd + bwd), and whether
    a whole fast forward/backward runs with the math fallback switched off;
  * training and inference images/s (median step time), peak memory
    (torch.cuda.max_memory_allocated, reset before each phase);
  * a vit_h batch-4 training step with gradient checkpointing: peak memory and time, ours and
    the anchor (each guarded: an out-of-memory is reported, not fatal).
Prints a short table last; `--json PATH` writes every figure.

`--tiny` swaps in tiny sizes (samadapt's `tiny` arch, 256 px, batch 2) so the whole script can be
verified end to end on a CPU; its numbers mean nothing.

    python benchmarks/gpu_train_infer.py [--compile] [--ckpt] [--json out.json]
    python benchmarks/gpu_train_infer.py --tiny --device cpu            # a smoke run
"""
import argparse
import gc
import statistics
import time
import warnings

import torch

from _common import machine, table, write_json

HF_DIMS = {  # transformers SamVisionConfig numbers for our archs
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11],
                  mlp_dim=3072, output_channels=256, window_size=14),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31],
                  mlp_dim=5120, output_channels=256, window_size=14),
    "tiny": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, global_attn_indexes=[1, 3],
                 mlp_dim=384, output_channels=64, window_size=8),
}


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


def _lora(model, seed=1):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["qkv"]), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # adapters train in fp32 whatever the core's dtype
    return model


def build_ours(arch, image_size, device, fast=True, ckpt=False, pad_v=None):
    from sam_core import build_sam
    from sam_core.fast_attention import enable_fast_attention

    enc = build_sam(arch, image_size=image_size).image_encoder
    enc = enc.to(device=device, dtype=torch.bfloat16)
    if fast:
        enable_fast_attention(enc, pad_v=pad_v)
    if ckpt:
        enc.set_grad_checkpointing(True)
    return _lora(enc)


def build_anchor(arch, image_size, device, ckpt=False):
    from transformers import SamVisionConfig, SamVisionModel

    model = SamVisionModel(SamVisionConfig(image_size=image_size, **HF_DIMS[arch])).to(device)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return _lora(model), model.config._attn_implementation


def run_phase(name, fn, steps, warmup, device):
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
    return {"name": name, "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "peak_gib": _peak_gib(device)}


def probe_fused_kernels(arch, size, device, pad_v):
    """Which SDPA backends take our fast attention's shapes (fwd + bwd, bf16), one by one, and
    whether a whole fast forward/backward runs with the math fallback switched off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sam_core.fast_attention import fast_sam_attention

    out = {}
    grid = size // 16
    heads, dh = {"vit_b": (12, 64), "vit_h": (16, 80), "tiny": (3, 32)}[arch]
    for label, hw in (("global", (grid, grid)), ("window", (14, 14) if arch != "tiny" else (8, 8))):
        q, k, v = (torch.randn(2, heads, hw[0] * hw[1], dh, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        tables = [torch.randn(2 * n - 1, dh, device=device, dtype=torch.bfloat16) for n in hw]
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    o = fast_sam_attention(q, k, v, tables[0], tables[1], hw, dh ** -0.5, pad_v=pad_v)
                    o.float().sum().backward()
                out[f"{label}/{backend.name}"] = "ok"
            except Exception as e:
                out[f"{label}/{backend.name}"] = f"refused: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__}"
    if device.type == "cuda":
        try:
            model = build_ours(arch, size, device, fast=True, pad_v=pad_v)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                model.forward_features(torch.randn(1, 3, size, size, device=device, dtype=torch.bfloat16)).float().mean().backward()
            out["model_without_math_fallback"] = "ok"
            del model
        except Exception as e:
            out["model_without_math_fallback"] = f"failed: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
    return out


def trainer(model, forward, x, device, autocast):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = forward(model, x)
        loss = out.float().square().mean()
        loss.backward()
        opt.step()

    return step


def inferer(model, forward, x, autocast, device):
    model.eval()

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return forward(model, x)

    return run


def ours_fwd(model, x):
    return model.forward_features(x)


def anchor_fwd(model, x):
    return model(pixel_values=x).last_hidden_state


def guarded(label, fn, device, results):
    try:
        out = fn()
        results.append(out)
        return out
    except torch.OutOfMemoryError as e:  # report and go on
        print(f"  {label}: out of memory ({str(e).splitlines()[0][:120]})")
        results.append({"name": label, "oom": True})
    except Exception as e:  # a failing variant must not hide the others' figures
        print(f"  {label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        results.append({"name": label, "error": f"{type(e).__name__}: {e}"})
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke run of the whole script")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile our encoder's forward")
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing for our vit_b training")
    ap.add_argument("--pad-v", choices=["auto", "on", "off"], default="auto",
                    help="fast attention: zero-pad v to the q/k width (flash kernels need equal widths); "
                         "auto: on for CPU only")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per phase")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-plain", action="store_true", help="skip ours-with-timm-attention")
    ap.add_argument("--no-pad-v-variant", action="store_true",
                    help="on CUDA with --pad-v auto, skip the extra row with v padded (flash attention)")
    ap.add_argument("--no-vit-h", action="store_true", help="skip the vit_h checkpointing line")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run: one thread is steadier on a shared machine
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny:
        arch, big, size, batch, steps, warmup = "tiny", "tiny", 256, args.batch or 2, args.steps or 2, args.warmup or 1
    else:
        arch, big, size, batch, steps, warmup = "vit_b", "vit_h", 1024, args.batch or 4, args.steps or 10, args.warmup or 3
    pad_v = {"auto": None, "on": True, "off": False}[args.pad_v]
    info = machine()
    print(f"device {device} ({info.get('gpu', info['cpu'])}), torch {torch.__version__}, arch {arch} {size}px batch {batch}")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    x32 = torch.randn(batch, 3, size, size, device=device)
    x16 = x32.to(torch.bfloat16)
    results = []
    kernels = probe_fused_kernels(arch, size, device, pad_v)
    print("SDPA backends for the fast path's shapes:",
          ", ".join(f"{k}: {'ok' if v == 'ok' else v.split(':')[0]}" for k, v in kernels.items()))
    _reset_peak(device)

    # ---------------------------------------------------------------- ours, fast attention, bf16 core
    def ours_phases(label, fast, compile_, ckpt, pad=pad_v):
        model = build_ours(arch, size, device, fast=fast, ckpt=ckpt, pad_v=pad)
        fwd = ours_fwd
        if compile_:
            compiled = torch.compile(model.forward_features)
            fwd = lambda m, x: compiled(x)  # noqa: E731
        tr = run_phase(f"{label} train", trainer(model, fwd, x16, device, autocast=False), steps, warmup + (2 if compile_ else 0), device)
        inf = run_phase(f"{label} infer", inferer(model, fwd, x16, False, device), steps, warmup + (2 if compile_ else 0), device)
        del model
        return {"name": label, "train": tr, "infer": inf}

    label = "ours (bf16 core, fast attention" + (", compile" if args.compile else "") + (", ckpt" if args.ckpt else "") + ")"
    guarded(label, lambda: ours_phases(label, True, args.compile, args.ckpt), device, results)
    if device.type == "cuda" and args.pad_v == "auto" and not args.no_pad_v_variant and not args.compile:
        # the same with v zero-padded to the q/k width, which lets flash attention take it
        lv = label[:-1] + ", v padded for flash)"
        guarded(lv, lambda: ours_phases(lv, True, False, args.ckpt, pad=True), device, results)
    if not args.no_plain:
        lp = "ours (bf16 core, timm attention" + (", ckpt" if args.ckpt else "") + ")"
        guarded(lp, lambda: ours_phases(lp, False, False, args.ckpt), device, results)

    # ---------------------------------------------------------------- anchor: transformers under autocast
    def anchor_phases():
        model, impl = build_anchor(arch, size, device)
        tr = run_phase("anchor train", trainer(model, anchor_fwd, x32, device, autocast=True), steps, warmup, device)
        inf = run_phase("anchor infer", inferer(model, anchor_fwd, x32, True, device), steps, warmup, device)
        del model
        return {"name": f"anchor (transformers SamVisionModel, {impl}, bf16 autocast)", "train": tr, "infer": inf}

    guarded("anchor", anchor_phases, device, results)

    # ---------------------------------------------------------------- vit_h, batch 4, training with checkpointing
    big_rows = []
    if not args.no_vit_h:
        h_steps, h_warm = max(2, steps // 3), 1

        def ours_h():
            model = build_ours(big, size, device, fast=True, ckpt=True, pad_v=pad_v)
            r = run_phase(f"ours {big} train ckpt", trainer(model, ours_fwd, x16, device, autocast=False), h_steps, h_warm, device)
            del model
            return r

        def anchor_h():
            model, _ = build_anchor(big, size, device, ckpt=True)
            r = run_phase(f"anchor {big} train ckpt", trainer(model, anchor_fwd, x32, device, autocast=True), h_steps, h_warm, device)
            del model
            return r

        guarded(f"ours {big} train ckpt", ours_h, device, big_rows)
        guarded(f"anchor {big} train ckpt", anchor_h, device, big_rows)

    total_s = time.perf_counter() - t_start
    res = {"machine": info, "args": vars(args), "device": str(device), "arch": arch, "big_arch": big, "sdpa_backends": kernels,
           "image_size": size, "batch": batch, "results": results, "big": big_rows, "total_s": total_s}

    # ---------------------------------------------------------------- the table, last
    def gib(v):
        return "-" if v is None else f"{v:.2f} GiB"

    rows = [["config", "train imgs/s", "train peak", "infer imgs/s", "infer peak"]]
    by = {}
    for r in results:
        if "train" not in r:
            rows.append([r["name"], "OOM" if r.get("oom") else "error", "", "", ""])
            continue
        t, i = r["train"], r["infer"]
        by[r["name"]] = (batch / t["median_s"], batch / i["median_s"], t["peak_gib"], i["peak_gib"])
        rows.append([r["name"], f"{batch / t['median_s']:.2f}", gib(t["peak_gib"]), f"{batch / i['median_s']:.2f}", gib(i["peak_gib"])])
    for r in big_rows:
        if "median_s" in r:
            rows.append([f"{r['name']} (batch {batch})", f"{batch / r['median_s']:.2f}", gib(r["peak_gib"]), "", ""])
        else:
            rows.append([f"{r['name']} (batch {batch})", "OOM" if r.get("oom") else "error", "", "", ""])
    ours_key = next((k for k in by if "fast attention" in k and "padded" not in k), None)
    anchor_key = next((k for k in by if k.startswith("anchor")), None)
    if ours_key and anchor_key:
        o, a = by[ours_key], by[anchor_key]
        res["ratios"] = {"train_speedup": o[0] / a[0], "infer_speedup": o[1] / a[1],
                         "train_peak_ratio": (o[2] / a[2]) if o[2] and a[2] else None,
                         "infer_peak_ratio": (o[3] / a[3]) if o[3] and a[3] else None}
    write_json(args.json, res)
    print(f"\n{arch} {size}px batch {batch} on {info.get('gpu', device)}; {total_s:.0f} s in all")
    print(table(rows))
    if "ratios" in res:
        r = res["ratios"]
        mem = "" if r["train_peak_ratio"] is None else f", train peak memory x{r['train_peak_ratio']:.2f}, infer peak x{r['infer_peak_ratio']:.2f}"
        print(f"ours vs anchor: training x{r['train_speedup']:.2f} images/s, inference x{r['infer_speedup']:.2f}{mem}")


if __name__ == "__main__":
    main()
