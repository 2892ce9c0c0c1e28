"""Fused attention with SAM's decomposed relative-position bias (Triton; CUDA).

    out = softmax(scale * q k^T + rel_h[i, row(j)] + rel_w[i, col(j)]) v

for a row-major grid of `rows x cols` keys (j = row * cols + col), where rel_h (N x rows, passed
transposed) and rel_w (N x cols) are the per-query terms that timm's `add_decomposed_rel_pos` / SAM's
`add_decomposed_rel_pos` broadcast into an N x N bias. Here the bias is never built: a
FlashAttention-2 style kernel walks the keys one grid row at a time, so each key tile adds
one rel_h column (a vector) and the same rel_w tile (loaded once per query block). Head dim
stays the model's (64 for vit_b), unlike the factorised SDPA route which widens q/k by
rows + cols.

The backward is two kernels: one per query block (dq, and d rel_h / d rel_w as plain sums
of dS over a key row / column: no atomics) and one per key row (dk, dv). Scores, softmax and
accumulators are fp32; inputs and outputs keep the compute dtype.

Exposed as the custom ops `samadapt::relpos_attention` (forward, with its log-sum-exp) and
`samadapt::relpos_attention_backward`, with autograd registered, so `torch.compile` keeps each
call as one opaque kernel in its graph (no graph break). `relpos_attention(q, k, v, rel_h_t,
rel_w, cols, scale)` is the differentiable entry point. `TRITON_INTERPRET=1` runs the kernels
on CPU tensors (PyTorch's CPU path never calls them otherwise; the tests use it).
"""
import os
from typing import Tuple

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs without triton
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "relpos_attention", "triton_route_ok"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_route_ok(q: torch.Tensor, cols: int) -> bool:
    """Whether the fused kernel takes this call.

    Args:
        q: the B x heads x N x d queries.
        cols: keys per grid row.

    Returns:
        True with Triton present, a CUDA tensor (or the interpreter), a float dtype, head dim <= 128
        (SAM's are 64 and 80) and a key row of <= 256 columns.
    """
    if not HAS_TRITON:
        return False
    if not (q.is_cuda or _INTERPRET):
        return False
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 128 and cols <= 256


