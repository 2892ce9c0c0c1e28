"""One encoder pass for a batch whose items name different adapters.

The frozen layers run over the whole batch; each adapter's modules apply only to the rows of its
own items. A layer learns which rows are whose from the model's row route (`RowRoute`), set for
one forward by `route(sam, owners)`: while it is set no adapter is active, so every layer computes
the plain core, and each kind's hooks add their adapter's part to that adapter's rows only.

Rows, not items: SAM's windowed blocks see batch x windows rows (timm's `window_partition` lays
out each image's windows one after another), so a tensor whose leading size is k times the batch
gives item b the rows b*k .. b*k+k-1. peft's own mixed batches (`adapter_names=`) index the batch
and fail there; this routing is ours for that reason.

Items with no adapter (None) take the plain core. The decoder is not routed: decoding runs per
item after its adapter is activated (`AdapterBank.predict_batch`), so decoder copies and decoder
LoRA apply as in a one-by-one run.
"""
import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from .base import AdapterError, activate, active, state_of

Rows = Union[slice, torch.Tensor]


class RowRoute:
    """Which items of an encoder batch belong to which adapter.

    Args:
        owners: one adapter name (or None: the plain core) per batch item, in batch order.

    Example:
        >>> r = RowRoute(["a", "a", None, "b"])
        >>> r.rows("a", 4), r.rows("a", 8), r.rows("b", 8), r.rows("c", 4) is None
        (slice(0, 2, None), slice(0, 4, None), slice(6, 8, None), True)
    """

    def __init__(self, owners: Sequence[Optional[str]]) -> None:
        self.owners = list(owners)
        self.batch = len(self.owners)
        self._items: Dict[str, List[int]] = {}
        for i, name in enumerate(self.owners):
            if name is not None:
                self._items.setdefault(name, []).append(i)
        self._cache: Dict[tuple, Rows] = {}

    def names(self) -> List[str]:
        """The adapters that own at least one item, in order of first appearance."""
        return list(self._items)

    def rows(self, name: str, n: int) -> Optional[Rows]:
        """The rows of a tensor with leading size `n` (a multiple of the batch) that belong to `name`:
        a slice when its items are contiguous, else an index tensor; None when it owns no item.
        """
        items = self._items.get(name)
        if items is None:
            return None
        key = (name, n)
        if key in self._cache:
            return self._cache[key]
        if self.batch == 0 or n % self.batch:
            raise AdapterError(f"a routed layer saw {n} rows for a batch of {self.batch}: its leading size is not "
                               f"a multiple of the batch, so its rows cannot be told apart")
        k = n // self.batch
        if items == list(range(items[0], items[-1] + 1)):
            out: Rows = slice(items[0] * k, (items[-1] + 1) * k)
        else:
            out = (torch.tensor(items)[:, None] * k + torch.arange(k)[None, :]).reshape(-1)
        self._cache[key] = out
        return out


def current(sam: nn.Module) -> Optional[RowRoute]:
    """The row route in force on `sam` (set by `route`), or None outside a mixed pass."""
    st = state_of(sam, create=False)
    return st.route if st is not None else None


def add_rows(output: torch.Tensor, rows: Rows, delta: torch.Tensor) -> torch.Tensor:
    """`output` with `delta` added to `rows` (in place when nothing needs `output` for gradients)."""
    if output.requires_grad and torch.is_grad_enabled():
        output = output.clone()
    output[rows] += delta.to(output.dtype)
    return output


def set_rows(output: torch.Tensor, rows: Rows, value: torch.Tensor) -> torch.Tensor:
    """`output` with `rows` replaced by `value` (in place when nothing needs it for gradients)."""
    if output.requires_grad and torch.is_grad_enabled():
        output = output.clone()
    output[rows] = value.to(output.dtype)
    return output


@contextlib.contextmanager
def route(sam: nn.Module, owners: Sequence[Optional[str]]) -> Iterator[RowRoute]:
    """Inside the block, an image-encoder batch gives item i adapter `owners[i]` (None: plain core).

    The active adapter is switched off for the block (so the frozen layers and the decoder in use
    are the core's) and restored after it. Not thread-safe on one model, like `activate`: the
    caller holds the model (the bank does, under its lock).

    Args:
        sam: a `Sam` with the named adapters attached.
        owners: one adapter name or None per item of the next encoder batch.

    Raises:
        AdapterError: a name is not attached, or an adapter is merged into the core.

    Example:
        >>> import torch
        >>> from samadapt import adapters
        >>> from samadapt.sam_core import build_sam
        >>> sam = build_sam("tiny").eval()
        >>> adapters.attach(sam, adapters.config("bottleneck"), name="b")
        >>> x = torch.randn(2, 3, sam.image_size, sam.image_size)
        >>> with torch.no_grad(), adapters.route(sam, ["b", None]):
        ...     emb = sam.encode_image(x)
        >>> emb.shape[0], adapters.active(sam)
        (2, 'b')
    """
    st = state_of(sam)
    bad = sorted({n for n in owners if n is not None and n not in st.adapters})
    if bad:
        raise AdapterError(f"no adapter named {bad[0]!r} is attached; attached: {sorted(st.adapters)}")
    if st.merged is not None:
        raise AdapterError(f"adapter {st.merged!r} is merged into the core; a mixed batch needs the plain core "
                           f"weights: call adapters.unmerge(sam) first")
    if st.route is not None:
        raise AdapterError("a mixed-adapter pass is already running on this model; run one at a time")
    was = active(sam)
    activate(sam, None)
    st.route = RowRoute(owners)
    try:
        yield st.route
    finally:
        st.route = None
        activate(sam, was)
