"""`classes`: a K-class semantic head (SAMed's design: one mask token per class), combined with the other
kinds under one adapter name, so one file answers both promptless multi-class segmentation and SAM's
point/box prompts.

How the two modes share one adapter:

* Prompts (`Sam.decode`, `SamPredictor`, `AdapterBank`) run exactly as without this kind: the decoder in
  use (the adapter's own copy with `decoder="full"`) with SAM's IoU and mask tokens and the prompt
  tokens. The head adds nothing there, so a fresh head changes no prompted output, and the masks stay
  class-agnostic.
* `semantic_logits(sam, embeddings)` runs the same decoder once more with no prompt (the promptless
  embeddings SAM-Adapter trains with) and K extra output tokens: SAM's IoU and mask tokens stay in the
  token set, so the decoder's attention sees the token mix it was trained on; the K class tokens read
  the image through the same two-way transformer and each becomes a mask through its own hypernetwork
  MLP over the shared upscaled features. K logits per pixel: softmax over classes, label = argmax
  (class 0 is background), trained with cross-entropy + Dice as SAMed.

The head's tokens and MLPs start as copies of the core decoder's first mask token and hypernetwork (plus a
little noise so classes can part), so training starts from SAM's own promptless mask. The class names
(and their label values) are the kind's config, written into the adapter file's `config` metadata like
any kind's settings; `samadapt inspect` shows them.

Example:
    >>> import torch
    >>> from samadapt import adapters
    >>> from samadapt.sam_core import build_sam
    >>> sam = build_sam("tiny")
    >>> adapters.attach(sam, adapters.config("classes", names=["background", "liver", "spleen"]), name="org")
    >>> emb = torch.zeros(2, sam.prompt_encoder.embed_dim, *sam.embedding_size)
    >>> tuple(semantic_logits(sam, emb).shape)
    (2, 3, 64, 64)
"""
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional

import torch
from torch import nn

from ..base import AdapterError, AdapterSlot, Injected, KindSpec, active, module_tensors, register_kind
from ..parts import remove_from_slot

SLOT = "samadapt_classes"  # the `Sam` submodule holding the heads, keyed by adapter name


@dataclass
class ClassesConfig:
    """A K-class semantic head.

    Args:
        names: class names, background first (K >= 2), e.g. from dataset.json's labels.
        values: the label value of each class in the label maps (default 0..K-1).

    Raises:
        AdapterError: fewer than two names, repeated or empty names, or values that do not fit.

    Example:
        >>> ClassesConfig(names=["background", "liver"]).label_map()
        {0: 'background', 1: 'liver'}
    """

    kind: ClassVar[str] = "classes"
    promptless_head: ClassVar[bool] = True  # adds a promptless output only: prompted outputs never change
    names: List[str] = field(default_factory=lambda: ["background", "foreground"],
                             metadata={"help": "class names, background first (dataset.json's labels)"})
    values: Optional[List[int]] = field(default=None, metadata={"help": "label value per class (default 0..K-1)"})

    def __post_init__(self):
        names = self.names
        if (not isinstance(names, (list, tuple)) or len(names) < 2
                or not all(isinstance(n, str) and n.strip() for n in names)):
            raise AdapterError(f"classes names={names!r} must be a list of at least two non-empty names, background "
                               "first, e.g. ['background', 'liver', 'spleen']")
        if len(set(names)) != len(names):
            raise AdapterError(f"classes names={list(names)!r} repeats a name; each class needs its own")
        self.names = [str(n) for n in names]
        if self.values is not None:
            vals = self.values
            if (not isinstance(vals, (list, tuple)) or len(vals) != len(names)
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals)
                    or len(set(vals)) != len(vals)):
                raise AdapterError(f"classes values={vals!r} must be {len(names)} distinct label numbers >= 0, one "
                                   "per name")
            self.values = [int(v) for v in vals]

    def label_map(self) -> Dict[int, str]:
        """Label value -> class name."""
        return dict(zip(self.values or range(len(self.names)), self.names))


