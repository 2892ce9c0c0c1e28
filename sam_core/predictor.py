"""SamPredictor: compute an image embedding once, then predict masks from prompts cheaply."""
import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .fast import (
    DecoderImageCache,
    EncoderRoute,
    choose_route,
    encoder_route,
    fast_decode,
    fast_decoder_applies,
    postprocess_masks_fast,
    prepare_image_embedding,
)
from .sam import Sam
from .transforms import ResizeLongestSide


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Accept H x W (gray), H x W x 1, H x W x 3 or H x W x 4 (alpha dropped) uint8 arrays."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(
            f"image dtype is {image.dtype}; pass uint8 pixels 0..255 "
            "(e.g. np.asarray(PIL.Image.open(p).convert('RGB')))"
        )
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image shape is {image.shape}; pass an H x W x 3 RGB array")
    return np.ascontiguousarray(image)


@dataclasses.dataclass
class ImageEmbedding:
    """One image's embedding with what predicting from it needs.

    Attributes:
        features: 1 x C x h x w encoder output.
        input_size: (h, w) after the long-side resize.
        original_size: (H, W) of the image.
        generation: `sam.generation` when it was computed (the adapter state it belongs to).
        decoder_cache: the decoder's prompt-independent products for this image (filled lazily).
        channels_last: the embedding in the fast decoder's layout (filled lazily).
    """

    features: torch.Tensor
    input_size: Tuple[int, int]
    original_size: Tuple[int, int]
    generation: Optional[int] = None
    decoder_cache: DecoderImageCache = dataclasses.field(default_factory=DecoderImageCache, repr=False)
    channels_last: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)


