"""peft's LoRA `Linear` as a `LinearView`, so the fast decoder reads a decoder LoRA's weights.

`sam_core` knows nothing of peft: its fast decoder reads each projection's weight through the
views registered with `samadapt.sam_core.fast.register_linear_view`. This module teaches it
peft's plain LoRA layer (`register()`, called once when `samadapt.adapters` is imported); a layer
it refuses (DoRA or another variant, a LoRA bias, active dropout, ...) sends the decoder to its
exact module path.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from samadapt.sam_core.fast import LinearView, register_linear_view

__all__ = ["lora_linear_view", "register"]


def _lora_linear_ok(m: nn.Module) -> bool:
    """A peft LoRA `Linear` whose output is `x W_eff^T + b` for a weight we can form: plain LoRA
    (no DoRA or other variant, no LoRA bias, no active dropout) on an `nn.Linear`.
    """
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # peft is a dependency; a decoder without it has no LoRA layers anyway
        return False
    if type(m) is not LoraLinear or type(m.get_base_layer()) is not nn.Linear or m.fan_in_fan_out:
        return False
    if m.disable_adapters and m.merged:  # peft would unmerge in forward
        return False
    if m.merged or m.disable_adapters:
        return True
    for a in m.active_adapters:
        if a not in m.lora_A:
            continue
        if m.use_dora.get(a) or a in m.lora_variant or m.lora_bias.get(a):
            return False
        drop = m.lora_dropout[a]
        inactive = isinstance(drop, nn.Dropout) and (not drop.training or drop.p == 0)
        if not (isinstance(drop, nn.Identity) or inactive):
            return False
    return True


def _linear_wb(m: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) with `m(x) == x @ weight.T + bias`: the base weight plus each active, unmerged
    adapter's B A scaling (a fresh adapter's B is zero, so the weight is the base weight, bit for bit).
    """
    base = m.get_base_layer()
    w = base.weight
    if not (m.merged or m.disable_adapters):
        for a in m.active_adapters:
            if a in m.lora_A:
                w = w + m.get_delta_weight(a).to(w.dtype)
    return w, base.bias


def _linear_tensors(m: nn.Module) -> List[torch.Tensor]:
    """The tensors `_linear_wb(m)` reads (for the fast decoder's cache stamps)."""
    base = m.get_base_layer()
    out = [base.weight, base.bias]
    for a in m.active_adapters:
        if a in m.lora_A:
            out += [m.lora_A[a].weight, m.lora_B[a].weight]
    return out


def lora_linear_view(module: nn.Module) -> Optional[LinearView]:
    """The fast decoder's view of a plain peft LoRA `Linear` (None for any other module).

    Args:
        module: any module (the fast decoder asks about each of its projections).

    Returns:
        A `LinearView` whose weight is the base weight plus every active, unmerged adapter's
        scaled B A, or None when `module` is not a LoRA layer of that plain form.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from peft import LoraConfig, inject_adapter_in_model
        >>> from samadapt.adapters.peft_linear_view import lora_linear_view
        >>> model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), nn.Sequential(nn.Linear(4, 3)))
        >>> w, b = lora_linear_view(model[0]).weight_bias()
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(model[0](x), x @ w.T + b), lora_linear_view(nn.ReLU()) is None
        (True, True)
    """
    if not _lora_linear_ok(module):
        return None
    return LinearView(
        lambda: _linear_wb(module), lambda: _linear_tensors(module), module.get_base_layer().bias is not None
    )


def register() -> None:
    """Register `lora_linear_view` with sam_core's fast decoder (idempotent: one entry however often).

    Example:
        >>> from samadapt.adapters.peft_linear_view import lora_linear_view, register
        >>> from samadapt.sam_core.fast import linear_views
        >>> register(); register()
        >>> linear_views().count(lora_linear_view)
        1
    """
    register_linear_view(lora_linear_view)