class ClassHead(nn.Module):
    """K class tokens and K hypernetwork MLPs, initialised from a mask decoder's first mask output. The K MLPs'
    layers are stacked into one tensor per layer (`weight_i`: K x out x in, `bias_i`: K x out): one batched
    product instead of K small ones, and 7 tensor names in the file whatever K is.
    """

    def __init__(self, decoder: nn.Module, k: int) -> None:
        super().__init__()
        dim = decoder.transformer_dim
        self.tokens = nn.Embedding(k, dim)
        layers = decoder.output_hypernetworks_mlps[0].layers
        with torch.no_grad():
            base = decoder.mask_tokens.weight[0].detach().float()
            self.tokens.weight.copy_(base.expand(k, -1) + 0.02 * base.std() * torch.randn(k, dim))
        self.weights = nn.ParameterList(
            nn.Parameter(lin.weight.detach().float().clone().expand(k, -1, -1).contiguous()) for lin in layers)
        self.biases = nn.ParameterList(
            nn.Parameter(lin.bias.detach().float().clone().expand(k, -1).contiguous()) for lin in layers)

    def forward(self, class_tokens: torch.Tensor) -> torch.Tensor:
        """B x K x C decoder outputs of the class tokens -> B x K x C' hypernetwork weights (ReLU between layers,
        as SAM's MLP).
        """
        x = class_tokens
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.einsum("bkc,koc->bko", x, w.to(x.dtype)) + b.to(x.dtype)
            if i < last:
                x = torch.relu(x)
        return x


def _head(sam: nn.Module, name: Optional[str]) -> nn.Module:
    name = active(sam) if name is None else name
    slot = sam._modules.get(SLOT)
    if name is None or slot is None or name not in slot:
        have = sorted(slot) if slot is not None else []
        raise AdapterError(f"adapter {name!r} has no class head (kind 'classes'); adapters with one: {have}. "
                           "Load a multi-class adapter (e.g. one trained with the organs recipe)")
    return slot[name]


def has_class_head(sam: nn.Module, name: Optional[str] = None) -> bool:
    """Whether adapter `name` (None: the active one) carries a class head.

    Example:
        >>> from samadapt.sam_core import build_sam
        >>> has_class_head(build_sam("tiny"))
        False
    """
    name = active(sam) if name is None else name
    slot = sam._modules.get(SLOT)
    return name is not None and slot is not None and name in slot


def semantic_logits(sam: nn.Module, image_embeddings: torch.Tensor, name: Optional[str] = None) -> torch.Tensor:
    """Promptless K-class logits: B x K x 4h x 4w (the decoder's low-resolution grid).

    Args:
        sam: a core with a `classes` adapter attached.
        image_embeddings: B x C x h x w (`sam.encode_image`).
        name: the adapter whose head runs (None: the active adapter). Its encoder kinds must be active
            when the embeddings were computed; the decoder in use is the one `activate` chose.

    Raises:
        AdapterError: that adapter has no class head.
    """
    head = _head(sam, name)
    dec = sam.active_mask_decoder
    sparse, dense, b = sam.embed_prompts(image_embeddings)
    dtype = dense.dtype
    if dense.shape[0] != b:
        dense = dense.expand(b, -1, -1, -1)
    k = head.tokens.weight.shape[0]
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, head.tokens.weight.to(dtype)], dim=0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
    src = image_embeddings.to(dtype) + dense
    pos = sam.prompt_encoder.get_dense_pe().to(dtype).expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = dec.transformer(src, pos, tokens)
    first = 1 + dec.num_mask_tokens
    class_out = hs[:, first:first + k, :]
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = head(class_out)
    _, cu, hu, wu = upscaled.shape
    return (hyper @ upscaled.reshape(b, cu, hu * wu)).reshape(b, k, hu, wu)


def inject(sam: nn.Module, cfg: ClassesConfig, name: str, state, init: bool = True) -> Injected:
    """A class head named `name` in `sam.samadapt_classes`."""
    if SLOT not in sam._modules:
        sam.add_module(SLOT, AdapterSlot())
    dec = sam.mask_decoder
    head = ClassHead(dec, len(cfg.names)).to(dec.mask_tokens.weight.device)
    getattr(sam, SLOT)[name] = head
    return Injected(tensors=module_tensors(f"{SLOT}.", head))


def remove(sam: nn.Module, name: str, state, handle=None) -> None:
    """Undo `inject`."""
    remove_from_slot(sam, SLOT, name)


register_kind(KindSpec("classes", ClassesConfig, inject, remove, owns=lambda key: key.startswith(f"{SLOT}."),
                       label="class_head"))
