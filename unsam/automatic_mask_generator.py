"""``segment_anything.SamAutomaticMaskGenerator``'s interface over UnSAM's whole-image model.

SAM finds every mask of an image by prompting a point grid; UnSAM's whole-image model answers
"segment everything" in one pass. :class:`UnsamAutomaticMaskGenerator` returns that answer as
the records of ``SamAutomaticMaskGenerator.generate``, so UnSAM drops into code written for SAM::

    generator = UnsamAutomaticMaskGenerator.from_config(cfg)   # or (model, cfg)
    records = generator.generate(image)                        # H×W×3 uint8 RGB

Each record (a dict), as SAM's:

* ``segmentation``: the mask, per ``output_mode``: ``binary_mask`` an H×W bool array,
  ``uncompressed_rle`` / ``coco_rle`` a run-length encoding (SAM's ``amg`` helpers).
* ``area`` (int, pixels); ``bbox``: [x, y, w, h] of the mask, by SAM's rule
  (``batched_mask_to_box`` + ``box_xyxy_to_xywh``: w = x_max - x_min over the mask's pixels).
* ``predicted_iou``: the whole-image score of the mask (class probability × mean foreground
  probability, what ``WholeImagePredictor`` returns as ``scores``). It is a confidence in
  [0, 1], not an IoU estimate as SAM's is: thresholds tuned for SAM (0.88) do not carry over.
* ``stability_score``: SAM's (``calculate_stability_score``): the IoU of the mask's logits
  thresholded at +``stability_score_offset`` and at -``stability_score_offset``, on the logits
  at the image's size. 0.0 where SAM's formula gives 0/0 (no pixel above the low cutoff).
* ``point_coords``: ``[[x, y]]``. A whole-image query has no prompt point (SAM gives the grid
  point that produced the mask), so this is the pixel where the mask's logit is highest (the
  first one on ties): a point inside the mask whenever the mask is not empty, the most
  confident one, and so a click that :class:`~unsam.predictor.PromptPredictor` (``select``
  mode) or SAM answers with this mask or one around it. Integer pixel coordinates, column and
  row, as floats.
* ``crop_box``: [0, 0, W, H]: UnSAM sees the whole image (no crops).

Records are in the model's order, best score first (``SamAutomaticMaskGenerator`` has no
particular order; SAM's notebook sorts by area before drawing). With the default options (no
filtering) the masks and scores are exactly ``WholeImagePredictor``'s for the same model and
image. Options SAM has for its point grid and crops (``points_per_side``, ``crop_n_layers``,
...) have no meaning here; ``min_mask_region_area`` is not offered.
"""

import logging
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from segment_anything.utils.amg import (
    area_from_rle,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    calculate_stability_score,
    coco_encode_rle,
    mask_to_rle_pytorch,
    rle_to_mask,
)
from torchvision.ops.boxes import batched_nms

from .modeling.mask_postprocess import (
    foreground_scores,
    topk_queries,
    upsample_logits,
    valid_extent,
)
from .predictor import WholeImagePredictor, build_inference_model

logger = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


