"""Prompt -> mask latency on one CPU thread: samadapt's SamPredictor vs Meta's segment_anything.

vit_b dimensions with random weights (the anchor's; ours loads the same state dict). Only the
prompt encoder, the mask decoder and the post-processing are timed: the image embedding is a
cached random 1 x 256 x 64 x 64 tensor, as after `set_image`. One foreground point, masks
returned as booleans at the original size 768 x 1024, single-mask and multimask.

  anchor : segment_anything.SamPredictor.predict_torch (PromptEncoder + MaskDecoder +
           Sam.postprocess_masks + threshold), exactly as a predictor calls them.
  ours   : sam_core.SamPredictor.predict_torch as it runs by default: fast.fast_decode
           (the same function, evaluated in a cheaper order, with the predictor's per-image
           DecoderImageCache) + postprocess_masks_fast + threshold.
  also   : ours_plain (SamPredictor(fast=False): Sam.decode + Sam.postprocess_masks) and
           ours_nocache (fast_decode without the per-image cache), to show where the time goes.

Timing: the same process, blocks interleaved (see _common.time_blocks), medians of wall and
process-CPU time. Mask agreement and logit differences are checked on the same inputs.

    python benchmarks/prompt_to_mask_cpu.py [--rounds 8 --block 5] [--json out.json]
"""
import argparse
import time

import torch
from _common import fmt_ms, machine, summary, table, time_blocks, write_json


def build(seed: int):
    from segment_anything import SamPredictor as MetaPredictor
    from segment_anything import sam_model_registry

    from samadapt.sam_core import load_sam
    from samadapt.sam_core.fast import prepare_image_embedding

    torch.manual_seed(seed)
    ref = sam_model_registry["vit_b"]().eval()
    ours = load_sam(ref.state_dict())
    assert ours.arch == "vit_b"
    emb = torch.randn(1, 256, 64, 64)
    return ref, ours, emb, MetaPredictor, prepare_image_embedding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    ap.add_argument("--block", type=int, default=5, help="timed calls per function per round (default 5)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--original-size", type=int, nargs=2, default=(768, 1024), metavar=("H", "W"))
    ap.add_argument("--point", type=float, nargs=2, default=(610.0, 300.0), metavar=("X", "Y"),
                    help="the click, in original-image pixels")
    ap.add_argument("--no-extra", action="store_true", help="time only anchor and ours")
    ap.add_argument("--json", default="", help="write full figures here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)

    from samadapt.sam_core import ResizeLongestSide, SamPredictor
    from samadapt.sam_core.fast import fast_decode, postprocess_masks_fast

    t0 = time.perf_counter()
    ref, ours, emb, MetaPredictor, prepare_image_embedding = build(args.seed)
    print(f"built vit_b anchor + ours in {time.perf_counter() - t0:.1f} s; torch threads = {torch.get_num_threads()}")

    original = tuple(args.original_size)
    transform = ResizeLongestSide(1024)
    input_size = transform.get_preprocess_shape(original[0], original[1], 1024)
    coords = torch.as_tensor(transform.apply_coords([list(args.point)], original), dtype=torch.float)[None]
    labels = torch.ones(1, 1, dtype=torch.int)

    # anchor: Meta's predictor with the embedding already set
    meta = MetaPredictor(ref)
    meta.features, meta.is_image_set = emb.clone(), True
    meta.original_size, meta.input_size = original, input_size

    def with_embedding(pred, e):  # the predictor state set_image leaves, with this embedding
        pred.set_embedding(e, input_size, original)
        return pred

    plain = with_embedding(SamPredictor(ours, fast=False), emb.clone())
    fast = with_embedding(SamPredictor(ours), torch.randn_like(emb))
    fast.predict_torch(coords, labels, multimask_output=False)  # warm-up on a throwaway image
    with_embedding(fast, emb.clone())
    t0 = time.perf_counter()
    fast.predict_torch(coords, labels, multimask_output=False)
    first_call_s = time.perf_counter() - t0
    emb_cl = prepare_image_embedding(emb.clone())

    def anchor(mm: bool, logits: bool = False):
        return meta.predict_torch(coords, labels, multimask_output=mm, return_logits=logits)[0]

    def ours_plain(mm: bool):
        return plain.predict_torch(coords, labels, multimask_output=mm)[0]

    def ours_fast(mm: bool, logits: bool = False):
        return fast.predict_torch(coords, labels, multimask_output=mm, return_logits=logits)[0]

    def ours_nocache(mm: bool):
        with torch.no_grad():
            low, _ = fast_decode(ours, emb_cl, coords, labels, multimask_output=mm)
            return postprocess_masks_fast(low, 1024, input_size, original) > 0.0

    results = {"machine": machine(), "args": vars(args), "input_size": input_size,
               "first_decode_on_new_image_s": first_call_s, "modes": {}}
    rows = [["mode", "anchor (wall)", "ours (wall)", "ratio wall", "ratio cpu", "mask agreement", "max |dlogit|"]]
    for mm in (False, True):
        name = "multimask" if mm else "single-mask"
        # the same masks?
        a_logits, o_logits = anchor(mm, logits=True), ours_fast(mm, logits=True)
        a_masks, o_masks = anchor(mm), ours_fast(mm)
        agree = (a_masks == o_masks).float().mean().item()
        dlogit = (a_logits - o_logits).abs().max().item()
        fns = {"anchor": lambda: anchor(mm), "ours": lambda: ours_fast(mm)}
        if not args.no_extra:
            fns["ours_nocache"] = lambda: ours_nocache(mm)
            fns["ours_plain"] = lambda: ours_plain(mm)
        raw = time_blocks(fns, args.rounds, args.block)
        stats = {k: {"wall": summary(v["wall_s"]), "cpu": summary(v["cpu_s"])} for k, v in raw.items()}
        ratio_wall = stats["ours"]["wall"]["median"] / stats["anchor"]["wall"]["median"]
        ratio_cpu = stats["ours"]["cpu"]["median"] / stats["anchor"]["cpu"]["median"]
        results["modes"][name] = {
            "mask_shape": list(a_masks.shape), "mask_agreement": agree, "max_abs_logit_diff": dlogit,
            "stats": stats, "ratio_wall_median": ratio_wall, "ratio_cpu_median": ratio_cpu,
            "samples": raw,
        }
        print(f"\n[{name}] masks {tuple(a_masks.shape)}: agreement {agree * 100:.4f} %, max |logit diff| {dlogit:.2e}")
        for k, st in stats.items():
            print(f"  {k:13s} wall median {fmt_ms(st['wall']['median'])} (min {fmt_ms(st['wall']['min'])})"
                  f"   cpu median {fmt_ms(st['cpu']['median'])}")
        print(f"  ratio ours/anchor: wall {ratio_wall:.3f}   cpu {ratio_cpu:.3f}")
        rows.append(
            [
                name,
                fmt_ms(stats["anchor"]["wall"]["median"]).strip(),
                fmt_ms(stats["ours"]["wall"]["median"]).strip(),
                f"{ratio_wall:.3f}",
                f"{ratio_cpu:.3f}",
                f"{agree * 100:.4f} %",
                f"{dlogit:.1e}",
            ]
        )
    print(f"\nours, first prompt on a new image (channels-last copy + DecoderImageCache fill, single-mask): "
          f"{first_call_s * 1e3:.1f} ms, once per image")
    print(table(rows))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
