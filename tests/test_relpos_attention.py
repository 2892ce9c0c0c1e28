"""sam_core.fast.relpos_triton (the fused Triton kernel) computes SAM's attention with the
decomposed relative-position bias: outputs and all five gradients against an fp64
materialised reference, the whole encoder through `kernel="triton"` against timm's own path,
and `torch.compile` keeping the kernel in its graph (no graph break).

The kernels run here through Triton's interpreter (TRITON_INTERPRET=1, in a child process so
nothing else in the session sees it) on CPU tensors in fp32 and fp16 (the interpreter's bf16
matrix product is broken, so bf16 is checked on the GPU: benchmarks/gpu_train_infer.py, whose
H100 runs are in benchmarks/RESULTS.md). No timing here.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent(r"""
    import copy, json, sys
    import torch
    from samadapt.sam_core.fast.relpos_triton import relpos_attention, triton_route_ok
    from samadapt.sam_core import build_sam
    from samadapt.sam_core.fast import enable_fast_attention

    torch.manual_seed(0)
    out = {"kernel": [], "fp16": None}

    def reference(q, k, v, rh_t, rw, scale):
        B, H, N, _ = q.shape
        s = q @ k.transpose(-1, -2) * scale + (rh_t.transpose(-1, -2)[..., :, None] + rw[..., None, :]).reshape(B, H, N, N)
        return s.softmax(-1) @ v

    # (batch, heads, rows, cols, head dim): a padded key row (5 of 16), rows of a partial query
    # block, a head dim that is not a power of two, a full 16-wide row
    for B, H, rows, cols, D in [(1, 2, 4, 5, 16), (2, 1, 3, 8, 20), (1, 1, 2, 16, 32)]:
        N = rows * cols
        q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
        rh_t = torch.randn(B, H, rows, N, dtype=torch.float64)
        rw = torch.randn(B, H, N, cols, dtype=torch.float64)
        go = torch.randn(B, H, N, D, dtype=torch.float64)
        ts = [t.clone().requires_grad_(True) for t in (q, k, v, rh_t, rw)]
        ref = reference(*ts, D ** -0.5)
        gref = torch.autograd.grad(ref, ts, go)
        # q, k, v as the model hands them over: strided views of one qkv tensor
        qkv = torch.stack([q, k, v]).float().permute(1, 2, 3, 0, 4).contiguous().permute(3, 0, 1, 2, 4)
        tf = [qkv[0], qkv[1], qkv[2], rh_t.float(), rw.float()]
        tf = [t.detach().requires_grad_(True) if i > 2 else t.detach().requires_grad_(True) for i, t in enumerate(tf)]
        assert not tf[0].is_contiguous()
        o = relpos_attention(*tf, cols, D ** -0.5)
        g = torch.autograd.grad(o, tf, go.float())
        out["kernel"].append({"shape": [B, H, rows, cols, D], "route_ok": triton_route_ok(tf[0], cols),
                              "out": (o.double() - ref).abs().max().item(),
                              "grads": [(a.double() - b).abs().max().item() for a, b in zip(g, gref)]})

    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    rh_t, rw = torch.randn(1, 2, 3, 24), torch.randn(1, 2, 24, 8)
    ref = reference(q, k, v, rh_t, rw, 0.25)
    o16 = relpos_attention(q.half(), k.half(), v.half(), rh_t.half(), rw.half(), 8, 0.25)
    out["fp16"] = {"dtype": str(o16.dtype), "rel": ((o16.float() - ref).norm() / ref.norm()).item()}

    errors = []
    for bad in [lambda: relpos_attention(q, k, v, rh_t, rw, 7, 0.25),
                lambda: relpos_attention(q, k, v, rh_t.transpose(-1, -2), rw, 8, 0.25),
                lambda: relpos_attention(q, k[..., :8], v, rh_t, rw, 8, 0.25)]:
        try:
            bad()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors

    # the whole tiny encoder at 96 px (a 6 x 6 grid: one 8 x 8 window, padded; 6 x 6 global blocks)
    sam = build_sam("tiny", image_size=96)
    enc = sam.image_encoder
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.5)
    x = torch.randn(1, 3, 96, 96)
    ref = copy.deepcopy(enc).double()
    xr = x.double().requires_grad_(True)
    r = ref.forward_features(xr)
    r.square().mean().backward()
    fast = copy.deepcopy(enc)
    enable_fast_attention(fast, kernel="triton")
    xi = x.clone().requires_grad_(True)
    o = fast.forward_features(xi)
    o.square().mean().backward()
    out["encoder"] = {"out": (o.double() - r).abs().max().item(), "x_grad": (xi.grad.double() - xr.grad).abs().max().item(),
                      "qkv_grad": max((a.attn.qkv.weight.grad.double() - b.attn.qkv.weight.grad).abs().max().item()
                                      for a, b in zip(fast.blocks, ref.blocks)),
                      "rel_pos_grad": max((a.attn.rel_pos_h.grad.double() - b.attn.rel_pos_h.grad).abs().max().item()
                                          for a, b in zip(fast.blocks, ref.blocks))}

    # torch.compile: the custom op stays in the graph (fullgraph=True refuses any graph break)
    comp = copy.deepcopy(enc)
    enable_fast_attention(comp, kernel="triton")
    fn = torch.compile(comp.forward_features, fullgraph=True)
    xc = x.clone().requires_grad_(True)
    oc = fn(xc)
    oc.square().mean().backward()
    out["compiled"] = {"out": (oc.double() - r).abs().max().item(), "x_grad": (xc.grad.double() - xr.grad).abs().max().item()}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_kernel_matches_fp64_reference_with_all_gradients(interpreted):
    assert len(interpreted["kernel"]) == 3
    for case in interpreted["kernel"]:
        assert case["route_ok"], case
        assert case["out"] <= 1e-5, case
        assert len(case["grads"]) == 5 and max(case["grads"]) <= 1e-5, case  # q, k, v, rel_h, rel_w