if HAS_TRITON:
    def _configs(fwd: bool):
        if _INTERPRET:
            return [triton.Config({"BLOCK_M": 16}, num_warps=4, num_stages=1)]
        ms = (64, 128) if fwd else (64, 128)
        return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
                for m in ms for w, s in ((4, 2), (8, 3))]

    @triton.autotune(configs=_configs(True), key=["N", "COLS", "D", "BLOCK_W", "BLOCK_D"])
    @triton.jit
    def _fwd_kernel(
        Q, K, V, RH, RW, O, LSE,  # noqa: E741  (the kernel names its blocks as the FA2 paper does)
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        sob, soh, son, sod,
        H, N, ROWS, COLS, D, scale,
        BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_W)
        offs_d = tl.arange(0, BLOCK_D)
        mm = offs_m < N
        mc = offs_c < COLS
        md = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=mm[:, None] & md[None, :], other=0.0)
        rw = tl.load(RW + (bh * N + offs_m[:, None]) * COLS + offs_c[None, :],
                     mask=mm[:, None] & mc[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        qk_scale = scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for r in range(0, ROWS):
            offs_n = r * COLS + offs_c
            kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                         mask=mc[None, :] & md[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            rh = tl.load(RH + (bh * ROWS + r) * N + offs_m, mask=mm, other=0.0).to(tl.float32) * 1.4426950408889634
            s = s * qk_scale + rh[:, None] + rw
            s = tl.where(mc[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                        mask=mc[:, None] & md[None, :], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                 acc.to(O.dtype.element_ty), mask=mm[:, None] & md[None, :])
        tl.store(LSE + bh * N + offs_m, m_i + tl.math.log2(l_i), mask=mm)

    @triton.autotune(configs=_configs(False), key=["N", "COLS", "D", "BLOCK_W", "BLOCK_D"])
    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, RH, RW, DO, LSE, DELTA, DQ, DRH, DRW,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
        H, N, ROWS, COLS, D, scale,
        BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One query block: dq, d rel_h (row sums of dS per key row), d rel_w (dS summed over key rows)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_W)
        offs_d = tl.arange(0, BLOCK_D)
        mm = offs_m < N
        mc = offs_c < COLS
        md = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=mm[:, None] & md[None, :], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                     mask=mm[:, None] & md[None, :], other=0.0)
        lse = tl.load(LSE + bh * N + offs_m, mask=mm, other=0.0)
        delta = tl.load(DELTA + bh * N + offs_m, mask=mm, other=0.0)
        rw = tl.load(RW + (bh * N + offs_m[:, None]) * COLS + offs_c[None, :],
                     mask=mm[:, None] & mc[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        qk_scale = scale * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        drw = tl.zeros([BLOCK_M, BLOCK_W], tl.float32)
        for r in range(0, ROWS):
            offs_n = r * COLS + offs_c
            kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                         mask=mc[None, :] & md[:, None], other=0.0)
            vt = tl.load(V + b * svb + h * svh + offs_n[None, :] * svn + offs_d[:, None] * svd,
                         mask=mc[None, :] & md[:, None], other=0.0)
            rh = tl.load(RH + (bh * ROWS + r) * N + offs_m, mask=mm, other=0.0).to(tl.float32) * 1.4426950408889634
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
                dp = tl.dot(do, vt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
                dp = tl.dot(do, vt)
            s = s * qk_scale + rh[:, None] + rw
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(mc[None, :] & mm[:, None], p, 0.0)
            ds = p * (dp - delta[:, None])
            if IEEE:
                dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")
            else:
                dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
            drw += ds
            tl.store(DRH + (bh * ROWS + r) * N + offs_m, tl.sum(ds, 1), mask=mm)
        tl.store(DQ + (bh * N + offs_m[:, None]) * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=mm[:, None] & md[None, :])
        tl.store(DRW + (bh * N + offs_m[:, None]) * COLS + offs_c[None, :], drw,
                 mask=mm[:, None] & mc[None, :])

    @triton.autotune(configs=_configs(False), key=["N", "COLS", "D", "BLOCK_W", "BLOCK_D"])
    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, RH, RW, DO, LSE, DELTA, DK, DV,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
        H, N, ROWS, COLS, D, scale,
        BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One key row (COLS keys): dk and dv over every query block."""
        r = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_c = tl.arange(0, BLOCK_W)
        offs_d = tl.arange(0, BLOCK_D)
        mc = offs_c < COLS
        md = offs_d < D
        offs_n = r * COLS + offs_c
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=mc[:, None] & md[None, :], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=mc[:, None] & md[None, :], other=0.0)
        qk_scale = scale * 1.4426950408889634
        dk = tl.zeros([BLOCK_W, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_W, BLOCK_D], tl.float32)
        for m0 in range(0, N, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mm = offs_m < N
            qt = tl.load(Q + b * sqb + h * sqh + offs_m[None, :] * sqn + offs_d[:, None] * sqd,
                         mask=mm[None, :] & md[:, None], other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                         mask=mm[:, None] & md[None, :], other=0.0)
            lse = tl.load(LSE + bh * N + offs_m, mask=mm, other=0.0)
            delta = tl.load(DELTA + bh * N + offs_m, mask=mm, other=0.0)
            rh = tl.load(RH + (bh * ROWS + r) * N + offs_m, mask=mm, other=0.0).to(tl.float32) * 1.4426950408889634
            rwt = tl.load(RW + (bh * N + offs_m[None, :]) * COLS + offs_c[:, None],
                          mask=mm[None, :] & mc[:, None], other=0.0).to(tl.float32) * 1.4426950408889634
            if IEEE:
                st = tl.dot(k, qt, input_precision="ieee")
            else:
                st = tl.dot(k, qt)
            st = st * qk_scale + rh[None, :] + rwt
            pt = tl.math.exp2(st - lse[None, :])
            pt = tl.where(mc[:, None] & mm[None, :], pt, 0.0)
            if IEEE:
                dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
                dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
            else:
                dv += tl.dot(pt.to(do.dtype), do)
                dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - delta[None, :])
            if IEEE:
                dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision="ieee")
            else:
                dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
        tl.store(DK + (bh * N + offs_n[:, None]) * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=mc[:, None] & md[None, :])
        tl.store(DV + (bh * N + offs_n[:, None]) * D + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=mc[:, None] & md[None, :])


def _check(q, k, v, rel_h_t, rel_w, cols):
    B, H, N, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if N % cols:
        raise ValueError(f"{N} keys do not fill rows of {cols} columns")
    rows = N // cols
    if tuple(rel_h_t.shape) != (B, H, rows, N) or tuple(rel_w.shape) != (B, H, N, cols):
        raise ValueError(f"rel_h_t / rel_w must be {(B, H, rows, N)} / {(B, H, N, cols)}; got "
                         f"{tuple(rel_h_t.shape)} / {tuple(rel_w.shape)}")
    return B, H, N, D, rows


if HAS_TRITON:

    @torch.library.custom_op("samadapt::relpos_attention", mutates_args=())
    def _relpos_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h_t: torch.Tensor, rel_w: torch.Tensor,
                       cols: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        B, H, N, D, rows = _check(q, k, v, rel_h_t, rel_w, cols)
        rel_h_t, rel_w = rel_h_t.contiguous(), rel_w.contiguous()
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        bw, bd = max(16, _next_pow2(cols)), max(16, _next_pow2(D))
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
        _fwd_kernel[grid](q, k, v, rel_h_t, rel_w, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                          H, N, rows, cols, D, float(scale), BLOCK_W=bw, BLOCK_D=bd, IEEE=q.dtype == torch.float32)
        return o, lse

    @_relpos_fwd_op.register_fake
    def _(q, k, v, rel_h_t, rel_w, cols, scale):
        B, H, N, _ = q.shape
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, N, dtype=torch.float32)

    @torch.library.custom_op("samadapt::relpos_attention_backward", mutates_args=())
    def _relpos_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h_t: torch.Tensor,
                       rel_w: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, cols: int, scale: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, N, D, rows = _check(q, k, v, rel_h_t, rel_w, cols)
        rel_h_t, rel_w = rel_h_t.contiguous(), rel_w.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()
        dq = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(dq)
        drh = torch.empty(B, H, rows, N, device=q.device, dtype=torch.float32)
        drw = torch.empty(B, H, N, cols, device=q.device, dtype=torch.float32)
        bw, bd = max(16, _next_pow2(cols)), max(16, _next_pow2(D))
        ieee = q.dtype == torch.float32
        args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), H, N, rows, cols, D, float(scale))
        _bwd_dq_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
            q, k, v, rel_h_t, rel_w, do, lse, delta, dq, drh, drw, *args, BLOCK_W=bw, BLOCK_D=bd, IEEE=ieee)
        _bwd_dkdv_kernel[(rows, B * H)](
            q, k, v, rel_h_t, rel_w, do, lse, delta, dk, dv, *args, BLOCK_W=bw, BLOCK_D=bd, IEEE=ieee)
        return dq, dk, dv, drh.to(rel_h_t.dtype), drw.to(rel_w.dtype)

    @_relpos_bwd_op.register_fake
    def _(do, q, k, v, rel_h_t, rel_w, o, lse, cols, scale):
        B, H, N, D = q.shape
        e = q.new_empty(B, H, N, D)
        return (
            e,
            torch.empty_like(e),
            torch.empty_like(e),
            torch.empty_like(rel_h_t, memory_format=torch.contiguous_format),
            torch.empty_like(rel_w, memory_format=torch.contiguous_format),
        )

    def _setup_context(ctx, inputs, output):
        q, k, v, rel_h_t, rel_w, cols, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, rel_h_t, rel_w, o, lse)
        ctx.cols, ctx.scale = cols, scale

    def _backward(ctx, do, dlse):
        q, k, v, rel_h_t, rel_w, o, lse = ctx.saved_tensors
        dq, dk, dv, drh, drw = _relpos_bwd_op(do, q, k, v, rel_h_t, rel_w, o, lse, ctx.cols, ctx.scale)
        return dq, dk, dv, drh, drw, None, None

    _relpos_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def relpos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h_t: torch.Tensor, rel_w: torch.Tensor,
                     cols: int, scale: float) -> torch.Tensor:
    """softmax(scale q k^T + rel_h[:, :, :, row(j)] + rel_w[:, :, :, col(j)]) v, fused (differentiable).

    Args:
        q: B x heads x N x d queries (any strides), N = rows * cols keys in row-major grid order.
        k: keys, as `q`.
        v: values, as `q`.
        rel_h_t: B x heads x rows x N, the row term transposed (query index last: the kernels
            read one key row's terms for a query block as one contiguous run).
        rel_w: B x heads x N x cols (the column term).
        cols: keys per grid row.
        scale: the q . k scale.

    Returns:
        B x heads x N x d in q's dtype.

    Raises:
        RuntimeError: triton is not installed.
        ValueError: the shapes do not fit one grid (see the checks of the forward op).
    """
    if not HAS_TRITON:
        raise RuntimeError("relpos_attention needs triton (pip install triton) and a CUDA device")
    return _relpos_fwd_op(q, k, v, rel_h_t, rel_w, int(cols), float(scale))[0]
