"""Inference wrappers built like detectron2's ``DefaultPredictor``.

``WholeImagePredictor(cfg)(image)`` segments everything in one H×W×3 uint8 RGB image and returns
detectron2 ``Instances`` (``pred_masks`` bool N×H×W, ``scores`` N, ``pred_boxes`` N×4) sorted by
score. ``PromptPredictor(cfg)`` answers point / box / mask prompts with the interface of
``segment_anything.SamPredictor`` (``set_image`` once, then ``predict`` / ``predict_batch``).
Weights come from ``cfg.MODEL.WEIGHTS`` (local path or URL; empty = random init).
"""
import logging
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import unsam.compat  # noqa: F401
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from .checkpoint import check_weights_path

logger = logging.getLogger(__name__)


def build_inference_model(cfg) -> torch.nn.Module:
    """Build the model of ``cfg``, load ``MODEL.WEIGHTS`` (checked first) and set eval mode."""
    import unsam.modeling  # noqa: F401  (fills detectron2's registries)

    model = build_model(cfg)
    model.eval()
    weights = check_weights_path(cfg.MODEL.WEIGHTS)
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        logger.warning("MODEL.WEIGHTS is empty: the model has random weights")
    return model


def check_rgb_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("image must be an H×W×3 uint8 RGB array")


class WholeImagePredictor:
    """Segment everything in an image: ``instances = predictor(image)``."""

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_inference_model(self.cfg)
        self.resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    @torch.no_grad()
    def __call__(self, image: np.ndarray):
        """``image``: H×W×3 uint8 RGB. Returns ``Instances`` at the original image size."""
        check_rgb_image(image)
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        h, w = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return self.model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")