def test_kernel_fp16(interpreted):
    assert interpreted["fp16"]["dtype"] == "torch.float16" and interpreted["fp16"]["rel"] <= 2e-3


def test_kernel_refuses_bad_shapes(interpreted):
    e = interpreted["errors"]
    assert e[0] and "do not fill rows of 7 columns" in e[0]
    assert e[1] and "rel_h_t / rel_w must be" in e[1]
    assert e[2] and "q, k, v must share one shape" in e[2]


def test_encoder_through_the_kernel_equals_timm(interpreted):
    enc = interpreted["encoder"]
    assert enc["out"] <= 1e-5 and enc["x_grad"] <= 1e-6 and enc["qkv_grad"] <= 1e-4 and enc["rel_pos_grad"] <= 1e-4, (
        enc
    )


def test_compile_keeps_the_kernel_in_one_graph(interpreted):
    c = interpreted["compiled"]  # compiled with fullgraph=True: a graph break would have raised
    assert c["out"] <= 1e-5 and c["x_grad"] <= 1e-6, c


def test_triton_route_off_cuda_takes_sdpa():
    """Without a GPU (and without the interpreter) kernel='triton' computes through the SDPA route."""
    import copy

    from samadapt.sam_core import build_sam
    from samadapt.sam_core.fast import enable_fast_attention
    from samadapt.sam_core.fast.relpos_triton import triton_route_ok

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    torch.manual_seed(1)
    enc = build_sam("tiny", image_size=160).image_encoder
    assert not triton_route_ok(torch.zeros(1, 1, 4, 16), 2)
    fast = copy.deepcopy(enc)
    assert enable_fast_attention(fast, kernel="triton") == 4
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert (fast.forward_features(x) - enc.forward_features(x)).abs().max().item() <= 1e-5
