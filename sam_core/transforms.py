"""Resize-longest-side transform for images, points and boxes (SAM's input frame)."""
from typing import Tuple

import numpy as np
import torch
from PIL import Image


class ResizeLongestSide:
    """Resize so the longest side is `target_length`, and map coordinates the same way.

    Args:
        target_length: the encoder input side (`sam.image_size`).

    Example:
        >>> import numpy as np
        >>> t = ResizeLongestSide(256)
        >>> t.apply_image(np.zeros((300, 600, 3), np.uint8)).shape
        (128, 256, 3)
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        """The (h, w) an oldh x oldw image takes once its long side is `long_side_length` (rounded).

        Each side is at least 1 px: a sliver (1 x 2000 at 256) would round to 0 and could not be resized
        (segment_anything's rule otherwise, which fails on such images).

        Example:
            >>> shape = ResizeLongestSide.get_preprocess_shape
            >>> shape(480, 640, 1024), shape(1, 2000, 256)
            ((768, 1024), (1, 256))
        """
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return max(1, int(oldh * scale + 0.5)), max(1, int(oldw * scale + 0.5))

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Resize an image (PIL bilinear, the filter SAM was trained with).

        Args:
            image: H x W x C uint8 pixels.

        Returns:
            The resized uint8 image, long side `target_length`.
        """
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """Map (..., 2) x/y points of an image of `original_size` (h, w) into the resized frame.

        Args:
            coords: (..., 2) points (x, y).
            original_size: (h, w) of the image the points are on.

        Returns:
            A float copy of the points in the resized frame.
        """
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """`apply_coords` for (..., 4) boxes (x0, y0, x1, y1); returns N x 4."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        """`apply_coords` for a tensor (float32 result on the tensor's device)."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=torch.float32, device=coords.device)
        return coords.to(torch.float32) * scale

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        """`apply_boxes` for a tensor (float32 result on the tensor's device)."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