class PromptPredictor:
    """Promptable segmentation with the ``segment_anything.SamPredictor`` interface::

        predictor = PromptPredictor(cfg)          # loads cfg.MODEL.WEIGHTS
        predictor.set_image(image)                # H×W×3 uint8 RGB: backbone + pixel decoder once
        masks, iou_predictions, low_res_logits = predictor.predict(point_coords=..., point_labels=...)

    Frames and conventions are SAM's: the image is resized so that its longest side is
    ``INPUT.IMAGE_SIZE`` (``segment_anything``'s ``ResizeLongestSide``) and zero-padded
    (bottom/right) to a square; prompts are in pixels of the original image (points (x, y), boxes
    XYXY); ``mask_input`` / ``low_res_logits`` are 256×256 logits over the padded square.

    Differences from SAM: ``multimask_output=True`` returns the model's
    ``UNSAM.PROMPT.NUM_GRANULARITIES`` (K, default 6) granularity masks instead of SAM's 3, in the
    order of the granularity queries; ``multimask_output=False`` returns the single output with the
    highest predicted IoU (SAM has a dedicated single-mask token instead).

    The prompt path is switched on (``UNSAM.PROMPT.ENABLED``) if the config has it off.
    """

    def __init__(self, cfg):
        cfg = cfg.clone()
        if not cfg.UNSAM.PROMPT.ENABLED:
            logger.warning("UNSAM.PROMPT.ENABLED is False in the config: enabling the prompt path")
            cfg.defrost()
            cfg.UNSAM.PROMPT.ENABLED = True
            cfg.freeze()
        self.cfg = cfg
        self.model = build_inference_model(cfg)
        from segment_anything.utils.transforms import ResizeLongestSide

        self.image_size = int(cfg.INPUT.IMAGE_SIZE)
        self.transform = ResizeLongestSide(self.image_size)
        self.input_format = cfg.INPUT.FORMAT
        self.mask_threshold = 0.0
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode ``image`` (H×W×3 uint8, ``image_format`` RGB or BGR) once for any number of prompts."""
        check_rgb_image(image)
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format != self.input_format:
            image = image[:, :, ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)), device=self.device).float()
        tensor = (tensor - self.model.pixel_mean) / self.model.pixel_std
        h, w = tensor.shape[-2:]
        padded = tensor.new_zeros((1, 3, self.image_size, self.image_size))
        padded[0, :, :h, :w] = tensor
        self.reset_image()
        self.features = self.model.extract_features(padded)
        self.features.pop("backbone", None)  # only the pixel decoder's outputs are decoded
        self.original_size = tuple(image.shape[:2])
        self.input_size = (int(h), int(w))
        self.is_image_set = True

    # ------------------------------------------------------------------------------------------
    def predict(self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = True, return_logits: bool = False
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt (SamPredictor.predict's signature and conventions).

        Args:
            point_coords: N×2 (x, y) pixels of the original image; point_labels: N (1 fg, 0 bg).
            box: 4 XYXY pixels. mask_input: 1×256×256 logits (e.g. a previous ``low_res_logits``).
        Returns:
            masks C×H×W bool (float logits with ``return_logits``), iou_predictions C float32,
            low_res_logits C×256×256 float32; C = K with ``multimask_output`` else 1.
        """
        if point_coords is not None and point_labels is None:
            raise ValueError("point_labels must be supplied with point_coords")
        pts = None if point_coords is None else torch.as_tensor(np.asarray(point_coords, np.float32))[None]
        lbl = None if point_labels is None else torch.as_tensor(np.asarray(point_labels, np.int64))[None]
        bx = None if box is None else torch.as_tensor(np.asarray(box, np.float32)).reshape(1, 4)
        mi = None if mask_input is None else torch.as_tensor(np.asarray(mask_input, np.float32))[None]
        masks, iou, low = self.predict_batch(pts, lbl, bx, mi, multimask_output, return_logits)
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low[0].cpu().numpy()

    @torch.no_grad()
    def predict_batch(self, point_coords: Optional[torch.Tensor] = None, point_labels: Optional[torch.Tensor] = None,
                      boxes: Optional[torch.Tensor] = None, mask_input: Optional[torch.Tensor] = None,
                      multimask_output: bool = True, return_logits: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B prompts of the same kind at once (one decoder pass, prompts kept apart).

        Args (torch or numpy, ORIGINAL image pixels, unlike SamPredictor.predict_torch which takes
        transformed coordinates): point_coords B×N×2, point_labels B×N, boxes B×4,
        mask_input B×1×256×256.
        Returns (torch): masks B×C×H×W bool (logits with ``return_logits``), iou_predictions B×C,
        low_res_logits B×C×256×256; C = K, or 1 without ``multimask_output``.
        """
        if not self.is_image_set:
            raise RuntimeError("an image must be set with set_image(...) before mask prediction")
        dev = self.device
        prompts = {}
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied with point_coords")
            pc = torch.as_tensor(np.asarray(point_coords, np.float32) if not isinstance(point_coords, torch.Tensor)
                                 else point_coords, dtype=torch.float32)
            pl = torch.as_tensor(point_labels).to(torch.int64)
            if pc.dim() != 3 or pc.shape[-1] != 2 or pl.shape != pc.shape[:2]:
                raise ValueError(f"point_coords must be B×N×2 and point_labels B×N, got {tuple(pc.shape)} "
                                 f"and {tuple(pl.shape)}")
            prompts["points"] = torch.as_tensor(self.transform.apply_coords_torch(pc, self.original_size)).to(dev)
            prompts["labels"] = pl.to(dev)
        if boxes is not None:
            bx = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            prompts["boxes"] = self.transform.apply_boxes_torch(bx, self.original_size).to(dev)
        if mask_input is not None:
            mi = torch.as_tensor(mask_input, dtype=torch.float32)
            if mi.dim() != 4 or mi.shape[1] != 1:
                raise ValueError(f"mask_input must be B×1×256×256, got {tuple(mi.shape)}")
            prompts["mask_inputs"] = mi.to(dev)
        if not prompts:
            raise ValueError("give point_coords/point_labels, boxes and/or mask_input")
        counts = {v.shape[0] for k, v in prompts.items() if k != "labels"}
        if len(counts) != 1:
            raise ValueError(f"prompt batch sizes differ: {sorted(counts)}")
        out = self.model.decode_prompts(self.features, [prompts], (self.image_size, self.image_size),
                                        return_aux=False, final_masks=False)
        logits = out["pred_masks"][0].float()  # B×K×s×s, s = IMAGE_SIZE / 4
        iou = out["pred_iou"][0].float()
        if not multimask_output:
            best = iou.argmax(1)
            ar = torch.arange(len(best), device=best.device)
            logits, iou = logits[ar, best][:, None], iou[ar, best][:, None]
        low_res = logits
        if tuple(low_res.shape[-2:]) != (256, 256):
            low_res = F.interpolate(low_res, size=(256, 256), mode="bilinear", align_corners=False)
        masks = self._postprocess(logits)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, iou, low_res

    def _postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """B×C×s×s logits over the padded square → B×C×H×W at the original size (SAM's
        postprocess_masks: upsample to the padded input, crop the padding, resize)."""
        up = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        up = up[..., :self.input_size[0], :self.input_size[1]]
        return F.interpolate(up, size=self.original_size, mode="bilinear", align_corners=False)
