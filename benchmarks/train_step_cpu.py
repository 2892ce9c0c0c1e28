"""One LoRA training step of the vit_b image encoder on CPU: samadapt (timm core) vs transformers.

vit_b dimensions at 256 x 256, batch 2, LoRA r=4 on every `qkv` (peft `inject_adapter_in_model`,
the rest frozen), loss = mean of the neck output squared, one AdamW step over the LoRA
parameters. Both encoders hold the same weights (transformers' random init plus noise, copied into
ours through sam_core's checkpoint converter; the outputs are compared before timing).

  anchor     : transformers SamVisionModel (its default attention implementation, "sdpa")
  ours       : sam_core's timm VisionTransformerSAM, timm's attention path
  ours_fast  : the same with sam_core.fast.enable_fast_attention
  ours_compiled (with --compile): ours under torch.compile

Timing: the same process, blocks interleaved (see _common.time_blocks); medians of wall and
process-CPU time per step; images/s = batch / median wall time.

    python benchmarks/train_step_cpu.py [--threads 1] [--rounds 3 --block 2] [--json out.json]
"""
import argparse
import copy
import time
import warnings

import torch
from _common import machine, summary, table, time_blocks, write_json


def build(image_size: int, seed: int):
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import SamVisionConfig, SamVisionModel

    from samadapt.sam_core import build_sam
    from samadapt.sam_core.checkpoint import hf_to_samadapt

    torch.manual_seed(seed)
    cfg = SamVisionConfig(
        image_size=image_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        global_attn_indexes=[2, 5, 8, 11], window_size=14, output_channels=256, mlp_dim=3072,
    )
    hf = SamVisionModel(cfg)
    with torch.no_grad():  # the init leaves the position tables at zero: give every weight a value
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = build_sam("vit_b", image_size=image_size).image_encoder
    sd = {k[len("image_encoder."):]: v for k, v in hf_to_samadapt(hf.state_dict()).items()}
    ours.load_state_dict(sd, strict=True)

    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        same = (ours.eval().forward_features(x) - hf.eval()(pixel_values=x).last_hidden_state).abs().max().item()

    def lora(m):
        torch.manual_seed(seed + 1)  # the same LoRA init on both
        return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["qkv"]), m).train()

    return lora(hf), lora(ours), same, hf.config._attn_implementation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a shared box)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--compile", action="store_true", help="also time ours under torch.compile (slow to build)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from samadapt.sam_core.fast import enable_fast_attention

    t0 = time.perf_counter()
    hf, ours, same, attn_impl = build(args.image_size, args.seed)
    print(
        f"built in {time.perf_counter() - t0:.1f} s; transformers attention: {attn_impl}; "
        f"max |ours - transformers| on the neck output before LoRA: {same:.2e}; "
        f"torch threads {torch.get_num_threads()}"
    )
    fast = copy.deepcopy(ours)
    enable_fast_attention(fast)
    n_train = {
        k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in (("anchor", hf), ("ours", ours))
    }
    assert n_train["anchor"] == n_train["ours"] == 12 * 4 * (768 + 3 * 768), n_train

    torch.manual_seed(args.seed + 2)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)

    def stepper(model, fwd):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            loss = fwd(model, x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())

        step.losses = losses
        return step

    fns = {
        "anchor": stepper(hf, lambda m, x: m(pixel_values=x).last_hidden_state),
        "ours": stepper(ours, lambda m, x: m.forward_features(x)),
        "ours_fast": stepper(fast, lambda m, x: m.forward_features(x)),
    }
    compile_s = None
    if args.compile:
        comp = copy.deepcopy(ours)
        cf = torch.compile(comp.forward_features)
        fns["ours_compiled"] = stepper(comp, lambda m, x: cf(x))
        t0 = time.perf_counter()
        fns["ours_compiled"]()
        compile_s = time.perf_counter() - t0
        print(f"torch.compile + first step: {compile_s:.1f} s")

    raw = time_blocks(fns, args.rounds, args.block)
    stats = {k: {"wall": summary(v["wall_s"]), "cpu": summary(v["cpu_s"])} for k, v in raw.items()}
    first_losses = {k: fn.losses[0] for k, fn in fns.items()}
    res = {"machine": machine(), "args": vars(args), "transformers_attention": attn_impl,
           "max_abs_diff_before_lora": same, "first_step_loss": first_losses, "compile_s": compile_s,
           "stats": stats, "samples": raw}
    a = stats["anchor"]
    rows = [["variant", "step wall (median)", "imgs/s", "ratio time vs anchor (wall)", "ratio (cpu)"]]
    for k, st in stats.items():
        r_wall = st["wall"]["median"] / a["wall"]["median"]
        r_cpu = st["cpu"]["median"] / a["cpu"]["median"]
        res.setdefault("ratios", {})[k] = {"time_wall": r_wall, "time_cpu": r_cpu,
                                           "imgs_per_s": args.batch / st["wall"]["median"]}
        rows.append([k, f"{st['wall']['median']:.3f} s", f"{args.batch / st['wall']['median']:.3f}",
                     f"{r_wall:.3f}", f"{r_cpu:.3f}"])
    print("first-step losses:", {k: f"{v:.6f}" for k, v in first_losses.items()})
    print(table(rows))
    print("(ratio < 1: faster than the anchor)")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