class SamPredictor:
    """Predict masks for one image from points, a box and/or a previous mask.

    The image embedding is computed by `set_image` and cached; it is recomputed automatically
    when the model's function changes (an adapter activated or merged bumps `sam.generation`),
    so a cached embedding is never reused across adapters.

    `set_embedding` predicts from an embedding computed elsewhere (a cache, `encode`'s batch):
    the one seam through which the bank, the server and `samadapt predict` decode prompts.

    Prompts are decoded by `fast.fast_decode` with a per-image `DecoderImageCache` and
    the masks upscaled by `postprocess_masks_fast`: the same function as `Sam.decode` +
    `Sam.postprocess_masks` in a cheaper order (about a third of the time on a CPU; tested
    equal), also under a decoder LoRA whose layers a registered `fast.LinearView` reads
    (`samadapt.adapters` registers plain LoRA's); a decoder with other wrapped layers, hooks or
    changed layers takes `Sam.decode`.

    The image encoder takes the fastest route the CPU supports (`fast.cpu`): bf16 autocast where
    the CPU has native bf16 matrix units and the input is at least 512 px, else fp32, both with
    the factorised attention; masks agree with fp32 segment_anything on >= 99 % of pixels
    (tests/test_cpu_route.py). `route` says which was taken; `precision="fp32"` (or
    `SAMADAPT_PRECISION=fp32`) forces full precision.

    Args:
        sam_model: a `Sam` from `build_sam` / `load_sam`.
        fast: False runs the encoder, `Sam.decode` and `Sam.postprocess_masks` as they are.
        precision: the encoder's precision on a CPU: `auto`, `bf16` or `fp32` (None:
            `$SAMADAPT_PRECISION`, else `auto`).

    Example:
        >>> import numpy as np
        >>> from samadapt.sam_core import build_sam, SamPredictor
        >>> pred = SamPredictor(build_sam("tiny"))
        >>> pred.set_image(np.zeros((120, 160, 3), np.uint8))
        >>> masks, scores, low_res = pred.predict(point_coords=np.array([[80, 60]]), point_labels=np.array([1]))
        >>> masks.shape, scores.shape, low_res.shape
        ((3, 120, 160), (3,), (3, 64, 64))
    """

    def __init__(self, sam_model: Sam, fast: bool = True, precision: Optional[str] = None) -> None:
        self.model = sam_model
        self.fast = fast
        self.precision = precision
        self.choose_route()  # a bad precision fails here, not at the first image
        self.transform = ResizeLongestSide(sam_model.image_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def route(self) -> EncoderRoute:
        """The encoder route `set_image` / `encode` take now (chosen for the model's current device)."""
        if self._route is None or self._route.device != self.model.device.type:
            self.choose_route()
        return self._route

    def choose_route(self, precision: Optional[str] = None) -> EncoderRoute:
        """Choose the encoder route again (after a change of device or precision setting).

        Args:
            precision: `auto`, `bf16` or `fp32` (None: this predictor's setting).

        Returns:
            the route now in force.

        Raises:
            ValueError: an unknown precision.
        """
        if precision is not None:
            self.precision = precision
        self._route = choose_route(self.model, self.precision, fast=self.fast)
        return self._route

    @property
    def is_image_set(self) -> bool:
        """True once `set_image`, `set_torch_image` or `set_embedding` has given an image."""
        return self._image is not None

    @property
    def features(self) -> Optional[torch.Tensor]:
        """The current 1 x C x h x w image embedding (None before an image is set)."""
        return None if self._image is None else self._image.features

    @property
    def original_size(self) -> Optional[Tuple[int, int]]:
        return None if self._image is None else self._image.original_size

    @property
    def input_size(self) -> Optional[Tuple[int, int]]:
        return None if self._image is None else self._image.input_size

    @property
    def image(self) -> Optional[ImageEmbedding]:
        """The current image's `ImageEmbedding` (embedding, sizes and decoder cache), or None.

        A caller that keeps it can hand it back to `set_embedding` later and skip both the
        encoder and the decoder's per-image work.
        """
        return self._image

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self._image: Optional[ImageEmbedding] = None
        self._input_image: Optional[torch.Tensor] = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute and cache the embedding of an image (gray and RGBA accepted).

        Args:
            image: H x W x 3 uint8 pixels (H x W, H x W x 1 and H x W x 4 are accepted too).
            image_format: "RGB" or "BGR".

        Raises:
            ValueError: the image is not uint8 of one of those shapes, or the format is unknown.

        Example:
            >>> import numpy as np
            >>> from samadapt.sam_core import build_sam, SamPredictor
            >>> pred = SamPredictor(build_sam("tiny"))
            >>> pred.set_image(np.zeros((60, 80, 3), np.uint8)); pred.original_size
            (60, 80)
        """
        tensor, original_size = self.prepare_image(image, image_format)
        self.set_torch_image(tensor, original_size)

    def prepare_image(self, image: np.ndarray, image_format: str = "RGB") -> Tuple[torch.Tensor, Tuple[int, int]]:
        """An image as the encoder's input.

        Args:
            image: H x W x 3 uint8 pixels (gray and RGBA accepted).
            image_format: "RGB" or "BGR".

        Returns:
            (1 x 3 x h x w uint8 tensor resized to the long side, the original (H, W)).
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = as_rgb_uint8(image)
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return tensor, (int(image.shape[0]), int(image.shape[1]))

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Like `set_image` for a tensor already resized to the long side.

        Args:
            transformed_image: 1 x 3 x h x w pixels 0..255 with long side `sam.image_size`.
            original_image_size: (H, W) of the original image.

        Raises:
            ValueError: the tensor is not 1 x 3 x h x w with that long side.
        """
        size = self.model.image_size
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3 or max(transformed_image.shape[2:]) != size:
            raise ValueError(
                f"set_torch_image expects 1 x 3 x H x W with long side {size}, got {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        self._input_image = transformed_image
        self._image = self._encode_tensors([transformed_image], [tuple(int(x) for x in original_image_size)])[0]

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> List[ImageEmbedding]:
        """Embeddings of several images in one encoder batch, for `set_embedding` later.

        The current image is left as it is.

        Args:
            images: H x W x 3 uint8 arrays (sizes may differ).
            image_format: "RGB" or "BGR".

        Returns:
            one `ImageEmbedding` per image, in order.

        Example:
            >>> import numpy as np
            >>> from samadapt.sam_core import build_sam, SamPredictor
            >>> pred = SamPredictor(build_sam("tiny"))
            >>> a, b = pred.encode([np.zeros((60, 80, 3), np.uint8), np.zeros((90, 40, 3), np.uint8)])
            >>> pred.set_embedding(b)
            >>> pred.predict(box=np.array([5, 5, 30, 60]), multimask_output=False)[0].shape
            (1, 90, 40)
        """
        prepared = [self.prepare_image(im, image_format) for im in images]
        return self._encode_tensors([t for t, _ in prepared], [s for _, s in prepared])

    def _encode_tensors(
        self, tensors: Sequence[torch.Tensor], original_sizes: Sequence[Tuple[int, int]]
    ) -> List[ImageEmbedding]:
        if not tensors:
            return []
        x = torch.cat([self.model.preprocess(t) for t in tensors], 0)
        with encoder_route(self.model, self.route):
            features = self.model.encode_image(x.to(self.model.dtype) if self.model.dtype != x.dtype else x)
        if features.dtype != self.model.dtype:  # a bf16 route: the decoder takes the model's dtype
            features = features.to(self.model.dtype)
        gen = self.model.generation
        return [ImageEmbedding(features[i: i + 1] if len(tensors) > 1 else features,
                               tuple(int(v) for v in t.shape[-2:]), tuple(int(v) for v in size), gen)
                for i, (t, size) in enumerate(zip(tensors, original_sizes))]

    def set_embedding(
        self,
        features: Union[torch.Tensor, ImageEmbedding],
        input_size: Optional[Tuple[int, int]] = None,
        original_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        """Predict from an embedding computed elsewhere (a cache, `encode`, another process).

        The embedding is taken to belong to the model as it is now (the active adapter included);
        if the model's function changes afterwards, `predict` asks for it to be set again.

        Args:
            features: 1 x C x h x w from `sam.encode_image` (or `get_image_embedding`), or an
                `ImageEmbedding` from `encode` / `image` (its decoder cache is reused).
            input_size: (h, w) of the image after the long-side resize (from `transform`).
            original_size: (H, W) of the image prompts are given in.
        """
        if isinstance(features, ImageEmbedding):
            if input_size is not None or original_size is not None:
                raise ValueError("set_embedding: an ImageEmbedding carries its own sizes; pass it alone")
            emb = features
            emb.generation = self.model.generation  # the caller vouches for it (the decoder cache checks its weights)
        else:
            if input_size is None or original_size is None:
                raise ValueError("set_embedding(features, input_size, original_size): give both sizes "
                                 "(input_size = predictor.transform.get_preprocess_shape(H, W, image_size))")
            if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[0] != 1:
                shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
                raise ValueError(f"set_embedding expects a 1 x C x h x w embedding, got {shape}")
            emb = ImageEmbedding(features, tuple(int(v) for v in input_size), tuple(int(v) for v in original_size),
                                 self.model.generation)
        self.reset_image()
        self._image = emb

    def _fresh_features(self) -> torch.Tensor:
        if self._image is None:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if self._image.generation != self.model.generation:
            if self._input_image is None:
                raise RuntimeError("the model changed (an adapter was activated or merged) since set_embedding; "
                                   "set the embedding computed under the model as it is now")
            with torch.no_grad():
                self._image = self._encode_tensors([self._input_image], [self._image.original_size])[0]
        return self._image.features

    def get_image_embedding(self) -> torch.Tensor:
        """The cached 1 x C x h x w embedding of the current image."""
        return self._fresh_features()

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts given in original-image pixels.

        Args:
            point_coords: N x 2 (x, y).
            point_labels: N (1 foreground, 0 background).
            box: 4 (x0, y0, x1, y1).
            mask_input: 1 x 4h x 4w low-res logits from a previous call.
            multimask_output: three candidate masks (best for one ambiguous click) or one.
            return_logits: return logits instead of boolean masks.

        Returns:
            masks C x H x W, scores C, low-res logits C x 4h x 4w (numpy).
        """
        self._fresh_features()
        coords = labels = box_t = mask_t = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied with point_coords (1 foreground, 0 background)")
            point_coords = np.asarray(point_coords, dtype=float).reshape(-1, 2)
            point_labels = np.asarray(point_labels).reshape(-1)
            if len(point_labels) != len(point_coords):
                raise ValueError(
                    f"{len(point_coords)} points but {len(point_labels)} labels; give one label per point"
                )
            coords = torch.as_tensor(
                self.transform.apply_coords(point_coords, self.original_size), dtype=torch.float, device=self.device
            )[None]
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = np.asarray(box, dtype=float)
            if box.size != 4:
                raise ValueError(f"box has {box.size} values; give x0, y0, x1, y1")
            box_t = torch.as_tensor(
                self.transform.apply_boxes(box, self.original_size), dtype=torch.float, device=self.device
            )
        if mask_input is not None:
            mask_t = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)
            if mask_t.ndim == 2:
                mask_t = mask_t[None]
            mask_t = mask_t[None]
        masks, scores, low_res = self.predict_torch(coords, labels, box_t, mask_t, multimask_output, return_logits)
        return masks[0].cpu().numpy(), scores[0].float().cpu().numpy(), low_res[0].float().cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for batched prompts already in the resized-input frame (`transform.apply_coords`).

        Args:
            point_coords: B x N x 2 points, or None.
            point_labels: B x N labels (1 foreground, 0 background), or None.
            boxes: B x 4 boxes (x0, y0, x1, y1), or None.
            mask_input: B x 1 x 4h x 4w previous low-res logits, or None.
            multimask_output: return three candidates per prompt instead of one.
            return_logits: return logits instead of boolean masks.

        Returns:
            (masks B x M x H x W, IoU scores B x M, low-res logits B x M x 4h x 4w).

        Raises:
            RuntimeError: no image is set, or the model changed since `set_embedding`.
        """
        features = self._fresh_features()
        img = self._image
        if self.fast and fast_decoder_applies(self.model):
            if img.channels_last is None:  # the decoder's image tokens as contiguous rows, once per image
                img.channels_last = prepare_image_embedding(features)
            low_res, scores = fast_decode(self.model, img.channels_last, point_coords, point_labels, boxes, mask_input,
                                          multimask_output, cache=img.decoder_cache)
            masks = postprocess_masks_fast(low_res.float(), self.model.image_size, self.input_size, self.original_size)
        else:
            low_res, scores = self.model.decode(
                features, point_coords, point_labels, boxes, mask_input, multimask_output
            )
            masks = self.model.postprocess_masks(low_res.float(), self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, scores, low_res