class UnsamAutomaticMaskGenerator:
    """Every mask of an image, as ``SamAutomaticMaskGenerator.generate``'s records.

    Args:
        model: an UnSAM model in eval mode (:func:`unsam.predictor.build_inference_model`, or a
            :class:`~unsam.predictor.PromptPredictor`'s model); it returns at most
            ``TEST.DETECTIONS_PER_IMAGE`` masks (of the config it was built with).
        cfg: its config, for the test-time resize and ``INPUT.FORMAT`` (as
            :class:`~unsam.predictor.WholeImagePredictor`).
        pred_iou_thresh: keep masks whose score (``predicted_iou``) is above this (SAM: ``>``).
        stability_score_thresh: keep masks whose ``stability_score`` is at least this.
        stability_score_offset: the logit offset of the stability score (SAM's default 1.0).
        box_nms_thresh: with a value, non-maximum suppression of the masks' boxes at this IoU,
            by score (SAM: 0.7); None (default): none, as the whole-image model's own output.
        output_mode: ``binary_mask`` | ``uncompressed_rle`` | ``coco_rle``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg,
        pred_iou_thresh: float = 0.0,
        stability_score_thresh: float = 0.0,
        stability_score_offset: float = 1.0,
        box_nms_thresh: Optional[float] = None,
        output_mode: str = "binary_mask",
    ):
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        self.predictor = WholeImagePredictor(model, cfg)
        self.model = model
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = box_nms_thresh
        self.output_mode = output_mode
        self.mask_threshold = 0.0

    @classmethod
    def from_config(cls, cfg, **kwargs) -> "UnsamAutomaticMaskGenerator":
        """Build the model of ``cfg``, load ``cfg.MODEL.WEIGHTS``; ``kwargs`` as ``__init__``."""
        return cls(build_inference_model(cfg), cfg, **kwargs)

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """``image``: H×W×3 uint8 RGB. Returns one record per mask (module docstring)."""
        data = self._generate_masks(image)
        keep = torch.ones(len(data["scores"]), dtype=torch.bool)
        if self.pred_iou_thresh > 0.0:
            keep &= data["scores"] > self.pred_iou_thresh
        if self.stability_score_thresh > 0.0:
            keep &= data["stability_score"] >= self.stability_score_thresh
        idx = torch.nonzero(keep).flatten()
        if self.box_nms_thresh is not None and len(idx):
            boxes = data["boxes"][idx].float()
            categories = torch.zeros(len(idx))
            kept = batched_nms(boxes, data["scores"][idx], categories, self.box_nms_thresh)
            idx = idx[kept.sort().values]  # NMS returns them by score; keep the model's order
        h, w = image.shape[:2]
        records = []
        for i in idx.tolist():
            rle = data["rles"][i]
            if self.output_mode == "coco_rle":
                segmentation = coco_encode_rle(rle)
            elif self.output_mode == "binary_mask":
                segmentation = rle_to_mask(rle)
            else:
                segmentation = rle
            records.append(
                {
                    "segmentation": segmentation,
                    "area": area_from_rle(rle),
                    "bbox": box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                    "predicted_iou": data["scores"][i].item(),
                    "point_coords": [data["points"][i].tolist()],
                    "stability_score": data["stability_score"][i].item(),
                    "crop_box": [0, 0, w, h],
                }
            )
        return records

    def _generate_masks(self, image: np.ndarray) -> Dict[str, Any]:
        """The model's masks of ``image``, best score first: ``rles`` (SAM's uncompressed RLE),
        ``scores`` (n,), ``stability_score`` (n,), ``boxes`` (n, 4) XYXY, ``points`` (n, 2) x, y.

        The selection and scores are the model's ``instance_inference`` (top
        ``test_topk_per_image`` of the class probabilities, times the mean foreground
        probability at stride 4); the mask logits are resized as its masks are (to the padded
        input, cropped, to the image size), kept as floats for the stability score.
        """
        model = self.model
        inputs = self.predictor.prepare(image)
        images = model.preprocess_image([inputs])
        encoded = model.extract_features(images)
        out = model.decode(encoded, final_masks=False)
        feats = encoded["mask_features"][0]
        del encoded
        mask_cls, embeds = out["pred_logits"][0], out["pred_mask_embeds"][0]
        cls_scores, query_idx, _ = topk_queries(mask_cls, model.test_topk_per_image)
        k = len(query_idx)
        image_size = tuple(images.image_sizes[0])
        padded_size = tuple(images.tensor.shape[-2:])
        output_size = (int(inputs["height"]), int(inputs["width"]))
        vh, vw = valid_extent(feats.shape[-2:], image_size, padded_size)
        mask_scores = torch.empty(k, device=mask_cls.device)
        stability = torch.empty(k)
        boxes = torch.empty((k, 4), dtype=torch.int64)
        points = torch.empty((k, 2), dtype=torch.float32)
        rles: List[Dict[str, Any]] = []
        chunk = model.upsample_chunk
        for s in range(0, k, chunk):
            rows = embeds[query_idx[s : s + chunk]].float()
            logits = torch.einsum("qc,chw->qhw", rows, feats.float())
            mask_scores[s : s + chunk] = foreground_scores(logits[:, :vh, :vw])[0]
            full = upsample_logits(logits, padded_size, image_size, output_size)
            del logits
            masks = full > self.mask_threshold
            stability[s : s + chunk] = calculate_stability_score(
                full, self.mask_threshold, self.stability_score_offset
            ).cpu()
            flat = full.flatten(1).argmax(1).cpu()
            points[s : s + chunk, 0] = (flat % output_size[1]).float()
            points[s : s + chunk, 1] = (flat // output_size[1]).float()
            boxes[s : s + chunk] = batched_mask_to_box(masks).cpu()
            rles.extend(mask_to_rle_pytorch(masks))
            del full, masks
        final, order = (cls_scores * mask_scores).sort(descending=True)
        order = order.cpu()
        return {
            "rles": [rles[i] for i in order.tolist()],
            "scores": final.cpu(),
            "stability_score": torch.nan_to_num(stability[order], nan=0.0),
            "boxes": boxes[order],
            "points": points[order],
        }
