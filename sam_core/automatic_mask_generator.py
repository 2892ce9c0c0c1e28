"""SamAutomaticMaskGenerator: masks for everything in an image, prompted by a grid of points.

Same algorithm and constructor as segment_anything's generator: a point grid per crop layer, one
image embedding per crop, batched single-point prompts with three candidate masks each, filtering
by predicted IoU and stability, box NMS per crop and across crops, dropping masks cut by a crop
edge, and optional removal of small holes and islands.
"""
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchvision.ops import batched_nms, box_area

from .amg_utils import (
    MaskRecords,
    area_from_rle,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from .predictor import ImageEmbedding, SamPredictor, as_rgb_uint8
from .sam import Sam

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


class SamAutomaticMaskGenerator:
    """Generate masks for a whole image from a regular grid of point prompts.

    Each grid point is decoded into three candidate masks; candidates are kept when the model's
    predicted IoU exceeds `pred_iou_thresh` and their stability score (IoU of the mask thresholded
    at +/- `stability_score_offset`) reaches `stability_score_thresh`; duplicates are removed by
    box NMS. Defaults are those of SAM ViT-H.

    Args:
        model: a `Sam` (from `build_sam` / `load_sam`, adapters attached or not).
        points_per_side: points along each side of the grid (points_per_side^2 prompts in all);
            None when `point_grids` is given. Exactly one of the two must be set.
        points_per_batch: prompts decoded together; more is faster and uses more memory.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 disables the filter).
        stability_score_thresh: keep masks whose stability score is at least this (0 disables).
        stability_score_offset: logit offset of the stability score's two thresholds.
        box_nms_thresh: box IoU above which a lower-scored mask of the same crop is dropped.
        crop_n_layers: extra crop layers; layer i splits the image into (2^i)^2 overlapping crops.
        crop_nms_thresh: box IoU for the NMS across crops (smaller crops lose).
        crop_overlap_ratio: crop overlap as a fraction of the short side in layer 1, halved per layer.
        crop_n_points_downscale_factor: layer i uses points_per_side / factor^i points per side.
        point_grids: explicit grids, one per layer, of (x, y) in [0, 1] (N x 2 arrays).
        min_mask_region_area: if > 0, fill holes and drop islands smaller than this many pixels
            (needs opencv), then rerun NMS.
        precision: the image encoder's precision on a CPU (`SamPredictor`'s: `auto`, `bf16`, `fp32`).
        output_mode: "binary_mask" (H x W bool arrays), "uncompressed_rle" or "coco_rle"
            (compressed strings; needs pycocotools).

    Raises:
        ValueError: both or neither of points_per_side / point_grids, too few grids for the
            crop layers, or an unknown output_mode.
        ImportError: output_mode="coco_rle" without pycocotools.

    Example:
        >>> import numpy as np
        >>> from samadapt.sam_core import build_sam, SamAutomaticMaskGenerator
        >>> gen = SamAutomaticMaskGenerator(build_sam("tiny"), points_per_side=4,
        ...                                 pred_iou_thresh=0.0, stability_score_thresh=0.0)
        >>> masks = gen.generate(np.zeros((96, 128, 3), np.uint8))
        >>> all(m["segmentation"].shape == (96, 128) and len(m["bbox"]) == 4 for m in masks)
        True
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        precision: Optional[str] = None,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError(
                f"give exactly one of points_per_side and point_grids; got points_per_side={points_per_side!r} "
                f"and point_grids={'None' if point_grids is None else f'a list of {len(point_grids)} grids'} "
                "(with point_grids, pass points_per_side=None)"
            )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode={output_mode!r} is not one of {', '.join(map(repr, OUTPUT_MODES))}")
        if int(crop_n_layers) < 0:
            raise ValueError(f"crop_n_layers={crop_n_layers!r}; use 0 (no crops) or more")
        if int(points_per_batch) < 1:
            raise ValueError(f"points_per_batch={points_per_batch!r}; use a positive number such as 64")
        if points_per_side is not None:
            if int(points_per_side) < 1:
                raise ValueError(f"points_per_side={points_per_side!r}; use a positive number such as 32")
            grids = build_all_layer_point_grids(
                int(points_per_side), int(crop_n_layers), crop_n_points_downscale_factor
            )
        else:
            grids = [np.asarray(g, dtype=float).reshape(-1, 2) for g in point_grids]
            if len(grids) < crop_n_layers + 1:
                raise ValueError(
                    f"point_grids has {len(grids)} grids but crop_n_layers={crop_n_layers} needs {crop_n_layers + 1} "
                    "(one for the whole image and one per crop layer)"
                )
        if output_mode == "coco_rle":
            try:
                import pycocotools  # noqa: F401
            except ImportError:
                raise ImportError("output_mode='coco_rle' needs pycocotools: pip install pycocotools") from None
        if min_mask_region_area > 0:
            import cv2  # noqa: F401  (fail now rather than after the model ran)

        self.predictor = SamPredictor(model, precision=precision)
        self.point_grids = grids
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, image: np.ndarray, embedding: Optional[ImageEmbedding] = None) -> List[Dict[str, Any]]:
        """Masks for everything in an H x W x 3 uint8 RGB image (gray and RGBA accepted).

        Args:
            image: the image.
            embedding: the whole image's embedding when the caller already has it (a cache,
                `SamPredictor.encode`); crops are still encoded here.

        Returns:
            one dict per mask: `segmentation` (H x W bool array or RLE dict, per output_mode),
            `area` (pixels), `bbox` (x, y, w, h), `predicted_iou`, `point_coords` ([[x, y]], the
            prompt in image pixels), `stability_score`, `crop_box` (x, y, w, h of the crop used).
        """
        image = as_rgb_uint8(image)
        if embedding is not None and tuple(embedding.original_size) != tuple(image.shape[:2]):
            raise ValueError(f"embedding is of a {tuple(embedding.original_size)} image, not of this "
                             f"{tuple(image.shape[:2])} one")
        records = self._generate_masks(image, embedding)
        if self.min_mask_region_area > 0:
            records = self.postprocess_small_regions(
                records, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        rles = records["rles"] if len(records) else []
        if self.output_mode == "binary_mask":
            segmentations = [rle_to_mask(rle) for rle in rles]
        elif self.output_mode == "coco_rle":
            segmentations = [coco_encode_rle(rle) for rle in rles]
        else:
            segmentations = rles
        if not rles:
            return []
        # one transfer per column, then plain Python numbers
        boxes, crop_boxes, points = (records[k].cpu().tolist() for k in ("boxes", "crop_boxes", "points"))
        ious, stabilities = (records[k].float().cpu().tolist() for k in ("iou_preds", "stability_score"))
        return [
            {
                "segmentation": seg,
                "area": area_from_rle(rles[i]),
                "bbox": box_xyxy_to_xywh(boxes[i]),
                "predicted_iou": ious[i],
                "point_coords": [points[i]],
                "stability_score": stabilities[i],
                "crop_box": box_xyxy_to_xywh(crop_boxes[i]),
            }
            for i, seg in enumerate(segmentations)
        ]

    # ------------------------------------------------------------------ stages
    def _generate_masks(self, image: np.ndarray, embedding: Optional[ImageEmbedding] = None) -> MaskRecords:
        orig_size = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        records = MaskRecords()
        for crop_box, layer in zip(crop_boxes, layers):
            whole = embedding if list(crop_box) == [0, 0, orig_size[1], orig_size[0]] else None
            records.cat(self._process_crop(image, crop_box, layer, orig_size, whole))
        if len(crop_boxes) > 1 and len(records):
            # the same object found in several crops: prefer the mask from the larger crop
            scores = 1.0 / box_area(records["crop_boxes"]).float()
            keep = batched_nms(
                records["boxes"].float(), scores.to(records["boxes"].device),
                torch.zeros(len(records), dtype=torch.long, device=records["boxes"].device),
                iou_threshold=self.crop_nms_thresh,
            )
            records.filter(keep)
        return records

    def _process_crop(
        self, image: np.ndarray, crop_box: List[int], layer: int, orig_size: Tuple[int, int],
        embedding: Optional[ImageEmbedding] = None,
    ) -> MaskRecords:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        if embedding is not None:
            self.predictor.set_embedding(embedding)
        else:
            self.predictor.set_image(crop)
        # grid in [0, 1] -> crop pixels (x scales with the width, y with the height)
        points = self.point_grids[layer] * np.array([[crop_size[1], crop_size[0]]], dtype=float)
        records = MaskRecords()
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start: start + self.points_per_batch]
            records.cat(self._process_batch(batch, crop_size, crop_box, orig_size))
        self.predictor.reset_image()
        if not len(records):
            return records
        keep = batched_nms(
            records["boxes"].float(), records["iou_preds"],
            torch.zeros(len(records), dtype=torch.long, device=records["boxes"].device),
            iou_threshold=self.box_nms_thresh,
        )
        records.filter(keep)
        records["boxes"] = uncrop_boxes_xyxy(records["boxes"], crop_box)
        records["points"] = uncrop_points(records["points"], crop_box)
        records["crop_boxes"] = torch.tensor([crop_box], dtype=torch.long).repeat(len(records), 1)
        return records

    def _process_batch(
        self, points: np.ndarray, crop_size: Tuple[int, int], crop_box: List[int], orig_size: Tuple[int, int]
    ) -> MaskRecords:
        """Decode one batch of single-point prompts (3 masks each) and filter the candidates.

        All prompts go through the decoder at once; the low-res logits are upscaled only for
        candidates that passed the predicted-IoU filter (it does not depend on the mask).
        """
        predictor, model = self.predictor, self.predictor.model
        orig_h, orig_w = orig_size
        device = predictor.device
        coords = torch.as_tensor(predictor.transform.apply_coords(points, crop_size), dtype=torch.float, device=device)
        labels = torch.ones(len(points), 1, dtype=torch.int, device=device)
        low_res, iou_preds = model.decode(
            predictor.get_image_embedding(), coords[:, None, :], labels, None, None, True
        )
        n_out = low_res.shape[1]
        low_res = low_res.flatten(0, 1)
        iou_preds = iou_preds.flatten(0, 1).float()
        point_rows = torch.as_tensor(np.repeat(points, n_out, axis=0))

        keep = torch.ones(len(iou_preds), dtype=torch.bool, device=iou_preds.device)
        if self.pred_iou_thresh > 0.0:
            keep = iou_preds > self.pred_iou_thresh
        if not bool(keep.any()):
            return MaskRecords()
        logits = model.postprocess_masks(
            low_res[keep][:, None].float(), predictor.input_size, predictor.original_size
        )[:, 0]
        records = MaskRecords(iou_preds=iou_preds[keep], points=point_rows[keep.cpu()])
        del low_res

        records["stability_score"] = calculate_stability_score(
            logits, model.mask_threshold, self.stability_score_offset
        )
        if self.stability_score_thresh > 0.0:
            stable = records["stability_score"] >= self.stability_score_thresh
            records.filter(stable)
            logits = logits[stable]
        masks = logits > model.mask_threshold
        del logits
        boxes = batched_mask_to_box(masks)
        # a mask touching a crop edge (that is not an image edge) is probably cut: a larger crop has it
        inside = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        if not bool(inside.all()):
            records.filter(inside)
            masks, boxes = masks[inside], boxes[inside]
        if not len(records):
            return MaskRecords()
        records["boxes"] = boxes
        records["rles"] = mask_to_rle(uncrop_masks(masks, crop_box, orig_h, orig_w))
        return records

    @staticmethod
    def postprocess_small_regions(records: MaskRecords, min_area: int, nms_thresh: float) -> MaskRecords:
        """Fill holes and drop islands smaller than `min_area` pixels in every mask, then rerun box NMS.

        Masks the clean-up left unchanged are preferred. Edits `records` in place. Needs opencv.

        Args:
            records: the generator's mask records (with `rles` and `boxes`).
            min_area: the smallest hole or island kept, in pixels.
            nms_thresh: the box IoU above which the NMS drops the lower-ranked mask.

        Returns:
            `records`, filtered.
        """
        if not len(records):
            return records
        cleaned, unchanged = [], []
        for rle in records["rles"]:
            mask = rle_to_mask(rle)
            mask, filled = remove_small_regions(mask, min_area, mode="holes")
            mask, dropped = remove_small_regions(mask, min_area, mode="islands")
            cleaned.append(torch.as_tensor(mask))
            unchanged.append(float(not (filled or dropped)))
        masks = torch.stack(cleaned)
        boxes = batched_mask_to_box(masks)
        scores = torch.tensor(unchanged)
        keep = batched_nms(boxes.float(), scores, torch.zeros(len(boxes), dtype=torch.long), iou_threshold=nms_thresh)
        records["boxes"] = records["boxes"].cpu().clone()
        for i in keep.tolist():
            if scores[i] == 0.0:
                records["rles"][i] = mask_to_rle(masks[i][None])[0]
                records["boxes"][i] = boxes[i]
        records.filter(keep)
        return records
