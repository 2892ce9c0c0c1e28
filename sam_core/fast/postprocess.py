"""SAM's mask post-processing as two cached matrix products (same function, less time).

`Sam.postprocess_masks` (bilinear 4x upsample to image_size, crop, bilinear resize to the
original size) is separable and linear, so per axis the two 1-D maps compose into one matrix:
`A_h @ low_res @ A_w^T`. The matrices are cached and applied block-banded (the zero blocks of each
matrix are skipped), which computes the same product.
"""
from typing import Dict, Sequence, Tuple

import torch

from .attention import _memo

__all__ = ["interp_matrix", "composed_postprocess_matrices", "postprocess_masks_fast"]


def interp_matrix(n_in: int, n_out: int, index_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 1-D map of `F.interpolate(mode="bilinear", align_corners=False)` along one axis.

    No antialias; PyTorch's source-index rule is evaluated as its kernels do for data of
    `index_dtype` (float32 for float32/bf16/fp16 data: a float32 scale and one fused multiply-add),
    so the weights are bit-identical to the ones `F.interpolate` uses.

    Args:
        n_in: the input length.
        n_out: the output length.
        index_dtype: the data dtype whose source-index arithmetic to reproduce.

    Returns:
        (n_out, n_in) float64 matrix `A` with `interpolate(x) == A @ x` along that axis.

    Example:
        >>> from samadapt.sam_core.fast import interp_matrix
        >>> interp_matrix(2, 4)
        tensor([[1.0000, 0.0000],
                [0.7500, 0.2500],
                [0.2500, 0.7500],
                [0.0000, 1.0000]], dtype=torch.float64)
    """
    if index_dtype == torch.float64:
        scale = torch.tensor(n_in / n_out, dtype=torch.float64)
        src = scale * (torch.arange(n_out, dtype=torch.float64) + 0.5) - 0.5
    else:
        scale = (torch.tensor(float(n_in), dtype=torch.float32) / float(n_out)).double()
        src = (scale * (torch.arange(n_out, dtype=torch.float64) + 0.5) - 0.5).float()  # fma, one rounding
    src = src.clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    l1 = (src - i0.to(src.dtype)).clamp(0.0, 1.0)
    l0 = 1.0 - l1
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    a.index_put_((rows, i0), l0.double(), accumulate=True)
    a.index_put_((rows, i1), l1.double(), accumulate=True)
    return a


def _composed_axis(n_low: int, image_size: int, n_input: int, n_orig: int, index_dtype: torch.dtype) -> torch.Tensor:
    """(n_orig, n_low) float64: upsample n_low -> image_size, keep the first n_input, resize to n_orig."""
    if not 0 < n_input <= image_size:
        raise ValueError(f"input size {n_input} must lie in 1..image_size={image_size}")
    up = interp_matrix(n_low, image_size, index_dtype)[:n_input]
    return interp_matrix(n_input, n_orig, index_dtype) @ up


class _BandedMap:
    """A (n_out, n_in) matrix stored as row blocks of `block` rows, each with the narrow column
    window holding its non-zeros; applying it equals the dense product. Dense when the band is wide.
    """

    def __init__(self, a: torch.Tensor, device: torch.device, dtype: torch.dtype, block: int = 32) -> None:
        n_out, n_in = a.shape
        self.n_out, self.n_in = n_out, n_in
        self.dense = a.to(device=device, dtype=dtype).contiguous()
        nz = a != 0
        any_nz = nz.any(dim=1)
        first = torch.where(any_nz, nz.float().argmax(dim=1), torch.zeros_like(any_nz, dtype=torch.long))
        last = torch.where(any_nz, n_in - 1 - nz.flip(1).float().argmax(dim=1), torch.zeros_like(first))
        nblocks = -(-n_out // block)
        starts, width = [], 1
        for b in range(nblocks):
            r0, r1 = b * block, min(n_out, (b + 1) * block)
            lo, hi = int(first[r0:r1].min()), int(last[r0:r1].max()) + 1
            starts.append(lo)
            width = max(width, hi - lo)
        self.banded = width * 2 <= n_in and nblocks > 1
        if not self.banded:
            return
        starts = [min(s, n_in - width) for s in starts]
        padded = torch.zeros(nblocks * block, n_in, dtype=a.dtype)
        padded[:n_out] = a
        cols = torch.tensor(starts)[:, None] + torch.arange(width)[None, :]  # (nblocks, width)
        blocks = torch.gather(padded.view(nblocks, block, n_in), 2, cols[:, None, :].expand(nblocks, block, width))
        self.nblocks, self.block, self.width = nblocks, block, width
        self.blocks = blocks.to(device=device, dtype=dtype).contiguous()  # (nblocks, block, width)
        self.blocks_t = self.blocks.transpose(1, 2).contiguous()  # (nblocks, width, block)
        self.cols = cols.reshape(-1).to(device)

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """A @ x over the second-last axis: (..., n_in, m) -> (..., n_out, m)."""
        if not self.banded:
            return torch.matmul(self.dense, x)
        lead, m = x.shape[:-2], x.shape[-1]
        xb = x.index_select(-2, self.cols).reshape(*lead, self.nblocks, self.width, m)
        y = torch.matmul(self.blocks, xb)  # (..., nblocks, block, m)
        return y.reshape(*lead, self.nblocks * self.block, m)[..., : self.n_out, :]

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """X @ A^T over the last axis: (..., m, n_in) -> (..., m, n_out)."""
        if not self.banded:
            return torch.matmul(x, self.dense.t())
        lead, m = x.shape[:-2], x.shape[-2]
        xb = x.index_select(-1, self.cols).reshape(*lead, m, self.nblocks, self.width).transpose(-3, -2)
        y = torch.matmul(xb, self.blocks_t)  # (..., nblocks, m, block)
        y = y.transpose(-3, -2).reshape(*lead, m, self.nblocks * self.block)
        return y[..., : self.n_out]


_POST_CACHE: Dict[Tuple, Tuple[_BandedMap, _BandedMap]] = {}
_POST_CACHE_MAX = 64


def _as_hw(size: Sequence[int], what: str) -> Tuple[int, int]:
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{what} must be (h, w) of positive ints, got {size}")
    return size


def composed_postprocess_matrices(
    low_hw: Tuple[int, int],
    image_size: int,
    input_size: Sequence[int],
    original_size: Sequence[int],
    index_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two per-axis matrices of `Sam.postprocess_masks`.

    Args:
        low_hw: (h, w) of the low-resolution masks.
        image_size: the padded square encoder input side (`sam.image_size`).
        input_size: (h, w) of the resized image inside the padded input.
        original_size: (h, w) to return.
        index_dtype: the data dtype whose source-index arithmetic to reproduce (see `interp_matrix`).

    Returns:
        (A_h, A_w) in float64 with `postprocess_masks(x) == A_h @ x @ A_w^T` for x of spatial size low_hw.

    Raises:
        ValueError: a size is not (h, w) of positive ints, or the input size exceeds `image_size`.

    Example:
        >>> from samadapt.sam_core.fast import composed_postprocess_matrices
        >>> a_h, a_w = composed_postprocess_matrices((64, 64), 256, (192, 256), (300, 400))
        >>> tuple(a_h.shape), tuple(a_w.shape)
        ((300, 64), (400, 64))
    """
    ih, iw = _as_hw(input_size, "input_size")
    oh, ow = _as_hw(original_size, "original_size")
    return (
        _composed_axis(int(low_hw[0]), int(image_size), ih, oh, index_dtype),
        _composed_axis(int(low_hw[1]), int(image_size), iw, ow, index_dtype),
    )


def _post_maps(low_hw, image_size, input_size, original_size, device, dtype) -> Tuple[_BandedMap, _BandedMap]:
    def build():
        index_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        a_h, a_w = composed_postprocess_matrices(low_hw, image_size, input_size, original_size, index_dtype)
        return _BandedMap(a_h, device, dtype), _BandedMap(a_w, device, dtype)

    key = (tuple(low_hw), int(image_size), tuple(input_size), tuple(original_size), str(device), dtype)
    return _memo(_POST_CACHE, key, build, _POST_CACHE_MAX)


def postprocess_masks_fast(
    low_res: torch.Tensor,
    image_size: int,
    input_size: Sequence[int],
    original_size: Sequence[int],
) -> torch.Tensor:
    """The same function as `Sam.postprocess_masks`, as `A_h @ low_res @ A_w^T`.

    Args:
        low_res: (..., h, w) low-resolution mask logits (B x C x 4h' x 4w' from the decoder);
            float dtypes are kept, others computed in float32.
        image_size: the padded square encoder input side (`sam.image_size`).
        input_size: (h, w) of the resized image inside the padded input.
        original_size: (h, w) to return.

    Returns:
        (..., original_h, original_w) logits.

    Raises:
        ValueError: `low_res` has fewer than two dims, or a size is invalid.

    Example:
        >>> import torch
        >>> from samadapt.sam_core.fast import postprocess_masks_fast
        >>> postprocess_masks_fast(torch.zeros(1, 3, 64, 64), 256, (192, 256), (300, 400)).shape
        torch.Size([1, 3, 300, 400])
    """
    if low_res.ndim < 2:
        raise ValueError(f"low_res must be (..., h, w), got shape {tuple(low_res.shape)}")
    x = low_res if low_res.is_floating_point() else low_res.float()
    a_h, a_w = _post_maps(
        tuple(x.shape[-2:]), image_size, tuple(int(s) for s in input_size),
        tuple(int(s) for s in original_size), x.device, x.dtype,
    )
    # (A_h @ (x @ A_w^T)): the last pass writes the large output in place, with no transposed copy
    return a_h.left(a_w.right(x.contiguous()))


