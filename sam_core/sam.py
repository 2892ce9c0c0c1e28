"""The SAM module: a timm ViT image encoder, a prompt encoder and a mask decoder."""
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def _tensor_digest(item: Tuple[str, torch.Tensor]) -> bytes:
    name, t = item
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        # an fp16/bf16 file loaded into an fp32 core holds the same values: hash them as fp32
        t = t.float()
    t = t.cpu().contiguous()
    h = hashlib.sha256()
    h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.digest()


class Sam(nn.Module):
    """Segment Anything: image encoder + prompt encoder + mask decoder.

    Build one with `sam_core.build_sam` or `sam_core.load_sam` rather than by hand.

    Args:
        image_encoder: timm `VisionTransformerSAM` whose neck gives the C x h x w image embedding.
        prompt_encoder: the `PromptEncoder`.
        mask_decoder: the `MaskDecoder`.
        image_size: side of the square, padded encoder input (1024 in SAM; may be smaller).
        arch: architecture name recorded with adapters (`vit_b`, `vit_l`, `vit_h`, `tiny`).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int,
        arch: str = "custom",
        pixel_mean: Tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: Tuple[float, float, float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = int(image_size)
        self.arch = arch
        # segment_anything code reads image_encoder.img_size
        self.image_encoder.img_size = self.image_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # The frozen weights, recorded by (owning module, attribute): modules that wrap a layer later
        # (adapters) keep the wrapped module, so the fingerprint keeps describing the core alone,
        # and `.to()` replacing a buffer is still seen.
        persistent = set(self.state_dict().keys())
        self._core_refs: List[Tuple[str, nn.Module, str]] = []
        for mod_name, mod in self.named_modules():
            for attr in list(mod._parameters) + list(mod._buffers):
                full = f"{mod_name}.{attr}" if mod_name else attr
                if full in persistent:
                    self._core_refs.append((full, mod, attr))
        # Bumped by anything that changes what the model computes without changing the core
        # (an adapter activated, merged, ...): caches of embeddings compare it.
        self.generation = 0
        self.__dict__["_decoder_in_use"] = None
        # What libraries that extend the model keep with it, each under its own key (samadapt.adapters
        # keeps its adapter state here): copied with the model (`copy.deepcopy`), never in `state_dict`.
        self.extensions: Dict[str, Any] = {}
        # the file `load_sam` read the weights from (`checkpoint.CheckpointFile`: name, sha256), or None
        self.checkpoint: Optional[Any] = None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mask_decoder.iou_token.weight.dtype

    @property
    def embedding_size(self) -> Tuple[int, int]:
        return tuple(self.prompt_encoder.image_embedding_size)

    @property
    def fingerprint(self) -> str:
        """A stable hash of the frozen core weights (hex, 16 bytes).

        Equal for equal weights whatever file they came from; changes when any single value
        changes. Adapter parameters attached later are not part of it.

        Example:
            >>> from samadapt.sam_core import build_sam
            >>> sam = build_sam("tiny")
            >>> len(sam.fingerprint)
            32
        """
        items = sorted(self.core_state_dict().items())
        # hashlib releases the GIL on large buffers: hash tensors on all cores
        with ThreadPoolExecutor(max_workers=max(1, min(8, torch.get_num_threads()))) as pool:
            digests = list(pool.map(_tensor_digest, items))
        h = hashlib.sha256(b"samadapt.core/1")
        for d in digests:
            h.update(d)
        return h.hexdigest()[:32]

    def core_state_dict(self) -> Dict[str, torch.Tensor]:
        """The frozen core's weights under their plain names (no adapter wrapping)."""
        return {name: getattr(mod, attr).detach() for name, mod, attr in self._core_refs}

    def core_parameters(self) -> List[nn.Parameter]:
        """The frozen core's parameters themselves (not copies), without walking the module tree."""
        return [mod._parameters[attr] for _, mod, attr in self._core_refs if attr in mod._parameters]

    def core_version_key(self) -> tuple:
        """Cheap identity of the core's current weights (about 0.1 ms for vit_b): changes when a
        core tensor is replaced (new storage or dtype) or written in place through autograd-visible
        tensors (its version counter moves: `copy_`, `load_state_dict`, optimiser steps).
        """
        slots = self.__dict__.get("_core_slots")
        if slots is None:  # the dicts that hold each core tensor, looked up once
            slots = [
                (mod._parameters if attr in mod._parameters else mod._buffers, attr)
                for _, mod, attr in self._core_refs
            ]
            self.__dict__["_core_slots"] = slots
        return tuple((t.data_ptr(), t._version, t.dtype) for t in (d[attr] for d, attr in slots))

    def bump_generation(self) -> None:
        """Tell embedding caches that the model's function changed."""
        self.generation += 1

    # ------------------------------------------------------------------ pre/post-processing
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise pixel values and pad bottom/right to a square `image_size`.

        Args:
            x: B x 3 x h x w pixels 0..255 (RGB), long side already resized to `image_size`.

        Returns:
            B x 3 x `image_size` x `image_size` normalised, zero-padded input.
        """
        x = (x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
    ) -> torch.Tensor:
        """Upscale low-res logits to the padded input, crop the padding, resize to the original size.

        Args:
            masks: B x C x 4h x 4w low-resolution mask logits.
            input_size: (h, w) of the resized image inside the padded input.
            original_size: (h, w) of the original image.

        Returns:
            B x C x original_h x original_w logits.
        """
        masks = F.interpolate(masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ model calls
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The image encoder (with its neck) on preprocessed images.

        Args:
            images: B x 3 x S x S preprocessed images (`preprocess`), S = `image_size`.

        Returns:
            B x C x S/16 x S/16 image embeddings.

        Example:
            >>> import torch
            >>> from samadapt.sam_core import build_sam
            >>> sam = build_sam("tiny")
            >>> with torch.no_grad():
            ...     emb = sam.encode_image(torch.zeros(1, 3, sam.image_size, sam.image_size))
            >>> tuple(emb.shape) == (1, sam.prompt_encoder.embed_dim, *sam.embedding_size)
            True
        """
        return self.image_encoder.forward_features(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_inputs: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode prompts (in the resized-input frame) into low-res mask logits and IoU predictions.

        With no prompt at all the decoder runs promptless (the setting SAM-Adapter trains in).
        The decoder in use (`active_mask_decoder`) runs.

        Args:
            image_embeddings: 1 x C x h x w (all prompts on one image) or B x C x h x w (one
                prompt set per image).
            point_coords: B x P x 2 point prompts.
            point_labels: B x P labels (1 foreground, 0 background, -1 padding).
            boxes: B x 4 box prompts (x0, y0, x1, y1).
            mask_inputs: B x 1 x 4h x 4w mask prompts (previous low-res logits).
            multimask_output: return the three multimask candidates instead of the single mask.

        Returns:
            (low-res logits B x M x 4h x 4w, IoU predictions B x M), M = 3 with
            `multimask_output`, else 1.

        Example:
            >>> import torch
            >>> from samadapt.sam_core import build_sam
            >>> sam = build_sam("tiny")
            >>> emb = torch.zeros(1, sam.prompt_encoder.embed_dim, *sam.embedding_size)
            >>> with torch.no_grad():
            ...     masks, iou = sam.decode(emb, boxes=torch.tensor([[10.0, 10.0, 90.0, 80.0]]), multimask_output=True)
            >>> tuple(masks.shape[:2]), tuple(iou.shape)
            ((1, 3), (1, 3))
        """
        sparse, dense, b = self.embed_prompts(image_embeddings, point_coords, point_labels, boxes, mask_inputs)
        if dense.shape[0] != b:
            dense = dense.expand(b, -1, -1, -1)
        return self.active_mask_decoder(
            image_embeddings=image_embeddings.to(dense.dtype),
            image_pe=self.prompt_encoder.get_dense_pe().to(dense.dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    @property
    def active_mask_decoder(self) -> nn.Module:
        """The decoder `decode` runs: the core's, or the replacement put in use by `use_decoder`
        (e.g. one trained per domain and held by an adapter).
        """
        return self._decoder_in_use or self.mask_decoder

    def use_decoder(self, decoder: Optional[nn.Module]) -> None:
        """Run `decoder` in place of the core's mask decoder (None: the core's own).

        The replacement is not registered as a submodule here (its owner holds it, so it is saved
        and moved with its owner); embedding caches are told when the decoder in use changes.

        Args:
            decoder: a module with `MaskDecoder`'s interface, or None.

        Example:
            >>> import copy
            >>> from samadapt.sam_core import build_sam
            >>> sam = build_sam("tiny")
            >>> sam.use_decoder(copy.deepcopy(sam.mask_decoder)); sam.active_mask_decoder is sam.mask_decoder
            False
            >>> sam.use_decoder(None); sam.active_mask_decoder is sam.mask_decoder
            True
        """
        if decoder is not None and not isinstance(decoder, nn.Module):
            raise TypeError(f"use_decoder takes an nn.Module or None, got {type(decoder).__name__}")
        if decoder is not self._decoder_in_use:
            self.__dict__["_decoder_in_use"] = decoder  # not a submodule: its owner registers it
            self.bump_generation()

    def embed_prompts(
        self,
        image_embeddings: torch.Tensor,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_inputs: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """The prompt encoder's embeddings for one `decode` call.

        Args:
            image_embeddings: 1 x C x h x w or B x C x h x w (sets the batch size with the prompts).
            point_coords: B x P x 2 point prompts, or None.
            point_labels: B x P labels, or None.
            boxes: B x 4 box prompts, or None.
            mask_inputs: B x 1 x 4h x 4w mask prompts, or None.

        Returns:
            (sparse embeddings expanded to the call's batch size b, dense embeddings (1 or b), b).
        """
        points = (point_coords, point_labels) if point_coords is not None else None
        b = max(
            image_embeddings.shape[0],
            point_coords.shape[0] if point_coords is not None else 1,
            boxes.shape[0] if boxes is not None else 1,
            mask_inputs.shape[0] if mask_inputs is not None else 1,
        )
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
        if sparse.shape[0] != b:
            sparse = sparse.expand(b, -1, -1)
        return sparse, dense, b

    def forward_masks(
        self,
        images: torch.Tensor,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_inputs: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Differentiable end-to-end call used for training: one prompt set per image.

        Args:
            images: B x 3 x S x S float pixels (0..255), already resized and padded to `image_size`.
            point_coords: B x N x 2 (x, y) in the input frame.
            point_labels: B x N (1, 0, -1 pad).
            boxes: B x 4 (x0, y0, x1, y1) in the input frame.
            mask_inputs: B x 1 x 4h x 4w low-res logits of a previous prediction.
            multimask_output: three candidate masks per prompt set instead of one.

        Returns:
            low-res mask logits B x C x 4h x 4w and IoU predictions B x C.
        """
        emb = self.encode_image(self.preprocess(images))
        return self.decode(emb, point_coords, point_labels, boxes, mask_inputs, multimask_output)

    @torch.no_grad()
    def forward(self, batched_input: List[Dict[str, Any]], multimask_output: bool) -> List[Dict[str, torch.Tensor]]:
        """segment_anything's batched call: a list of dicts with 'image' (3 x H x W, resized),
        'original_size' and optional 'point_coords', 'point_labels', 'boxes', 'mask_inputs'.
        """
        images = torch.stack([self.preprocess(rec["image"]) for rec in batched_input], dim=0)
        embeddings = self.encode_image(images)
        outputs = []
        for rec, emb in zip(batched_input, embeddings):
            low_res, iou = self.decode(
                emb[None], rec.get("point_coords"), rec.get("point_labels"), rec.get("boxes"),
                rec.get("mask_inputs"), multimask_output,
            )
            masks = self.postprocess_masks(low_res, rec["image"].shape[-2:], rec["original_size"])
            outputs.append({"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs
