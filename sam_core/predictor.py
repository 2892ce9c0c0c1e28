"""SamPredictor: compute an image embedding once, then predict masks from prompts cheaply."""
from typing import Optional, Tuple

import numpy as np
import torch

from .fast_attention import DecoderImageCache, fast_decode, fast_decoder_applies, postprocess_masks_fast, prepare_image_embedding
from .sam import Sam
from .transforms import ResizeLongestSide


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Accept H x W (gray), H x W x 1, H x W x 3 or H x W x 4 (alpha dropped) uint8 arrays."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype is {image.dtype}; pass uint8 pixels 0..255 (e.g. np.asarray(PIL.Image.open(p).convert('RGB')))")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image shape is {image.shape}; pass an H x W x 3 RGB array")
    return np.ascontiguousarray(image)


class SamPredictor:
    """Predict masks for one image from points, a box and/or a previous mask.

    The image embedding is computed by `set_image` and cached; it is recomputed automatically
    when the model's function changes (an adapter activated or merged bumps `sam.generation`),
    so a cached embedding is never reused across adapters.

    Prompts are decoded by `fast_attention.fast_decode` with a per-image `DecoderImageCache` and
    the masks upscaled by `postprocess_masks_fast`: the same function as `Sam.decode` +
    `Sam.postprocess_masks` in a cheaper order (about a third of the time on a CPU; tested
    equal), also under a plain decoder LoRA; a decoder with DoRA, hooks or changed layers takes
    `Sam.decode`.

    Args:
        sam_model: a `Sam` from `build_sam` / `load_sam`.
        fast: False runs `Sam.decode` + `Sam.postprocess_masks` as they are.

    Example:
        >>> import numpy as np
        >>> from sam_core import build_sam, SamPredictor
        >>> pred = SamPredictor(build_sam("tiny"))
        >>> pred.set_image(np.zeros((120, 160, 3), np.uint8))
        >>> masks, scores, low_res = pred.predict(point_coords=np.array([[80, 60]]), point_labels=np.array([1]))
        >>> masks.shape, scores.shape, low_res.shape
        ((3, 120, 160), (3,), (3, 64, 64))
    """

    def __init__(self, sam_model: Sam, fast: bool = True) -> None:
        self.model = sam_model
        self.fast = fast
        self.transform = ResizeLongestSide(sam_model.image_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None
        self._input_image = None
        self._generation = None
        self.decoder_cache = DecoderImageCache()  # prompt-independent decoder products of this image
        self._features_cl = (None, None)  # (features it was made from, channels-last copy)

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute and cache the embedding of an H x W x 3 uint8 image (gray and RGBA accepted)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = as_rgb_uint8(image)
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(tensor, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """Like `set_image` for a 1 x 3 x H x W tensor already resized to the long side."""
        size = self.model.image_size
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3 or max(transformed_image.shape[2:]) != size:
            raise ValueError(
                f"set_torch_image expects 1 x 3 x H x W with long side {size}, got {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        self.original_size = tuple(int(x) for x in original_image_size)
        self.input_size = tuple(int(x) for x in transformed_image.shape[-2:])
        self._input_image = transformed_image
        self._encode()

    def _encode(self) -> None:
        x = self.model.preprocess(self._input_image)
        self.features = self.model.encode_image(x.to(self.model.dtype) if self.model.dtype != x.dtype else x)
        self._generation = self.model.generation
        self.is_image_set = True

    def _fresh_features(self) -> torch.Tensor:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if self._generation != self.model.generation:
            with torch.no_grad():
                self._encode()
        return self.features

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
            point_coords: N x 2 (x, y); point_labels: N (1 foreground, 0 background).
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
                raise ValueError(f"{len(point_coords)} points but {len(point_labels)} labels; give one label per point")
            coords = torch.as_tensor(self.transform.apply_coords(point_coords, self.original_size), dtype=torch.float, device=self.device)[None]
            labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = np.asarray(box, dtype=float)
            if box.size != 4:
                raise ValueError(f"box has {box.size} values; give x0, y0, x1, y1")
            box_t = torch.as_tensor(self.transform.apply_boxes(box, self.original_size), dtype=torch.float, device=self.device)
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
        """Batched prompts already in the input frame (B x N x 2, B x N, B x 4, B x 1 x 4h x 4w)."""
        features = self._fresh_features()
        if self.fast and fast_decoder_applies(self.model):
            src, cl = self._features_cl
            if src is not features:  # the decoder's image tokens as contiguous rows, once per image
                cl = prepare_image_embedding(features)
                self._features_cl = (features, cl)
            low_res, scores = fast_decode(self.model, cl, point_coords, point_labels, boxes, mask_input,
                                          multimask_output, cache=self.decoder_cache)
            masks = postprocess_masks_fast(low_res.float(), self.model.image_size, self.input_size, self.original_size)
        else:
            low_res, scores = self.model.decode(features, point_coords, point_labels, boxes, mask_input, multimask_output)
            masks = self.model.postprocess_masks(low_res.float(), self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, scores, low_res
